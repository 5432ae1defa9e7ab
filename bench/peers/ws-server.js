// Plain `ws` 8 broadcast peer for outpost-bench: every text message a client sends is
// sent to every other client. Loopback only; no compression; TCP_NODELAY.
const http = require('http');
const { WebSocketServer, WebSocket } = require('ws');
const port = Number(process.argv[2] || 7812);
const server = http.createServer();
server.on('connection', (s) => s.setNoDelay(true));
const wss = new WebSocketServer({ server, perMessageDeflate: false });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    for (const c of wss.clients) {
      if (c !== ws && c.readyState === WebSocket.OPEN) c.send(data, { binary: isBinary });
    }
  });
});
server.listen(port, '127.0.0.1', () => console.log(`ws listening on ${port}`));
