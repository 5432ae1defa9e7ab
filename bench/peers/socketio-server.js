// Socket.IO 4.8 peer for outpost-bench: clients `join` a room; a `pub` is broadcast to
// the room as `msg`. Loopback only; no compression; TCP_NODELAY on every socket.
const http = require('http');
const { Server } = require('socket.io');
const port = Number(process.argv[2] || 7811);
const server = http.createServer();
server.on('connection', (s) => s.setNoDelay(true));
const io = new Server(server, {
  transports: ['websocket'],
  perMessageDeflate: false,
  httpCompression: false,
  maxHttpBufferSize: 1e6,
  pingInterval: 25000,
  pingTimeout: 60000,
});
io.on('connection', (socket) => {
  socket.on('join', (room, ack) => {
    socket.join(String(room));
    if (typeof ack === 'function') ack();
  });
  socket.on('pub', (room, data) => io.to(String(room)).emit('msg', data));
});
server.listen(port, '127.0.0.1', () => console.log(`socketio listening on ${port}`));
