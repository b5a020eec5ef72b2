//! Client -> server WebSocket frames (RFC 6455 section 5), read straight from
//! the socket, holding no buffer between messages.
//!
//! Why not fastwebsockets' reader: it allocates an 8 KiB buffer per connection
//! at the handshake and grows it to the largest message ever received, never
//! shrinking. Measured with massif on 2,000 idle subscribed connections, that
//! buffer was 8 KiB of the ~20 KiB each connection cost. Client traffic here
//! is a few small ops and a pong every ping interval, so a read per header
//! costs nothing, and memory is held only while a message is being read
//! (bounded by `--max-message-bytes` before anything is allocated).
//! fastwebsockets still does the handshake and encodes control frames.
//!
//! Cancel safety: [`FrameReader::next`] is cancel-safe: every byte read is
//! kept in the reader, so the session polls it inside its `select!`.

use fastwebsockets::Frame;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// A complete client message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A whole text message (fragments joined), UTF-8 checked.
    Text(Vec<u8>),
    /// A binary message's first frame; the session refuses binary (1008).
    Binary,
    /// A ping: answer with this pong frame.
    Ping(bytes::Bytes),
    Pong,
    /// The peer's Close: echo this frame, then stop reading.
    Close(bytes::Bytes),
}

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The socket ended or failed: nothing to send.
    Gone(std::io::Error),
    /// A message over the size limit: close 1009.
    TooLarge,
    /// Text that is not UTF-8: close 1007.
    InvalidUtf8,
    /// Anything else RFC 6455 forbids: close 1002.
    Protocol(&'static str),
}

impl ReadError {
    /// The close code to send, if the peer is still there to receive one.
    pub fn close_code(&self) -> Option<(u16, &'static str)> {
        match self {
            ReadError::Gone(_) => None,
            ReadError::TooLarge => Some((1009, "message over the size limit")),
            ReadError::InvalidUtf8 => Some((1007, "text message is not UTF-8")),
            ReadError::Protocol(why) => Some((1002, why)),
        }
    }
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        ReadError::Gone(e)
    }
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The first two bytes of a frame, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub fin: bool,
    pub opcode: u8,
    /// 0..=125, or 126/127: a 2- or 8-byte length follows.
    pub len7: u8,
}

/// Check the fixed header of a client frame: no extension bits, a known
/// opcode, masked (clients must mask), control frames whole and short.
pub fn parse_head(b0: u8, b1: u8) -> Result<Head, ReadError> {
    if b0 & 0x70 != 0 {
        return Err(ReadError::Protocol("reserved bits set (no extension)"));
    }
    let head = Head {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        len7: b1 & 0x7F,
    };
    if b1 & 0x80 == 0 {
        return Err(ReadError::Protocol("client frames must be masked"));
    }
    match head.opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !head.fin || head.len7 > 125 {
                return Err(ReadError::Protocol("bad control frame"));
            }
        }
        _ => return Err(ReadError::Protocol("unknown opcode")),
    }
    Ok(head)
}

/// Reads one client message at a time. Every byte read is kept in `self`,
/// so a [`FrameReader::next`] future dropped midway (a `select!` that took
/// another branch) loses nothing: the next call resumes where it stopped.
/// That is what lets the session poll its socket for client frames in the
/// same `select!` as its live trades, with one task per connection.
pub struct FrameReader {
    max_message: usize,
    /// The current frame's header: 2 bytes, up to 8 of length, 4 of mask.
    head: [u8; 14],
    head_len: usize,
    /// The current frame's payload once its header is complete: `filled`
    /// of `payload.len()` bytes read.
    payload: Option<Vec<u8>>,
    filled: usize,
    /// A fragmented text message in progress.
    fragments: Option<Vec<u8>>,
}

impl FrameReader {
    /// Messages (and single frames) longer than `max_message` bytes fail with
    /// [`ReadError::TooLarge`] before their payload is read.
    pub fn new(max_message: usize) -> Self {
        FrameReader {
            max_message,
            head: [0; 14],
            head_len: 0,
            payload: None,
            filled: 0,
            fragments: None,
        }
    }

    /// The next message or control frame. Cancel-safe (see the type).
    pub async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Inbound, ReadError> {
        std::future::poll_fn(|cx| self.poll_next(cx, r)).await
    }

    /// Bytes are read exactly as needed (a header, then its payload), never
    /// past the current frame, so nothing is buffered between frames.
    pub fn poll_next<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
    ) -> Poll<Result<Inbound, ReadError>> {
        loop {
            if self.payload.is_none() {
                let want = if self.head_len < 2 {
                    2
                } else {
                    let head = parse_head(self.head[0], self.head[1])?;
                    2 + match head.len7 {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    } + 4
                };
                if self.head_len < want {
                    let n = ready!(read_some(cx, r, &mut self.head[self.head_len..want]))?;
                    self.head_len += n;
                    continue;
                }
                let head = parse_head(self.head[0], self.head[1])?;
                let len = match head.len7 {
                    126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                    127 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.head[2..10]);
                        u64::from_be_bytes(b)
                    }
                    n => u64::from(n),
                };
                // Control frames (at most 125 bytes, checked by parse_head)
                // are not part of the message: one between fragments must not
                // push it over the limit (found by tests/it/props.rs).
                let is_control = head.opcode & 0x8 != 0;
                let already = self.fragments.as_ref().map_or(0, Vec::len) as u64;
                if !is_control && already.saturating_add(len) > self.max_message as u64 {
                    return Poll::Ready(Err(ReadError::TooLarge));
                }
                // Bounded by max_message or 125 above: never an allocation the peer sizes.
                self.payload = Some(vec![0u8; len as usize]);
                self.filled = 0;
            }
            let payload = self.payload.as_mut().expect("set above");
            while self.filled < payload.len() {
                let n = ready!(read_some(cx, r, &mut payload[self.filled..]))?;
                self.filled += n;
            }
            // The frame is complete: take it and reset for the next header.
            let mut payload = self.payload.take().expect("set above");
            let head = parse_head(self.head[0], self.head[1])?;
            let mask_at = self.head_len - 4; // the mask ends the header
            let mut mask = [0u8; 4];
            mask.copy_from_slice(&self.head[mask_at..mask_at + 4]);
            self.head_len = 0;
            fastwebsockets::unmask(&mut payload, mask);
            if let Some(m) = self.on_frame(head, payload)? {
                return Poll::Ready(Ok(m));
            }
        }
    }

    /// A complete frame: a message, a control frame, or a fragment kept.
    fn on_frame(&mut self, head: Head, payload: Vec<u8>) -> Result<Option<Inbound>, ReadError> {
        Ok(Some(match (head.opcode, self.fragments.is_some()) {
            (OP_TEXT, false) if head.fin => text(payload)?,
            (OP_TEXT, false) => {
                self.fragments = Some(payload);
                return Ok(None);
            }
            (OP_CONTINUATION, true) => {
                let buf = self.fragments.as_mut().expect("checked by the match");
                buf.extend_from_slice(&payload);
                if !head.fin {
                    return Ok(None);
                }
                text(self.fragments.take().expect("checked by the match"))?
            }
            (OP_BINARY, false) => Inbound::Binary,
            (OP_PING, _) => Inbound::Ping(control(Frame::pong(payload.into()))),
            (OP_PONG, _) => Inbound::Pong,
            (OP_CLOSE, _) => Inbound::Close(close_echo(&payload)?),
            (OP_CONTINUATION, false) => {
                return Err(ReadError::Protocol("unexpected continuation frame"))
            }
            _ => {
                return Err(ReadError::Protocol(
                    "a new message started inside a fragmented one",
                ))
            }
        }))
    }
}

/// One read into `buf`; the end of the stream is an error here (we only
/// read when a frame is owed).
fn read_some<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    r: &mut R,
    buf: &mut [u8],
) -> Poll<Result<usize, ReadError>> {
    let mut rb = ReadBuf::new(buf);
    ready!(Pin::new(r).poll_read(cx, &mut rb))?;
    match rb.filled().len() {
        0 => Poll::Ready(Err(ReadError::Gone(
            std::io::ErrorKind::UnexpectedEof.into(),
        ))),
        n => Poll::Ready(Ok(n)),
    }
}

fn text(payload: Vec<u8>) -> Result<Inbound, ReadError> {
    match std::str::from_utf8(&payload) {
        Ok(_) => Ok(Inbound::Text(payload)),
        Err(_) => Err(ReadError::InvalidUtf8),
    }
}

/// The Close to echo: the peer's own code (RFC 6455 section 5.5.1), or an
/// error when its Close is malformed.
fn close_echo(payload: &[u8]) -> Result<bytes::Bytes, ReadError> {
    match payload {
        [] => Ok(control(Frame::close_raw(Vec::new().into()))),
        [_] => Err(ReadError::Protocol("close frame with a 1-byte body")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !close_code_allowed(code) {
                return Err(ReadError::Protocol("close code not allowed on the wire"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(ReadError::InvalidUtf8);
            }
            Ok(control(Frame::close(code, &[])))
        }
    }
}

/// Whether a peer may send `code` in a Close frame (RFC 6455 section 7.4
/// and the IANA registry it set up): the codes defined for the wire, the
/// registered 1012-1014, and 3000-4999 for libraries and applications.
/// 1004 is reserved, 1005, 1006 and 1015 must never be sent, and the rest
/// below 3000 are reserved for future versions.
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn control(frame: Frame<'_>) -> bytes::Bytes {
    crate::protocol::frame::control_frame(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_allowed_on_the_wire_follow_the_registry() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4000,
            4999,
        ] {
            assert!(close_code_allowed(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(!close_code_allowed(bad), "{bad}");
        }
    }

    /// A masked client frame, as a browser sends it.
    fn frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
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

    async fn read_all(input: Vec<u8>, max: usize) -> Vec<Result<Inbound, String>> {
        let mut r = FrameReader::new(max);
        let mut src = &input[..];
        let mut out = Vec::new();
        loop {
            match r.next(&mut src).await {
                Ok(m) => out.push(Ok(m)),
                Err(ReadError::Gone(_)) => return out,
                Err(e) => {
                    out.push(Err(format!("{:?}", e.close_code().map(|c| c.0))));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn text_in_one_frame_and_in_fragments_with_controls_between() {
        let mut input = frame(0x81, br#"{"op":"ping"}"#, [1, 2, 3, 4]);
        input.extend(frame(0x01, b"ab", [9, 9, 9, 9]));
        input.extend(frame(0x8A, b"", [0, 0, 0, 0])); // a pong between fragments
        input.extend(frame(0x80, b"c", [7, 0, 0, 0]));
        input.extend(frame(0x89, b"hi", [5, 6, 7, 8]));
        let got = read_all(input, 100).await;
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0], Ok(Inbound::Text(br#"{"op":"ping"}"#.to_vec())));
        assert_eq!(got[1], Ok(Inbound::Pong));
        assert_eq!(got[2], Ok(Inbound::Text(b"abc".to_vec())));
        assert_eq!(
            got[3],
            Ok(Inbound::Ping(control(Frame::pong(b"hi".to_vec().into()))))
        );
    }

    #[tokio::test]
    async fn sizes_are_checked_before_reading_the_payload() {
        let got = read_all(frame(0x81, &[b'a'; 10], [1, 1, 1, 1]), 10).await;
        assert_eq!(got, vec![Ok(Inbound::Text(vec![b'a'; 10]))]);
        let got = read_all(frame(0x81, &[b'a'; 11], [1, 1, 1, 1]), 10).await;
        assert_eq!(got, vec![Err("Some(1009)".into())]);
        // A header announcing 2^62 bytes with nothing behind it: refused, no allocation.
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 62).to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(read_all(huge, 4096).await, vec![Err("Some(1009)".into())]);
        // Fragments add up.
        let mut input = frame(0x01, &[b'a'; 6], [0; 4]);
        input.extend(frame(0x80, &[b'a'; 6], [0; 4]));
        assert_eq!(read_all(input, 10).await, vec![Err("Some(1009)".into())]);
        // 126 and 127 length forms.
        let got = read_all(frame(0x81, &[b'x'; 300], [3, 1, 4, 1]), 4096).await;
        assert_eq!(got, vec![Ok(Inbound::Text(vec![b'x'; 300]))]);
    }

    #[tokio::test]
    async fn control_frames_between_fragments_do_not_count_toward_the_limit() {
        let mut input = frame(0x01, &[b'a'; 8], [0; 4]);
        input.extend(frame(0x89, &[b'p'; 100], [1, 2, 3, 4]));
        input.extend(frame(0x80, &[b'a'; 2], [0; 4]));
        let got = read_all(input, 10).await;
        assert_eq!(
            got,
            vec![
                Ok(Inbound::Ping(control(Frame::pong(vec![b'p'; 100].into())))),
                Ok(Inbound::Text(vec![b'a'; 10]))
            ]
        );
    }

    #[tokio::test]
    async fn protocol_violations_close_with_1002_or_1007() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x81, 0x00], "Some(1002)"),               // unmasked
            (frame(0xC1, b"x", [0; 4]), "Some(1002)"),      // RSV1
            (frame(0x83, b"x", [0; 4]), "Some(1002)"),      // opcode 3
            (frame(0x80, b"x", [0; 4]), "Some(1002)"),      // continuation first
            (frame(0x09, b"x", [0; 4]), "Some(1002)"),      // fragmented ping
            (frame(0x89, &[0; 126], [0; 4]), "Some(1002)"), // long ping
            (frame(0x81, &[0xff, 0xfe], [0; 4]), "Some(1007)"),
            (frame(0x88, &[3], [0; 4]), "Some(1002)"), // 1-byte close body
            (frame(0x88, &1005u16.to_be_bytes(), [0; 4]), "Some(1002)"),
        ];
        for (input, want) in cases {
            let got = read_all(input.clone(), 4096).await;
            assert_eq!(got, vec![Err(want.to_string())], "{input:?}");
        }
        let mut nested = frame(0x01, b"a", [0; 4]);
        nested.extend(frame(0x81, b"b", [0; 4]));
        assert_eq!(read_all(nested, 4096).await, vec![Err("Some(1002)".into())]);
    }

    #[tokio::test]
    async fn close_is_echoed_with_the_peers_code() {
        let mut body = 1000u16.to_be_bytes().to_vec();
        body.extend_from_slice(b"bye");
        let got = read_all(frame(0x88, &body, [1, 2, 3, 4]), 4096).await;
        assert_eq!(
            got,
            vec![Ok(Inbound::Close(control(Frame::close(1000, &[]))))]
        );
        let got = read_all(frame(0x88, b"", [1, 2, 3, 4]), 4096).await;
        assert_eq!(
            got,
            vec![Ok(Inbound::Close(control(Frame::close_raw(
                Vec::new().into()
            ))))]
        );
    }

    /// Hands out one byte per poll and is pending in between: every
    /// boundary inside a frame is a point where a `select!` may drop `next`.
    struct Trickle(Vec<u8>, usize, bool);
    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.2 = !self.2;
            if self.2 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Some(&b) = self.0.get(self.1) {
                buf.put_slice(&[b]);
                self.1 += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn polling_anew_after_every_pending_loses_nothing() {
        let mut input = frame(0x01, b"sub", [1, 2, 3, 4]);
        input.extend(frame(0x89, b"p", [4, 3, 2, 1]));
        input.extend(frame(0x80, &[b'x'; 200], [9, 8, 7, 6]));
        let mut src = Trickle(input, 0, false);
        let mut r = FrameReader::new(4096);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut got = Vec::new();
        while got.len() < 2 {
            // A fresh poll every time, as after a cancelled `next` future.
            if let Poll::Ready(m) = r.poll_next(&mut cx, &mut src) {
                got.push(m.map_err(|e| format!("{e:?}")));
            }
        }
        let mut text = b"sub".to_vec();
        text.extend([b'x'; 200]);
        assert_eq!(
            got,
            vec![
                Ok(Inbound::Ping(control(Frame::pong(b"p".to_vec().into())))),
                Ok(Inbound::Text(text))
            ]
        );
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_the_peer_gone() {
        let input = frame(0x81, b"hello", [1, 2, 3, 4]);
        assert_eq!(read_all(input[..5].to_vec(), 4096).await, vec![]);
    }
}
