//! The load client's WebSocket connection, in two flavours (`--client`):
//!
//! - **lean** (default): a plain HTTP/1.1 upgrade over a `TcpStream`, then a
//!   strict reader of server-to-client frames straight from one growable
//!   buffer: every text frame is handed out as a slice of that buffer, with
//!   no allocation and no copy per frame, and many frames per `read`
//!   syscall. Strict means: the 101 and `Sec-WebSocket-Accept` are checked;
//!   every frame must be final (the server never fragments), unmasked, with
//!   no RSV bits, a known opcode, the shortest length encoding, control
//!   frames at most 125 bytes, text frames valid UTF-8; anything else ends
//!   the connection with an error that the scenario reports. Pings are
//!   answered with a masked pong at once.
//! - **tungstenite**: tokio-tungstenite, as the test suite uses.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    Lean,
    Tungstenite,
}

/// What the server sent.
pub enum Event<'a> {
    Text(&'a [u8]),
    Close(String),
    Eof,
}

pub enum Conn {
    Lean(Lean),
    Tung(
        Box<WebSocketStream<MaybeTlsStream<TcpStream>>>,
        Option<Message>,
    ),
}

/// Largest frame accepted (a replay frame is ~200 bytes).
const MAX_FRAME: usize = 1 << 20;
/// Initial read buffer; doubled while reads fill it, up to MAX_BUF.
const INITIAL_BUF: usize = 4096;
const MAX_BUF: usize = 256 * 1024;

impl Conn {
    /// Connect to `ws://{addr}{path}` (path with its query).
    pub async fn connect(kind: ClientKind, addr: SocketAddr, path: &str) -> Result<Conn, String> {
        Conn::connect_auth(kind, addr, path, None).await
    }

    /// The same, with `Authorization: Bearer {bearer}` on the upgrade.
    pub async fn connect_auth(
        kind: ClientKind,
        addr: SocketAddr,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<Conn, String> {
        let fut = async {
            match kind {
                ClientKind::Lean => Lean::connect(addr, path, bearer).await.map(Conn::Lean),
                ClientKind::Tungstenite => {
                    // Small buffers: thousands of clients, small frames.
                    let cfg = WebSocketConfig::default()
                        .read_buffer_size(16 * 1024)
                        .write_buffer_size(0);
                    let mut req = format!("ws://{addr}{path}")
                        .into_client_request()
                        .map_err(|e| format!("request: {e}"))?;
                    if let Some(b) = bearer {
                        let v = format!("Bearer {b}")
                            .parse()
                            .map_err(|e| format!("bearer header: {e}"))?;
                        req.headers_mut().insert("authorization", v);
                    }
                    let (ws, _) =
                        tokio_tungstenite::connect_async_with_config(req, Some(cfg), true)
                            .await
                            .map_err(|e| format!("connect: {e}"))?;
                    Ok(Conn::Tung(Box::new(ws), None))
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .map_err(|_| "connect timed out".to_string())?
    }

    /// The next text frame, close or end of stream.
    /// Cancel safety: a frame is consumed only when returned; a cancelled
    /// call loses nothing (the lean reader keeps partial frames in its
    /// buffer; tungstenite's stream keeps its own state).
    pub async fn next(&mut self) -> Result<Event<'_>, String> {
        match self {
            Conn::Lean(l) => l.next().await,
            Conn::Tung(ws, slot) => loop {
                let m = match ws.next().await {
                    None => return Ok(Event::Eof),
                    Some(Err(e)) => return Err(format!("read: {e}")),
                    Some(Ok(m)) => m,
                };
                match m {
                    Message::Text(_) => {
                        *slot = Some(m);
                        let Some(Message::Text(t)) = slot else {
                            unreachable!("just stored")
                        };
                        return Ok(Event::Text(t.as_bytes()));
                    }
                    Message::Close(cf) => {
                        return Ok(Event::Close(match cf {
                            Some(c) => format!("closed {} {}", u16::from(c.code), c.reason),
                            None => "closed".into(),
                        }))
                    }
                    Message::Binary(_) => return Err("unexpected binary frame".into()),
                    _ => continue,
                }
            },
        }
    }
}

pub struct Lean {
    tcp: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes of the frame handed out by the previous `next`, dropped at the
    /// start of the following one (the caller borrowed them).
    consumed: usize,
}

impl Lean {
    async fn connect(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Result<Lean, String> {
        let mut tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true)
            .map_err(|e| format!("set_nodelay: {e}"))?;
        let key = generate_key();
        let auth = bearer
            .map(|b| format!("Authorization: Bearer {b}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
        );
        tcp.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("sending the upgrade: {e}"))?;
        let mut buf = vec![0u8; INITIAL_BUF];
        let mut end = 0;
        let head_len = loop {
            if let Some(i) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if end == buf.len() {
                return Err("upgrade response headers over 4 KiB".into());
            }
            let n = tcp
                .read(&mut buf[end..])
                .await
                .map_err(|e| format!("reading the upgrade response: {e}"))?;
            if n == 0 {
                return Err("connection closed during the upgrade".into());
            }
            end += n;
        };
        let head = std::str::from_utf8(&buf[..head_len])
            .map_err(|_| "upgrade response is not UTF-8".to_string())?;
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("");
        if !status.starts_with("HTTP/1.1 101") {
            let body = String::from_utf8_lossy(&buf[head_len..end]);
            return Err(format!("upgrade refused: {status} {body}"));
        }
        let (mut accept, mut upgrade) = (None, false);
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("sec-websocket-accept") {
                    accept = Some(v.to_string());
                } else if k.eq_ignore_ascii_case("upgrade") {
                    upgrade = v.eq_ignore_ascii_case("websocket");
                } else if k.eq_ignore_ascii_case("sec-websocket-extensions") {
                    return Err(format!("unexpected extension {v}"));
                }
            }
        }
        if !upgrade || accept.as_deref() != Some(derive_accept_key(key.as_bytes()).as_str()) {
            return Err(format!("bad upgrade response: {head:?}"));
        }
        Ok(Lean {
            tcp,
            buf,
            start: head_len,
            end,
            consumed: 0,
        })
    }

    async fn next(&mut self) -> Result<Event<'_>, String> {
        self.start += std::mem::take(&mut self.consumed);
        loop {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            match parse_frame(&self.buf[self.start..self.end])? {
                Parsed::Frame {
                    opcode,
                    header,
                    len,
                } => {
                    let p0 = self.start + header;
                    let total = header + len;
                    match opcode {
                        OP_TEXT => {
                            std::str::from_utf8(&self.buf[p0..p0 + len])
                                .map_err(|_| "text frame is not UTF-8".to_string())?;
                            self.consumed = total;
                            return Ok(Event::Text(&self.buf[p0..p0 + len]));
                        }
                        OP_PING => {
                            let pong = masked_frame(OP_PONG, &self.buf[p0..p0 + len]);
                            self.start += total;
                            self.tcp
                                .write_all(&pong)
                                .await
                                .map_err(|e| format!("writing a pong: {e}"))?;
                        }
                        OP_PONG => self.start += total,
                        _ => {
                            // OP_CLOSE
                            let p = &self.buf[p0..p0 + len];
                            let why = match p.len() {
                                0 => "closed".to_string(),
                                1 => return Err("close frame with a 1-byte payload".into()),
                                _ => format!(
                                    "closed {} {}",
                                    u16::from_be_bytes([p[0], p[1]]),
                                    String::from_utf8_lossy(&p[2..])
                                ),
                            };
                            self.start += total;
                            return Ok(Event::Close(why));
                        }
                    }
                }
                Parsed::Need(n) => {
                    // Make room for at least `n` bytes from `start`, then read.
                    if self.start > 0 && self.start + n > self.buf.len() {
                        self.buf.copy_within(self.start..self.end, 0);
                        self.end -= self.start;
                        self.start = 0;
                    }
                    if n > self.buf.len() {
                        self.buf.resize(n.next_power_of_two(), 0);
                    }
                    let r = self
                        .tcp
                        .read(&mut self.buf[self.end..])
                        .await
                        .map_err(|e| format!("read: {e}"))?;
                    if r == 0 {
                        return if self.start == self.end {
                            Ok(Event::Eof)
                        } else {
                            Err("connection ended inside a frame".into())
                        };
                    }
                    self.end += r;
                    // A read that filled the buffer: more is waiting; read
                    // bigger chunks from now on (fewer syscalls in replays).
                    if self.end == self.buf.len() && self.buf.len() < MAX_BUF {
                        let len = self.buf.len() * 2;
                        self.buf.resize(len, 0);
                    }
                }
            }
        }
    }
}

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A whole frame: opcode, header length, payload length.
    Frame {
        opcode: u8,
        header: usize,
        len: usize,
    },
    /// At least this many bytes (from the frame start) are needed.
    Need(usize),
}

/// Parse one server-to-client frame header (RFC 6455 5.2), strictly.
fn parse_frame(b: &[u8]) -> Result<Parsed, String> {
    if b.len() < 2 {
        return Ok(Parsed::Need(2));
    }
    let (b0, b1) = (b[0], b[1]);
    if b0 & 0x80 == 0 {
        return Err("fragmented frame (FIN not set)".into());
    }
    if b0 & 0x70 != 0 {
        return Err("RSV bits set without an extension".into());
    }
    let opcode = b0 & 0x0F;
    if !matches!(opcode, OP_TEXT | OP_CLOSE | OP_PING | OP_PONG) {
        return Err(format!("unexpected opcode {opcode:#x}"));
    }
    if b1 & 0x80 != 0 {
        return Err("masked frame from the server".into());
    }
    let (header, len) = match b1 & 0x7F {
        126 => {
            if b.len() < 4 {
                return Ok(Parsed::Need(4));
            }
            let n = u16::from_be_bytes([b[2], b[3]]) as usize;
            if n < 126 {
                return Err("length not in its shortest form".into());
            }
            (4, n)
        }
        127 => {
            if b.len() < 10 {
                return Ok(Parsed::Need(10));
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[2..10]);
            let n = u64::from_be_bytes(a);
            if n < 65536 || n >> 63 != 0 {
                return Err("length not in its shortest form".into());
            }
            (10, usize::try_from(n).unwrap_or(usize::MAX))
        }
        n => (2, n as usize),
    };
    if opcode >= OP_CLOSE && len > 125 {
        return Err("control frame over 125 bytes".into());
    }
    if len > MAX_FRAME {
        return Err(format!("frame of {len} bytes"));
    }
    if b.len() < header + len {
        return Ok(Parsed::Need(header + len));
    }
    Ok(Parsed::Frame {
        opcode,
        header,
        len,
    })
}

/// A client-to-server frame (payload at most 125 bytes), masked as RFC 6455
/// requires of clients.
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = fastrand::u32(..).to_be_bytes();
    let mut f = Vec::with_capacity(6 + payload.len());
    f.push(0x80 | opcode);
    f.push(0x80 | payload.len().min(125) as u8);
    f.extend_from_slice(&key);
    f.extend(
        payload
            .iter()
            .take(125)
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4]),
    );
    f
}
