//! The live side of a subscription: a receiver of the market's trade queue,
//! or of its ticker group's frames, polled together in one `StreamMap`.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::Stream;

use crate::protocol::ticker::TickerFrame;
use crate::protocol::trade::EncodedTrade;

pub(crate) enum LiveStream {
    Trades(BroadcastStream<EncodedTrade>),
    Ticker(BroadcastStream<TickerFrame>),
}

/// One item of a live stream. `Err` is a lag: the receiver fell further
/// behind than its queue holds; the next item is above the position and
/// the gap is filled from the ring or the log.
pub(crate) enum LiveItem {
    Trade(Result<EncodedTrade, BroadcastStreamRecvError>),
    Ticker(Result<TickerFrame, BroadcastStreamRecvError>),
}

impl Stream for LiveStream {
    type Item = LiveItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LiveItem>> {
        match self.get_mut() {
            LiveStream::Trades(s) => Pin::new(s).poll_next(cx).map(|o| o.map(LiveItem::Trade)),
            LiveStream::Ticker(s) => Pin::new(s).poll_next(cx).map(|o| o.map(LiveItem::Ticker)),
        }
    }
}
