//! The client side of every system `outpost-bench` measures, over WebSocket, so the
//! client's cost is the same for each: Outpost's JSON protocol, NATS (`CONNECT` / `SUB`
//! / `PUB` / `MSG` with `PING`/`PONG`), NATS JetStream over the same protocol (a file
//! stream holding every subject, publishes with a reply subject for the stream's ack,
//! one push consumer per subscriber so delivery follows storage), Engine.IO v4 /
//! Socket.IO (answering pings), and a plain `ws` broadcast server. Every published message carries its scheduled
//! send time (`"t"`, Unix ns) so subscribers measure latency from the schedule.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Outpost,
    Nats,
    /// NATS JetStream: publishes stored in stream `BENCH` (subjects `bench.>`) and acked;
    /// each subscriber reads through its own push consumer.
    Jetstream,
    Socketio,
    Ws,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Outpost => "outpost",
            Proto::Nats => "nats-ws",
            Proto::Jetstream => "jetstream-ws",
            Proto::Socketio => "socket.io",
            Proto::Ws => "ws",
        }
    }
}

/// Opens a WebSocket from `local` (a 127.0.0.x source address, to spread connections
/// over more than one address's ports) to `url` (`ws://host:port/path?query`).
pub async fn open(url: &str, local: Option<IpAddr>) -> Result<Ws> {
    let rest = url.strip_prefix("ws://").context("only ws:// URLs")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = tokio::net::lookup_host(authority)
        .await?
        .next()
        .context("no address")?;
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    Ok(ws)
}

/// The URL a client of `proto` connects to, from the server's base `ws://host:port`.
pub fn url(proto: Proto, base: &str, token: &str) -> String {
    match proto {
        Proto::Outpost => format!("{base}/v1/ws?token={token}"),
        Proto::Nats | Proto::Jetstream | Proto::Ws => base.to_owned(),
        Proto::Socketio => format!("{base}/socket.io/?EIO=4&transport=websocket"),
    }
}

/// Reads the next text or binary payload, answering WebSocket pings.
async fn next_data(ws: &mut Ws) -> Result<Vec<u8>> {
    loop {
        match ws.next().await.context("connection closed")?? {
            Message::Text(t) => return Ok(t.as_bytes().to_vec()),
            Message::Binary(b) => return Ok(b.to_vec()),
            Message::Close(f) => bail!("closed: {f:?}"),
            _ => {}
        }
    }
}

async fn send_text(ws: &mut Ws, s: String) -> Result<()> {
    ws.send(Message::Text(s.into())).await?;
    Ok(())
}

/// Connects and completes the protocol's handshake.
pub async fn connect(proto: Proto, base: &str, token: &str, local: Option<IpAddr>) -> Result<Ws> {
    let mut ws = open(&url(proto, base, token), local).await?;
    match proto {
        Proto::Outpost => {
            let hello = next_data(&mut ws).await?;
            if !contains(&hello, b"\"connected\"") {
                bail!(
                    "expected connected, got {}",
                    String::from_utf8_lossy(&hello)
                );
            }
        }
        Proto::Nats | Proto::Jetstream => {
            let info = next_data(&mut ws).await?;
            if !info.starts_with(b"INFO") {
                bail!("expected INFO, got {}", String::from_utf8_lossy(&info));
            }
            send_text(
                &mut ws,
                "CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false,\"no_responders\":false,\"protocol\":1}\r\n".into(),
            )
            .await?;
        }
        Proto::Socketio => {
            let open = next_data(&mut ws).await?;
            if !open.starts_with(b"0") {
                bail!(
                    "expected an Engine.IO open, got {}",
                    String::from_utf8_lossy(&open)
                );
            }
            send_text(&mut ws, "40".into()).await?;
            loop {
                let m = next_data(&mut ws).await?;
                if m.starts_with(b"40") {
                    break;
                }
                if m == b"2" {
                    send_text(&mut ws, "3".into()).await?;
                }
            }
        }
        Proto::Ws => {}
    }
    Ok(ws)
}

/// Subscribes to `topic` and waits until the server has it.
pub async fn subscribe(proto: Proto, ws: &mut Ws, topic: &str) -> Result<()> {
    match proto {
        Proto::Outpost => {
            send_text(
                ws,
                format!("{{\"type\":\"subscribe\",\"channel\":\"{topic}\"}}"),
            )
            .await?;
            loop {
                let m = next_data(ws).await?;
                if contains(&m, b"\"subscribed\"") {
                    return Ok(());
                }
                if contains(&m, b"\"error\"") {
                    bail!("subscribe: {}", String::from_utf8_lossy(&m));
                }
            }
        }
        Proto::Nats => {
            // PONG after SUB means the server has processed the SUB.
            send_text(ws, format!("SUB {topic} 1\r\nPING\r\n")).await?;
            loop {
                let m = next_data(ws).await?;
                if contains(&m, b"PONG") {
                    return Ok(());
                }
                if contains(&m, b"-ERR") {
                    bail!("subscribe: {}", String::from_utf8_lossy(&m));
                }
                if contains(&m, b"PING") {
                    send_text(ws, "PONG\r\n".into()).await?;
                }
            }
        }
        Proto::Jetstream => {
            // A push consumer for this subscriber alone: it delivers what the stream
            // stored, from now on, to a subject only this connection reads.
            let n = NEXT_CONSUMER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let config = format!(
                "{{\"stream_name\":\"{JS_STREAM}\",\"config\":{{\"deliver_subject\":\"deliver.{n}\",\"filter_subject\":\"{topic}\",\"ack_policy\":\"none\",\"deliver_policy\":\"new\",\"inactive_threshold\":60000000000}}}}"
            );
            send_text(
                ws,
                format!(
                    "SUB deliver.{n} 1\r\nSUB _INBOX.consumer.{n} 2\r\nPUB $JS.API.CONSUMER.CREATE.{JS_STREAM} _INBOX.consumer.{n} {}\r\n{config}\r\n",
                    config.len()
                ),
            )
            .await?;
            js_reply(ws, b"consumer_create_response").await
        }
        Proto::Socketio => {
            // An ack id makes the server confirm the join.
            send_text(ws, format!("421[\"join\",\"{topic}\"]")).await?;
            loop {
                let m = next_data(ws).await?;
                if m.starts_with(b"431") {
                    return Ok(());
                }
                if m == b"2" {
                    send_text(ws, "3".into()).await?;
                }
            }
        }
        Proto::Ws => Ok(()),
    }
}

/// The frame that publishes one message scheduled at `t` (Unix ns).
pub fn publish_frame(proto: Proto, topic: &str, t: u64, pad: &str, ephemeral: bool) -> Message {
    let body = format!("{{\"t\":{t},\"p\":\"{pad}\"}}");
    match proto {
        Proto::Outpost => Message::Text(
            format!(
                "{{\"type\":\"publish\",\"channel\":\"{topic}\",\"event\":\"b\",\"ephemeral\":{ephemeral},\"data\":{body}}}"
            )
            .into(),
        ),
        Proto::Nats => {
            Message::Binary(format!("PUB {topic} {}\r\n{body}\r\n", body.len()).into_bytes().into())
        }
        // The reply subject makes the stream answer with its ack (the publisher's
        // connection subscribed `_INBOX.acks.>` in `prepare_publisher`).
        Proto::Jetstream => Message::Binary(
            format!("PUB {topic} _INBOX.acks.1 {}\r\n{body}\r\n", body.len())
                .into_bytes()
                .into(),
        ),
        Proto::Socketio => Message::Text(format!("42[\"pub\",\"{topic}\",{body}]").into()),
        Proto::Ws => Message::Text(body.into()),
    }
}

/// What a subscriber got from one WebSocket message: the scheduled times of the
/// messages in it, and a reply the protocol needs (a pong).
pub struct Parsed {
    pub times: Vec<u64>,
    pub reply: Option<&'static str>,
}

/// Parses one incoming WebSocket payload. `buf` carries partial NATS protocol data
/// across messages.
pub fn parse(proto: Proto, data: &[u8], buf: &mut Vec<u8>) -> Parsed {
    let mut out = Parsed {
        times: Vec::new(),
        reply: None,
    };
    match proto {
        Proto::Outpost => {
            if contains(data, b"\"type\":\"op\"") || contains(data, b"\"type\":\"ephemeral\"") {
                out.times.extend(field_t(data));
            }
        }
        Proto::Ws => out.times.extend(field_t(data)),
        Proto::Socketio => {
            if data == b"2" {
                out.reply = Some("3");
            } else if data.starts_with(b"42") {
                out.times.extend(field_t(data));
            }
        }
        Proto::Nats | Proto::Jetstream => {
            buf.extend_from_slice(data);
            let mut at = 0;
            while let Some(eol) = find(&buf[at..], b"\r\n") {
                let line = &buf[at..at + eol];
                if line.starts_with(b"MSG ") {
                    let len: usize = line
                        .rsplit(|b| *b == b' ')
                        .next()
                        .and_then(|l| std::str::from_utf8(l).ok())
                        .and_then(|l| l.parse().ok())
                        .unwrap_or(0);
                    let start = at + eol + 2;
                    if buf.len() < start + len + 2 {
                        break;
                    }
                    out.times.extend(field_t(&buf[start..start + len]));
                    at = start + len + 2;
                } else {
                    if line == b"PING" {
                        out.reply = Some("PONG\r\n");
                    }
                    at += eol + 2;
                }
            }
            buf.drain(..at);
        }
    }
    out
}

/// The stream every JetStream publish goes to.
pub const JS_STREAM: &str = "BENCH";

static NEXT_CONSUMER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Creates the file stream `BENCH` over `bench.>` (replicas 1: the bench runs one
/// server; the server's own `sync_interval` decides when it fsyncs).
pub async fn create_stream(ws: &mut Ws) -> Result<()> {
    let config = format!(
        "{{\"name\":\"{JS_STREAM}\",\"subjects\":[\"bench.>\"],\"storage\":\"file\",\"num_replicas\":1}}"
    );
    send_text(
        ws,
        format!(
            "SUB _INBOX.stream 1\r\nPUB $JS.API.STREAM.CREATE.{JS_STREAM} _INBOX.stream {}\r\n{config}\r\n",
            config.len()
        ),
    )
    .await?;
    js_reply(ws, b"stream_create_response").await
}

/// Readies a publisher's connection: JetStream acks come back on `_INBOX.acks.>`.
pub async fn prepare_publisher(proto: Proto, ws: &mut Ws) -> Result<()> {
    if proto == Proto::Jetstream {
        send_text(ws, "SUB _INBOX.acks.> 9\r\n".into()).await?;
    }
    Ok(())
}

/// Waits for a JetStream API response of `kind`; an error in it fails.
async fn js_reply(ws: &mut Ws, kind: &[u8]) -> Result<()> {
    loop {
        let m = next_data(ws).await?;
        if contains(&m, b"PING") {
            send_text(ws, "PONG\r\n".into()).await?;
        }
        if contains(&m, b"-ERR") {
            bail!("jetstream: {}", String::from_utf8_lossy(&m));
        }
        if contains(&m, kind) {
            if contains(&m, b"\"error\"") {
                bail!("jetstream: {}", String::from_utf8_lossy(&m));
            }
            return Ok(());
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// The number after the first `"t":`.
fn field_t(data: &[u8]) -> Option<u64> {
    let at = find(data, b"\"t\":")? + 4;
    let digits = data[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&data[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_protocol() {
        let mut buf = Vec::new();
        let op = br#"{"type":"op","channel":"c","dot":"a:1","data":{"t":42,"p":"x"}}"#;
        assert_eq!(parse(Proto::Outpost, op, &mut buf).times, vec![42]);
        assert_eq!(
            parse(Proto::Ws, br#"{"t":7,"p":""}"#, &mut buf).times,
            vec![7]
        );
        let sio = parse(Proto::Socketio, br#"42["msg",{"t":9,"p":""}]"#, &mut buf);
        assert_eq!(sio.times, vec![9]);
        assert_eq!(parse(Proto::Socketio, b"2", &mut buf).reply, Some("3"));
        // Two NATS messages split across WebSocket frames, with a PING between.
        let a = b"MSG s 1 14\r\n{\"t\":1,\"p\":\"\"}\r\nPING\r\nMSG s 1 14\r\n{\"t\":2";
        let first = parse(Proto::Nats, a, &mut buf);
        assert_eq!(first.times, vec![1]);
        assert_eq!(first.reply, Some("PONG\r\n"));
        let second = parse(Proto::Nats, b",\"p\":\"\"}\r\n", &mut buf);
        assert_eq!(second.times, vec![2]);
        assert!(buf.is_empty());
    }
}
