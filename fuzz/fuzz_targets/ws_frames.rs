//! Raw client -> server WebSocket bytes after the handshake (RFC 6455 frames,
//! read by `session::FrameReader` straight from the socket). Nothing may
//! panic or allocate more than the message limit; every text message is
//! UTF-8 and within the limit; a close code is one the session may send; and
//! the messages read, framed again canonically, read back the same.
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use marketcast::broadcaster::session::{FrameReader, Inbound, ReadError};

const MAX: usize = 1024;

/// Reading from a byte slice never waits: one poll finishes the future.
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a read from a slice returned Pending"),
    }
}

/// Read every message of `input`; the error that ended it, if not EOF.
fn read_all(mut input: &[u8]) -> (Vec<Inbound>, Option<ReadError>) {
    let mut r = FrameReader::new(MAX);
    let mut out = Vec::new();
    loop {
        match now(r.next(&mut input)) {
            Ok(m) => out.push(m),
            Err(ReadError::Gone(_)) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// One masked client frame.
fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut v = vec![b0];
    match payload.len() {
        n @ 0..=125 => v.push(0x80 | n as u8),
        n @ 126..=65535 => {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(0x80 | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

fuzz_target!(|data: &[u8]| {
    let (msgs, err) = read_all(data);
    if let Some(e) = &err {
        let (code, _) = e.close_code().expect("only Gone has no close code");
        assert!([1002, 1007, 1009].contains(&code), "{e:?}");
    }
    let mut again = Vec::new();
    for m in &msgs {
        match m {
            Inbound::Text(t) => {
                assert!(t.len() <= MAX);
                assert!(std::str::from_utf8(t).is_ok());
                again.extend(frame(0x81, t));
            }
            // Only the opcode survives for these; their payloads are not kept.
            Inbound::Binary => again.extend(frame(0x82, b"")),
            Inbound::Pong => again.extend(frame(0x8A, b"")),
            Inbound::Ping(_) | Inbound::Close(_) => {}
        }
    }
    let (back, err) = read_all(&again);
    assert!(err.is_none(), "{err:?}");
    let kept: Vec<&Inbound> = msgs
        .iter()
        .filter(|m| !matches!(m, Inbound::Ping(_) | Inbound::Close(_)))
        .collect();
    assert_eq!(back.iter().collect::<Vec<_>>(), kept);
});
