//! The session's other transport: a Server-Sent Events response
//! (docs/PROTOCOL.md, "SSE"). A stream is one subscription run by the same
//! session code as a WebSocket (fills, ticker, heads, token expiry,
//! shutdown), whose ready frames are turned into events at write time:
//! `trade` and `ticker` carry `id:` (the seq, or `to_seq`), so a browser's
//! `Last-Event-ID` is always its position; `subscribed` and `head` carry
//! none; an `error` ends the stream with an `end` event. Nothing is read
//! from the client.
//!
//! Events go to the response body through a small channel. hyper polls the
//! body only while the socket takes bytes, so a client that stops reading
//! fills the channel; a send still blocked after `--write-timeout` ends the
//! stream without an `end` event, and the body then fails, which makes
//! hyper drop the connection rather than hold it for a client that never
//! reads.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::Frame;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Chunks (one per flush) queued between the session and the body.
const CHANNEL: usize = 8;

/// The session's end of an SSE response.
pub(crate) struct SseOut {
    tx: Option<mpsc::Sender<Bytes>>,
    /// Cancelled when the stream must end without finishing the body (a
    /// stuck client): the body yields an error and hyper drops the socket.
    abort: CancellationToken,
    /// When something (an event or a comment) last went out.
    last_write: Instant,
}

/// The response body's end.
pub(crate) struct SseBody {
    rx: mpsc::Receiver<Bytes>,
    abort: CancellationToken,
    aborted: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

/// A new stream: the session's end and the body's.
pub(crate) fn channel() -> (SseOut, SseBody) {
    let (tx, rx) = mpsc::channel(CHANNEL);
    let abort = CancellationToken::new();
    let out = SseOut {
        tx: Some(tx),
        abort: abort.clone(),
        last_write: Instant::now(),
    };
    let body = SseBody {
        rx,
        aborted: Box::pin(abort.clone().cancelled_owned()),
        abort,
    };
    (out, body)
}

/// Why the stream could not take more.
#[derive(Debug)]
pub(crate) struct Stuck;

impl SseOut {
    async fn send(&mut self, chunk: Bytes, timeout: Duration) -> Result<(), Stuck> {
        let Some(tx) = &self.tx else {
            return Err(Stuck);
        };
        match tokio::time::timeout(timeout, tx.send(chunk)).await {
            Ok(Ok(())) => {
                self.last_write = Instant::now();
                Ok(())
            }
            // The body was dropped (the client went away), or the client
            // has not read for `timeout`.
            _ => Err(Stuck),
        }
    }

    /// Write ready WebSocket frames as events. Ok(true): the stream ended
    /// (an `end` event went out).
    pub(crate) async fn write(
        &mut self,
        frames: &[Bytes],
        timeout: Duration,
    ) -> Result<bool, Stuck> {
        let mut chunk = BytesMut::new();
        let mut ended = false;
        for f in frames {
            if let Some(payload) = text_payload(f) {
                ended |= event(&mut chunk, payload);
            }
            if ended {
                break;
            }
        }
        if !chunk.is_empty() {
            self.send(chunk.freeze(), timeout).await?;
        }
        Ok(ended)
    }

    /// The keep-alive comment, when nothing went out for `every`.
    pub(crate) async fn keepalive(
        &mut self,
        every: Duration,
        timeout: Duration,
    ) -> Result<(), Stuck> {
        if self.last_write.elapsed() >= every {
            self.send(Bytes::from_static(b":\n\n"), timeout).await?;
        }
        Ok(())
    }

    /// The last event before the stream ends (`token_expired`,
    /// `shutting_down`), best effort within `timeout`.
    pub(crate) async fn end(&mut self, code: &str, message: &str, timeout: Duration) {
        let data = serde_json::json!({"type": "end", "code": code, "message": message});
        let chunk = format!("event: end\ndata: {data}\n\n");
        let _ = self.send(Bytes::from(chunk), timeout).await; // the client may be gone
        self.tx = None;
    }

    /// End without an `end` event, failing the body so the socket is dropped.
    pub(crate) fn abort(&mut self) {
        self.tx = None;
        self.abort.cancel();
    }
}

/// The JSON text of an unmasked server text frame (the session's frames are
/// always whole and unfragmented); None for anything else.
fn text_payload(frame: &[u8]) -> Option<&[u8]> {
    if frame.len() < 2 || frame[0] != 0x81 {
        return None;
    }
    let (len, at): (usize, usize) = match frame[1] & 0x7f {
        126 => (
            u16::from_be_bytes([*frame.get(2)?, *frame.get(3)?]) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(frame.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    frame.get(at..at.checked_add(len)?)
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    seq: Option<i64>,
    to_seq: Option<i64>,
    #[serde(borrow, default)]
    code: Option<&'a str>,
}

/// Append the event for one server message. True when it ends the stream
/// (an error: the subscription is over, e.g. `history_unavailable`).
fn event(out: &mut BytesMut, json: &[u8]) -> bool {
    let Ok(p) = serde_json::from_slice::<Peek>(json) else {
        return false;
    };
    let id = match p.kind {
        "trade" => p.seq,
        "ticker" => p.to_seq,
        _ => None,
    };
    if let Some(id) = id {
        out.put_slice(format!("id: {id}\n").as_bytes());
    }
    match p.kind {
        "error" => {
            // {"type":"error",...} becomes {"type":"end",...}: same fields.
            let mut v: serde_json::Value = match serde_json::from_slice(json) {
                Ok(v) => v,
                Err(_) => return true,
            };
            v["type"] = "end".into();
            if let Some(o) = v.as_object_mut() {
                o.remove("id");
                o.remove("market");
            }
            let _ = p.code;
            out.put_slice(format!("event: end\ndata: {v}\n\n").as_bytes());
            true
        }
        kind => {
            out.put_slice(b"event: ");
            out.put_slice(kind.as_bytes());
            out.put_slice(b"\ndata: ");
            out.put_slice(json);
            out.put_slice(b"\n\n");
            false
        }
    }
}

/// An SSE body ended on purpose without its `end`: hyper drops the socket.
#[derive(Debug, thiserror::Error)]
#[error("the SSE stream was abandoned")]
pub(crate) struct Abandoned;

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.abort.is_cancelled() || self.aborted.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(Abandoned))));
        }
        self.rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::text_frame;

    fn events(jsons: &[&str]) -> (String, bool) {
        let mut out = BytesMut::new();
        let mut ended = false;
        for j in jsons {
            let f = text_frame(j.as_bytes());
            ended |= event(&mut out, text_payload(&f).unwrap());
        }
        (String::from_utf8(out.to_vec()).unwrap(), ended)
    }

    #[test]
    fn trades_and_tickers_carry_their_position_as_the_event_id() {
        let (s, ended) = events(&[
            r#"{"type":"subscribed","market":"M","head_seq":3}"#,
            r#"{"type":"trade","market":"M","seq":4}"#,
            r#"{"type":"ticker","market":"M","from_seq":5,"to_seq":9}"#,
            r#"{"type":"head","market":"M","head_seq":9}"#,
        ]);
        assert!(!ended);
        assert_eq!(
            s,
            "event: subscribed\ndata: {\"type\":\"subscribed\",\"market\":\"M\",\"head_seq\":3}\n\n\
             id: 4\nevent: trade\ndata: {\"type\":\"trade\",\"market\":\"M\",\"seq\":4}\n\n\
             id: 9\nevent: ticker\ndata: {\"type\":\"ticker\",\"market\":\"M\",\"from_seq\":5,\"to_seq\":9}\n\n\
             event: head\ndata: {\"type\":\"head\",\"market\":\"M\",\"head_seq\":9}\n\n"
        );
    }

    #[test]
    fn an_error_ends_the_stream_with_an_end_event() {
        let (s, ended) = events(&[
            r#"{"type":"error","code":"history_unavailable","message":"pruned","earliest_seq":7,"market":"M"}"#,
        ]);
        assert!(ended);
        assert!(s.starts_with("event: end\ndata: {"), "{s}");
        let data: serde_json::Value =
            serde_json::from_str(s.trim_end().strip_prefix("event: end\ndata: ").unwrap()).unwrap();
        assert_eq!(data["type"], "end");
        assert_eq!(data["code"], "history_unavailable");
        assert_eq!(data["earliest_seq"], 7);
    }

    #[test]
    fn frames_of_every_length_are_read_whole() {
        for n in [0usize, 125, 126, 65535, 65536] {
            let p = vec![b'x'; n];
            assert_eq!(text_payload(&text_frame(&p)), Some(&p[..]), "{n}");
        }
        assert_eq!(text_payload(&[0x81]), None);
        assert_eq!(text_payload(&[0x88, 0]), None, "not a text frame");
    }
}
