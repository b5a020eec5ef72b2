//! RFC 6455 held to the letter, driven with raw bytes: a WebSocket library
//! would refuse to send most of these. One case per rule, each asserting the
//! exact status or close code (docs/PROTOCOL.md, "Connecting" and "Close
//! codes"). The client-frame reader is hand-written (`session/inbound.rs`),
//! so this suite is what holds it to the RFC.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::support::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Send an upgrade request of `version` with `headers` (name, value); the
/// status line's code, the response head, and the socket.
async fn upgrade(
    addr: std::net::SocketAddr,
    version: &str,
    headers: &[(&str, &str)],
) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET /ws {version}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    tokio::time::timeout(WAIT, async {
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
    })
    .await
    .expect("a response head");
    let head = String::from_utf8_lossy(&head).into_owned();
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head, s)
}

const GOOD: &[(&str, &str)] = &[
    ("host", "x"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", KEY),
];

/// A WebSocket after a correct handshake.
async fn open(addr: std::net::SocketAddr) -> TcpStream {
    let (code, head, s) = upgrade(addr, "HTTP/1.1", GOOD).await;
    assert_eq!(code, 101, "{head}");
    s
}

/// One client frame: FIN, RSV bits, opcode, masked or not.
fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut v = vec![(fin as u8) << 7 | (rsv & 7) << 4 | (opcode & 0xf)];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => v.push(mask_bit | n as u8),
        n @ 126..=65535 => {
            v.push(mask_bit | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(mask_bit | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    if masked {
        v.extend_from_slice(&key);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        v.extend_from_slice(payload);
    }
    v
}

fn text(payload: &[u8]) -> Vec<u8> {
    frame(true, 0, 0x1, payload, true)
}

fn close(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    frame(true, 0, 0x8, &p, true)
}

/// The next server frame: (opcode, payload).
async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    tokio::time::timeout(WAIT, async {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.expect("a frame header");
        assert_eq!(h[1] & 0x80, 0, "server frames are never masked");
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                s.read_exact(&mut l).await.unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                s.read_exact(&mut l).await.unwrap();
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).await.unwrap();
        (h[0] & 0x0f, p)
    })
    .await
    .expect("a frame in time")
}

/// Skip data frames until the server's Close; its code.
async fn close_code(s: &mut TcpStream) -> u16 {
    loop {
        let (op, p) = read_frame(s).await;
        if op == 0x8 {
            assert!(p.len() >= 2, "a Close with a code");
            return u16::from_be_bytes([p[0], p[1]]);
        }
    }
}

/// Send `bytes` on a fresh WebSocket; the code of the server's Close.
async fn closes_with(addr: std::net::SocketAddr, bytes: &[u8]) -> u16 {
    let mut s = open(addr).await;
    s.write_all(bytes).await.unwrap();
    close_code(&mut s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_opening_handshake_holds_every_must() {
    let db = TestDb::new().await;
    let b = broadcaster(broadcaster_config(&db)).await;

    // The RFC's own sample: 101 with the accept key derived from it.
    let (code, head, _s) = upgrade(b.addr, "HTTP/1.1", GOOD).await;
    assert_eq!(code, 101, "{head}");
    let accept = derive_accept_key(KEY.as_bytes());
    assert!(
        head.to_ascii_lowercase().contains(&format!(
            "sec-websocket-accept: {}",
            accept.to_ascii_lowercase()
        )),
        "{head}"
    );

    // HTTP/1.0 cannot upgrade (section 4.1: at least 1.1).
    let (code, head, _) = upgrade(b.addr, "HTTP/1.0", GOOD).await;
    assert_eq!(code, 400, "{head}");
    // No Host.
    let no_host: Vec<_> = GOOD.iter().copied().filter(|(k, _)| *k != "host").collect();
    let (code, head, _) = upgrade(b.addr, "HTTP/1.1", &no_host).await;
    assert_eq!(code, 400, "{head}");
    // A version other than 13: 426 naming the version we speak (4.4).
    for v in ["8", "14"] {
        let h = [
            ("host", "x"),
            ("sec-websocket-version", v),
            ("sec-websocket-key", KEY),
        ];
        let (code, head, _) = upgrade(b.addr, "HTTP/1.1", &h).await;
        assert_eq!(code, 426, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-version: 13"),
            "{head}"
        );
    }
    // A key that is not the base64 of 16 bytes.
    for k in ["", "abc", "dGhlIHNhbXBsZQ=="] {
        let h = [
            ("host", "x"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", k),
        ];
        let (code, head, _) = upgrade(b.addr, "HTTP/1.1", &h).await;
        assert_eq!(code, 400, "key {k:?}: {head}");
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_rule_closes_with_its_code() {
    let db = TestDb::new().await;
    let mut cfg = broadcaster_config(&db);
    cfg.session.max_message_bytes = 256;
    let b = broadcaster(cfg).await;
    let a = b.addr;
    let ping = br#"{"op":"ping"}"#;

    // Section 5.1: a client frame must be masked.
    assert_eq!(
        closes_with(a, &frame(true, 0, 0x1, ping, false)).await,
        1002
    );
    // 5.2: no extension was negotiated, so RSV bits must be 0.
    assert_eq!(closes_with(a, &frame(true, 4, 0x1, ping, true)).await, 1002);
    // 5.2: reserved opcodes.
    assert_eq!(closes_with(a, &frame(true, 0, 0x3, b"", true)).await, 1002);
    assert_eq!(closes_with(a, &frame(true, 0, 0xb, b"", true)).await, 1002);
    // 5.5: control frames are not fragmented and carry at most 125 bytes.
    assert_eq!(
        closes_with(a, &frame(false, 0, 0x9, b"x", true)).await,
        1002
    );
    assert_eq!(
        closes_with(a, &frame(true, 0, 0x9, &[b'x'; 126], true)).await,
        1002
    );
    // 5.4: a continuation with nothing to continue, and a new message in
    // the middle of a fragmented one.
    assert_eq!(closes_with(a, &frame(true, 0, 0x0, b"x", true)).await, 1002);
    let mut two = frame(false, 0, 0x1, b"{", true);
    two.extend(text(b"{}"));
    assert_eq!(closes_with(a, &two).await, 1002);
    // 8.1: text must be UTF-8, also when split across fragments.
    assert_eq!(closes_with(a, &text(b"\xff\xfe")).await, 1007);
    let mut split = frame(false, 0, 0x1, b"\xe2\x82", true);
    split.extend(frame(true, 0, 0x0, b"\xac\xff", true));
    assert_eq!(closes_with(a, &split).await, 1007);
    // This server's policy: binary is refused (1008), a message over the
    // size limit is 1009.
    assert_eq!(closes_with(a, &frame(true, 0, 0x2, b"x", true)).await, 1008);
    assert_eq!(closes_with(a, &text(&[b' '; 300])).await, 1009);
    // 5.5.1 / 7.4: a Close's code must be one allowed on the wire, and its
    // reason UTF-8.
    assert_eq!(closes_with(a, &close(1005, b"")).await, 1002);
    assert_eq!(closes_with(a, &close(1016, b"")).await, 1002);
    assert_eq!(closes_with(a, &close(2999, b"")).await, 1002);
    assert_eq!(closes_with(a, &frame(true, 0, 0x8, &[3], true)).await, 1002);
    assert_eq!(closes_with(a, &close(1000, b"\xff")).await, 1007);
    // Registered and application codes are echoed, 1014 included.
    for code in [1000, 1001, 1012, 1013, 1014, 3000, 4999] {
        assert_eq!(closes_with(a, &close(code, b"bye")).await, code, "{code}");
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered_with_their_payload_and_fragments_may_carry_them() {
    let db = TestDb::new().await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut s = open(b.addr).await;
    s.write_all(&frame(true, 0, 0x9, b"are you there", true))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut s).await, (0xa, b"are you there".to_vec()));
    // A ping between the fragments of a message (5.4: control frames may be
    // injected), then the message, answered whole.
    let mut bytes = frame(false, 0, 0x1, br#"{"op":"pi"#, true);
    bytes.extend(frame(true, 0, 0x9, b"p", true));
    bytes.extend(frame(true, 0, 0x0, br#"ng","id":1}"#, true));
    s.write_all(&bytes).await.unwrap();
    assert_eq!(read_frame(&mut s).await, (0xa, b"p".to_vec()));
    let (op, reply) = read_frame(&mut s).await;
    let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(
        (op, reply),
        (0x1, serde_json::json!({"type": "pong", "id": 1}))
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_protocol_error_the_close_arrives_and_the_connection_ends_cleanly() {
    let db = TestDb::new().await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut s = open(b.addr).await;
    // Past the handshake, so that what follows reaches the session's reader
    // straight from the socket (hyper reads ahead only while it owns it).
    tokio::time::sleep(Duration::from_millis(100)).await;
    // An unmasked frame, then more bytes the server will never parse: it
    // must still read them, or dropping the socket with unread input resets
    // the connection, and the client may lose the Close and its code
    // (section 7.1.1).
    let mut bytes = frame(true, 0, 0x1, b"{}", false);
    bytes.extend(std::iter::repeat_n(0xAAu8, 64 * 1024));
    s.write_all(&bytes).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(close_code(&mut s).await, 1002);
    s.shutdown().await.unwrap(); // our FIN, as a client that got a Close sends
    let mut rest = Vec::new();
    let end = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    assert!(
        matches!(end, Ok(Ok(_))),
        "the server ended with a reset, not a FIN: {end:?}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_is_rate_limited_like_ops_then_closed() {
    let db = TestDb::new().await;
    let b = broadcaster(broadcaster_config(&db)).await;
    let mut s = open(b.addr).await;
    // 1,000 pings at once against the default limit (a burst of 100 at
    // 50/s): each takes a token like an op.
    let mut flood = Vec::new();
    for _ in 0..1000 {
        flood.extend(frame(true, 0, 0x9, b"p", true));
    }
    // The server closes mid-flood; the rest of the write may fail, as it should.
    let _ = s.write_all(&flood).await;
    let mut pongs = 0;
    let code = loop {
        let (op, p) = read_frame(&mut s).await;
        match op {
            0xa => pongs += 1,
            0x8 => break u16::from_be_bytes([p[0], p[1]]),
            other => panic!("unexpected opcode {other}"),
        }
    };
    assert_eq!(code, 1008, "a sustained flood is closed");
    assert!(
        (100..=102).contains(&pongs),
        "a burst's worth of pongs, not one per ping: {pongs}"
    );
    b.stop().await;
}
