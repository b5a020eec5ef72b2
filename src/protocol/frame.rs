//! Server -> client WebSocket frames as bytes. Every server message is
//! encoded into a complete frame before it reaches a session, so the session
//! deals only in ready-to-send bytes. Server frames are unmasked (RFC 6455
//! section 5.1), so the same bytes are valid on every connection.

use bytes::Bytes;
use fastwebsockets::{Frame, Payload};
use serde_json::Value;

/// A complete unmasked text frame.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(payload.len() + 10);
    let n = Frame::text(Payload::Borrowed(payload))
        .write(&mut buf)
        .len();
    buf.truncate(n);
    Bytes::from(buf)
}

/// A JSON message as a text frame.
pub fn json_frame(v: &Value) -> Bytes {
    text_frame(&serde_json::to_vec(v).expect("serialising a Value cannot fail"))
}

/// A control frame (close, ping, pong) as bytes.
pub fn control_frame(frame: Frame<'_>) -> Bytes {
    let mut frame = frame;
    let mut buf = Vec::with_capacity(frame.payload.len() + 10);
    let n = frame.write(&mut buf).len();
    buf.truncate(n);
    Bytes::from(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_frames_carry_the_payload_unmasked() {
        let short = text_frame(b"hi");
        assert_eq!(&short[..], &[0x81, 2, b'h', b'i']);

        let long = vec![b'x'; 300];
        let f = text_frame(&long);
        assert_eq!((f[1], u16::from_be_bytes([f[2], f[3]])), (126, 300));
        assert_eq!(&f[4..], &long[..]);
    }
}
