//! Server -> client bytes: every queued frame goes out in as few vectored
//! writes as the kernel allows (pre-encoded frames shared by refcount: no
//! per-subscriber JSON, no copy), each bounded by `--write-timeout` (past it
//! the client is a slow consumer), the Close frame after whatever is queued,
//! and the sent-bytes tallies.

use std::io::IoSlice;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::Frame;
use futures_util::FutureExt;
use smallvec::SmallVec;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_stream::StreamExt;

use super::{End, Session, Transport, CLOSE_LINGER, WRITE_BATCH_FRAMES};
use crate::protocol::frame::control_frame;

// Handles resolved once: the `counter!` macro looks the metric up in the
// registry on every call, too slow for once-per-write. Only touched by
// sessions, which start after `metrics::install`.
static FRAMES_SENT: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("marketcast_ws_frames_sent_total"));
static BYTES_SENT: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("marketcast_ws_bytes_sent_total"));
static WRITES: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("marketcast_ws_writes_total"));

/// This connection's frames, bytes and writes not yet added to the global
/// counters. Every flush adding to three atomics shared by all connections
/// made the two cores trade those cache lines thousands of times a second;
/// adding once per `SENT_EVERY` flushes (and at the end) keeps the totals
/// exact, just a little late.
#[derive(Default)]
pub(super) struct SentTally {
    frames: u64,
    bytes: u64,
    writes: u64,
    flushes: u32,
}

const SENT_EVERY: u32 = 64;

impl SentTally {
    pub(super) fn add(&mut self, frames: u64, bytes: u64, writes: u64) {
        self.frames += frames;
        self.bytes += bytes;
        self.writes += writes;
        self.flushes += 1;
        if self.flushes >= SENT_EVERY {
            self.publish();
        }
    }

    pub(super) fn publish(&mut self) {
        if self.flushes > 0 {
            FRAMES_SENT.increment(self.frames);
            BYTES_SENT.increment(self.bytes);
            WRITES.increment(self.writes);
            *self = SentTally::default();
        }
    }
}

impl Session {
    /// Take whatever live frames are already queued, up to one write's worth.
    pub(super) async fn coalesce(&mut self) -> Result<(), End> {
        while self.out.len() < WRITE_BATCH_FRAMES {
            match self.live.next().now_or_never() {
                Some(Some((id, item))) => self.on_live(id, item).await?,
                _ => break,
            }
        }
        Ok(())
    }

    /// Write every queued frame, in order, in as few syscalls as the kernel
    /// allows. Bounded by write_timeout: past it the client is a slow consumer.
    pub(super) async fn flush(&mut self) -> Result<(), End> {
        let frames = std::mem::take(&mut self.out);
        let timeout = self.ctx.cfg.write_timeout;
        let io = match &mut self.io {
            Transport::Ws(io) => io,
            Transport::Sse(out) => {
                // Boxed: the stream's send-with-timeout would otherwise size
                // every WebSocket session's future too (S3).
                return match Box::pin(out.write(&frames, timeout)).await {
                    Ok(false) => Ok(()),
                    // The subscription ended (`end` went out): so does the stream.
                    Ok(true) => Err(End::Gone),
                    Err(_stuck) => Err(End::Slow),
                };
            }
        };
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        let mut written = 0;
        let outcome = {
            let mut fut = std::pin::pin!(write_all_vectored(io, &frames, &mut written));
            // Most writes finish at once (the socket has room): only one the
            // kernel could not take whole arms the --write-timeout timer, and
            // boxed. A `timeout()` around every write read the clock once per
            // flush and kept a timer's room (hundreds of bytes) inline in
            // every session's future: S3 measured 4.6 KiB per idle
            // subscribed connection with it.
            match (&mut fut).now_or_never() {
                Some(done) => Ok(done),
                None => {
                    let expired = Box::pin(tokio::time::sleep(timeout));
                    tokio::select! {
                        done = &mut fut => Ok(done),
                        () = expired => Err(()),
                    }
                }
            }
        };
        match outcome {
            Ok(Ok(writes)) => {
                self.sent.add(frames.len() as u64, bytes as u64, writes);
                // Reuse the allocation unless a burst grew it.
                let mut frames = frames;
                frames.clear();
                if frames.capacity() <= WRITE_BATCH_FRAMES {
                    self.out = frames;
                }
                Ok(())
            }
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => {
                // The write stopped mid-stream. The Close that follows must not
                // land inside a half-written frame: keep that frame's tail.
                self.out = partial_tail(&frames, written).into_iter().collect();
                Err(End::Slow)
            }
        }
    }

    /// Best effort: queue a Close after whatever is queued, try for a while
    /// to get it out (a slow consumer may still drain its socket), then shut
    /// down the write side.
    pub(super) async fn close_now(&mut self, code: u16, reason: &str) {
        let w = match &mut self.io {
            Transport::Ws(io) => io,
            Transport::Sse(out) => {
                // What is queued, then the `end` event for the codes that
                // have one (docs/PROTOCOL.md, "SSE"); a slow consumer's
                // stream just ends.
                let frames = std::mem::take(&mut self.out);
                let t = Duration::from_secs(1);
                let end = match code {
                    1001 => Some((
                        "shutting_down",
                        "server shutting down; reconnect with Last-Event-ID",
                    )),
                    4001 => Some((
                        "token_expired",
                        "token expired; reconnect with a fresh token and Last-Event-ID",
                    )),
                    _ => None,
                };
                match end {
                    Some((code, message)) if out.write(&frames, t).await.is_ok() => {
                        out.end(code, message, t).await
                    }
                    _ => out.abort(),
                }
                self.sent_close = true;
                self.peer_closed = true;
                return;
            }
        };
        self.out
            .push(control_frame(Frame::close(code, reason.as_bytes())));
        let frames = std::mem::take(&mut self.out);
        self.sent_close = true;
        let mut written = 0;
        // A slow consumer may start reading again and deserves its code; at
        // shutdown the whole process waits, so the wait is short.
        let linger = if self.shutdown.is_cancelled() {
            Duration::from_secs(1)
        } else {
            CLOSE_LINGER
        };
        let _ = tokio::time::timeout(linger, async {
            write_all_vectored(w, &frames, &mut written).await?;
            w.shutdown().await
        })
        .await; // The peer may be gone or stuck; the connection ends either way.
    }
}

/// Most slices handed to one `writev` (Linux takes up to 1024). The array
/// is built on the stack inside each poll, never kept in the session's
/// future, so it costs an idle connection nothing; 256 frames of ~180 bytes
/// make one write of ~45 KiB, and a full batch (`WRITE_BATCH_FRAMES`) two.
const MAX_IOV: usize = 256;

/// Write all frames with vectored writes; returns the number of syscalls.
/// `written` counts bytes as they go out, so that a caller whose timeout
/// cancelled this future knows where the stream stopped.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Bytes],
    written: &mut usize,
) -> std::io::Result<u64> {
    let (mut i, mut off) = (0, 0); // first frame not fully written, bytes of it written
    let mut writes = 0;
    while i < frames.len() {
        let n = std::future::poll_fn(|cx| {
            // SmallVec, not an array: only the slices used are written (an
            // initialised [IoSlice; 256] was a 4 KiB memset per poll, 3% of
            // the fan-out CPU in perf).
            let iov: SmallVec<[IoSlice<'_>; MAX_IOV]> = frames[i..]
                .iter()
                .take(MAX_IOV)
                .enumerate()
                .map(|(k, f)| IoSlice::new(if k == 0 { &f[off..] } else { f }))
                .collect();
            std::pin::Pin::new(&mut *w).poll_write_vectored(cx, &iov)
        })
        .await?;
        writes += 1;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        *written += n;
        let mut left = n;
        while left > 0 {
            let rest = frames[i].len() - off;
            if left >= rest {
                left -= rest;
                i += 1;
                off = 0;
            } else {
                off += left;
                left = 0;
            }
        }
    }
    Ok(writes)
}

/// The unwritten rest of the frame that `written` bytes ended inside, if any.
fn partial_tail(frames: &[Bytes], written: usize) -> Option<Bytes> {
    let mut start = 0;
    for f in frames {
        let end = start + f.len();
        if written < end {
            return (written > start).then(|| f.slice(written - start..));
        }
        start = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn vectored_writes_survive_short_writes() {
        // A writer that takes at most 7 bytes per call, across frame borders.
        struct Dribble(Vec<u8>);
        impl AsyncWrite for Dribble {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                b: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let n = b.len().min(7);
                self.0.extend_from_slice(&b[..n]);
                std::task::Poll::Ready(Ok(n))
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
        }
        let frames: Vec<Bytes> = (0..100)
            .map(|i| Bytes::from(format!("frame-{i};")))
            .collect();
        let want: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        let mut w = Dribble(Vec::new());
        let mut written = 0;
        write_all_vectored(&mut w, &frames, &mut written)
            .await
            .unwrap();
        assert_eq!(w.0, want);
        assert_eq!(written, want.len());
    }

    #[test]
    fn partial_tails() {
        let f = [Bytes::from_static(b"abc"), Bytes::from_static(b"defg")];
        assert_eq!(partial_tail(&f, 0), None);
        assert_eq!(partial_tail(&f, 3), None, "a frame boundary");
        assert_eq!(partial_tail(&f, 1), Some(Bytes::from_static(b"bc")));
        assert_eq!(partial_tail(&f, 5), Some(Bytes::from_static(b"fg")));
        assert_eq!(partial_tail(&f, 7), None);
    }
}
