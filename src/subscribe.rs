//! `marketcast subscribe`: the reference client. Follows one market
//! (`--market`) or several over one connection (`--markets A,B`), prints each
//! message it is owed as one JSON line on stdout, exactly as received (each
//! `trade`, or with `--ticker MS` each `ticker` frame), resumes after any
//! disconnect or close with each market's own `from_seq`, and checks the
//! delivery guarantee itself, per market: a trade out of sequence, or a
//! ticker span that does not start right after the previous one, is a loud
//! error (exit 1), never a silent skip.
//!
//! # The conversation
//! Every connect sends one `subscribe` op right after the upgrade; the URL's
//! query is dropped. One market uses the single form
//! (`{"op":"subscribe","market":...}`), which a v1 broadcaster serves too;
//! several use the 1.1 `markets` form, one entry per market, in one op. The
//! `?market=` query form would do for one market, but one op for every case
//! keeps one code path. Each market's entry carries
//! - `from_seq` = its *position* once it has one: `--from-seq`, then the
//!   last seq printed (in ticker mode, the last `to_seq`), or, before any, the
//!   `from_seq` of its first `subscribed` (v1: `head_seq`);
//! - before that, `recent` with `--recent N`, or nothing (live from the head).
//!
//! So `recent` is asked on the first connect only, and no reconnect can
//! skip or repeat a trade. The rules live in [`Follower`], which takes
//! messages and returns what to do, without sockets; [`run`] moves bytes.
//!
//! # Tokens
//! `--token` goes in `Authorization: Bearer` on every connect (contract 1.1
//! §1.3). The client cannot get a fresh token, so each of these is [`Fatal`]
//! (§8): HTTP 401 or 403 at the upgrade, a `forbidden` or `invalid_token`
//! error, close 4001. The token is never logged or printed: the upgrade runs
//! with logging off, because tungstenite traces the whole request, headers
//! included, at trace level (`Request: ...` in its `handshake/client.rs`);
//! and server texts that the client quotes are searched for it.
//!
//! Only a [`Fatal`] error ends it; anything else (a refused connection, a
//! dropped socket, a retryable error reply, any other close) is retried with
//! backoff.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, Request};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::instrument::WithSubscriber;

use crate::backoff::Backoff;
use crate::config::{SubscribeConfig, SubscribeStart};

/// Why the client stopped for good: retrying cannot help.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// The server sent a trade, or a ticker span, out of sequence.
    #[error("delivery guarantee broken in {market}: got seq {got} after {last}")]
    Gap { market: String, last: i64, got: i64 },
    /// An error reply no retry can change (unknown market, pruned history...).
    #[error("server refused: {0}")]
    Refused(String),
    /// HTTP 401 or 403 at the upgrade: the token (or its absence, or the
    /// origin) is not accepted.
    #[error("the broadcaster refused the connection: HTTP {status}{}", code_suffix(.code))]
    Unauthorized { status: u16, code: Option<String> },
    /// A `forbidden` or `invalid_token` error: this token cannot read the market.
    #[error("the token was refused: {code} ({message})")]
    TokenRefused { code: String, message: String },
    /// Close 4001: the token expired, and this client cannot get another.
    #[error("the token expired (close 4001); start again with a fresh --token")]
    TokenExpired,
    /// The broadcaster ignored a contract 1.1 feature the client asked for.
    #[error("{0} needs a broadcaster that speaks contract 1.1")]
    NeedsProtocol11(&'static str),
}

fn code_suffix(code: &Option<String>) -> String {
    code.as_ref().map(|c| format!(" {c}")).unwrap_or_default()
}

/// While replaying a backlog, log progress every this many trades (stderr).
const PROGRESS_EVERY: i64 = 10_000;

/// Error codes after which retrying cannot help: the client would send the
/// same op again.
const FATAL: &[&str] = &[
    "unknown_market",
    "wrong_shard",
    "history_unavailable",
    "epoch_mismatch",
    "bad_request",
    "too_many_subscriptions",
];

/// Error codes that refuse the token; a new one is the only cure (§8).
const TOKEN_REFUSED: &[&str] = &["forbidden", "invalid_token"];

/// The WebSocket close code for an expired token (contract 1.1 §2.2).
const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// What to do with one message from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Print it as received.
    Print,
    /// Print it, then stop: `--count` is reached.
    PrintAndStop,
    /// Nothing to print.
    Skip,
    /// Reconnect and resume from each market's position.
    Resume,
}

/// One followed market.
#[derive(Debug)]
struct Followed {
    id: String,
    /// The last seq printed (ticker: the last `to_seq`), or where the
    /// subscription starts before any; None before the first `subscribed`
    /// when starting live or with `recent`.
    position: Option<i64>,
    /// The head at subscribe, while a backlog worth logging progress on is replayed.
    backlog_to: Option<i64>,
}

/// The client's rules without its sockets: the op each connect sends, and
/// what each message from the server means.
#[derive(Debug)]
pub struct Follower {
    markets: Vec<Followed>,
    start: SubscribeStart,
    ticker_ms: Option<u32>,
    count: Option<u64>,
    printed: u64,
    started: Instant,
    /// Only to cut out of server texts the client quotes; never sent from here.
    token: Option<String>,
}

impl Follower {
    pub fn new(cfg: &SubscribeConfig) -> Follower {
        let position = match cfg.start {
            SubscribeStart::FromSeq(f) => Some(f),
            SubscribeStart::Live | SubscribeStart::Recent(_) => None,
        };
        Follower {
            markets: cfg
                .markets
                .iter()
                .map(|id| Followed {
                    id: id.clone(),
                    position,
                    backlog_to: None,
                })
                .collect(),
            start: cfg.start,
            ticker_ms: cfg.ticker_ms,
            count: cfg.count,
            printed: 0,
            started: Instant::now(),
            token: cfg.token.clone(),
        }
    }

    /// The one op a connect sends: every market, each from its position.
    pub fn subscribe_op(&self) -> Value {
        let entry = |m: &Followed| {
            let mut e = Map::new();
            e.insert("market".into(), m.id.clone().into());
            match (m.position, self.start) {
                (Some(p), _) => {
                    e.insert("from_seq".into(), p.into());
                }
                (None, SubscribeStart::Recent(n)) => {
                    e.insert("recent".into(), n.into());
                }
                (None, _) => {}
            }
            if let Some(ms) = self.ticker_ms {
                e.insert("mode".into(), "ticker".into());
                e.insert("interval_ms".into(), ms.into());
            }
            e
        };
        match self.markets.as_slice() {
            [one] => {
                let mut op = entry(one);
                op.insert("op".into(), "subscribe".into());
                op.insert("id".into(), 1.into());
                Value::Object(op)
            }
            all => {
                let entries: Vec<Value> = all.iter().map(|m| Value::Object(entry(m))).collect();
                json!({"op": "subscribe", "markets": entries, "id": 1})
            }
        }
    }

    /// The position of `market`, if it is followed and has one.
    pub fn position(&self, market: &str) -> Option<i64> {
        self.markets
            .iter()
            .find(|m| m.id == market)
            .and_then(|m| m.position)
    }

    /// One text message from the server. An error is either [`Fatal`] or a
    /// malformed message (retried like a dropped connection).
    pub fn on_text(&mut self, text: &str) -> Result<Step> {
        let v: Value = serde_json::from_str(text).context("server sent invalid JSON")?;
        let market = v.get("market").and_then(Value::as_str);
        match v.get("type").and_then(Value::as_str) {
            Some("trade") => {
                if self.ticker_ms.is_some() {
                    // It ignored `mode`: a v1 server.
                    return Err(Fatal::NeedsProtocol11("--ticker").into());
                }
                let seq = v
                    .get("seq")
                    .and_then(Value::as_i64)
                    .context("trade without seq")?;
                let rate = self.printed as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
                let Some(m) = self.followed(market) else {
                    return Ok(Step::Skip);
                };
                check_next(m, seq)?;
                m.position = Some(seq);
                if m.backlog_to
                    .is_some_and(|h| seq % PROGRESS_EVERY == 0 && seq < h)
                {
                    tracing::info!(market = %m.id, seq, head_seq = m.backlog_to, trades_per_sec = rate as u64, "replaying backlog");
                }
                Ok(self.printed())
            }
            Some("ticker") if self.ticker_ms.is_some() => {
                let seq = |k: &str| {
                    v.get(k)
                        .and_then(Value::as_i64)
                        .with_context(|| format!("ticker without {k}"))
                };
                let (from, to) = (seq("from_seq")?, seq("to_seq")?);
                if to < from {
                    bail!("ticker span {from}..{to} is empty");
                }
                let Some(m) = self.followed(market) else {
                    return Ok(Step::Skip);
                };
                check_next(m, from)?;
                m.position = Some(to);
                Ok(self.printed())
            }
            Some("subscribed") => {
                let v11 = v.get("protocol").and_then(Value::as_str) == Some("1.1");
                let (start, several) = (self.start, self.markets.len() > 1);
                let ticker = self.ticker_ms.is_some();
                let Some(m) = self.followed(market) else {
                    return Ok(Step::Skip);
                };
                if !v11 {
                    // A v1 server ignored these fields and subscribed live
                    // from the head, in trades mode.
                    if ticker {
                        return Err(Fatal::NeedsProtocol11("--ticker").into());
                    }
                    if m.position.is_none() && matches!(start, SubscribeStart::Recent(_)) {
                        return Err(Fatal::NeedsProtocol11("--recent").into());
                    }
                    if several {
                        return Err(Fatal::NeedsProtocol11("--markets").into());
                    }
                }
                let head = v.get("head_seq").and_then(Value::as_i64);
                if m.position.is_none() {
                    // 1.1 says where it starts (`recent`); v1 starts at the head.
                    m.position = v.get("from_seq").and_then(Value::as_i64).or(head);
                }
                m.backlog_to =
                    head.filter(|h| h.saturating_sub(m.position.unwrap_or(*h)) > PROGRESS_EVERY);
                // Options are logged as plain values, and left out when absent.
                tracing::info!(market = %m.id, head_seq = head, from = m.position, "subscribed");
                Ok(Step::Skip)
            }
            Some("error") => {
                let code = v.get("code").and_then(Value::as_str).unwrap_or("");
                if TOKEN_REFUSED.contains(&code) {
                    let message = v.get("message").and_then(Value::as_str).unwrap_or("");
                    let message = match market {
                        Some(m) => format!("{m}: {message}"),
                        None => message.to_string(),
                    };
                    return Err(Fatal::TokenRefused {
                        code: code.to_string(),
                        message: self.quote(&message),
                    }
                    .into());
                }
                if FATAL.contains(&code) {
                    return Err(Fatal::Refused(self.quote(text)).into());
                }
                tracing::warn!(text = %self.quote(text), "server error; resuming");
                Ok(Step::Resume)
            }
            _ => Ok(Step::Skip),
        }
    }

    /// The connection closed with `code`: Ok means resume.
    pub fn on_close(&self, code: Option<u16>) -> Result<(), Fatal> {
        match code {
            Some(CLOSE_TOKEN_EXPIRED) => Err(Fatal::TokenExpired),
            _ => Ok(()),
        }
    }

    fn followed(&mut self, market: Option<&str>) -> Option<&mut Followed> {
        let m = self.markets.iter_mut().find(|m| Some(&*m.id) == market);
        if m.is_none() {
            tracing::warn!(market, "a message for a market not followed; ignored");
        }
        m
    }

    /// Count one printed message.
    fn printed(&mut self) -> Step {
        self.printed += 1;
        if self.count.is_some_and(|c| self.printed >= c) {
            Step::PrintAndStop
        } else {
            Step::Print
        }
    }

    /// A server text, safe to log or print: the token cut out, should a
    /// server ever echo it (the contract says it never does).
    fn quote(&self, text: &str) -> String {
        match &self.token {
            Some(t) => text.replace(t.as_str(), "<token>"),
            None => text.to_string(),
        }
    }
}

/// The guarantee for one market: what comes next starts at position + 1.
fn check_next(m: &Followed, first: i64) -> Result<(), Fatal> {
    match m.position {
        // checked: a seq is the server's word, and i64::MAX + 1 must not panic.
        Some(last) if last.checked_add(1) != Some(first) => Err(Fatal::Gap {
            market: m.id.clone(),
            last,
            got: first,
        }),
        _ => Ok(()),
    }
}

/// The upgrade request: the URL without its query, and the token.
fn upgrade_request(cfg: &SubscribeConfig) -> Result<Request<()>> {
    let mut url = url::Url::parse(&cfg.url).context("subscribe URL")?;
    url.set_query(None);
    let mut req = url
        .as_str()
        .into_client_request()
        .context("subscribe URL")?;
    if let Some(t) = &cfg.token {
        // The error does not quote the value.
        let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
            .context("--token is not a header value")?;
        v.set_sensitive(true);
        req.headers_mut().insert(header::AUTHORIZATION, v);
    }
    Ok(req)
}

/// A failed upgrade: 401 and 403 are [`Fatal`], the rest is retried.
fn upgrade_error(e: tungstenite::Error) -> anyhow::Error {
    if let tungstenite::Error::Http(resp) = &e {
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            // `{"error":{"code":"invalid_token",...}}`; only a plain code word is repeated.
            let code = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
                .filter(|c| {
                    c.len() <= 40 && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                });
            return Fatal::Unauthorized { status, code }.into();
        }
    }
    anyhow::Error::new(e).context("connecting")
}

/// How one connection ended, when not with an error.
enum End {
    /// `--count` reached, or shutdown.
    Done,
    /// Reconnect and resume.
    Resume,
}

pub async fn run(
    cfg: SubscribeConfig,
    shutdown: CancellationToken,
    mut out: impl std::io::Write,
) -> Result<()> {
    let mut follower = Follower::new(&cfg);
    let mut backoff = Backoff::new(Duration::from_millis(100), cfg.reconnect_max);
    loop {
        match connection(&cfg, &mut follower, &shutdown, &mut out, &mut backoff).await {
            Ok(End::Done) => return Ok(()),
            Ok(End::Resume) => {}
            Err(e) if e.is::<Fatal>() => return Err(e),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "connection failed; retrying"),
        }
        if !backoff.sleep(&shutdown).await {
            return Ok(());
        }
    }
}

/// One connection: connect, subscribe, print until it ends.
async fn connection(
    cfg: &SubscribeConfig,
    follower: &mut Follower,
    shutdown: &CancellationToken,
    out: &mut impl std::io::Write,
    backoff: &mut Backoff,
) -> Result<End> {
    let req = upgrade_request(cfg)?;
    // Logging off for the upgrade: tungstenite traces the request, token included.
    let connecting = tokio_tungstenite::connect_async(req)
        .with_subscriber(tracing::subscriber::NoSubscriber::default());
    // Cancel safety: dropping a connect attempt abandons only that attempt.
    let mut ws = tokio::select! {
        r = connecting => r.map_err(upgrade_error)?.0,
        _ = shutdown.cancelled() => return Ok(End::Done),
    };
    backoff.reset();
    let op = follower.subscribe_op().to_string();
    ws.send(Message::Text(op.into()))
        .await
        .context("sending the subscribe")?;
    loop {
        // Cancel safety: tungstenite's StreamExt::next and the token are cancel-safe.
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = shutdown.cancelled() => {
                let _ = ws.close(None).await; // leaving anyway
                return Ok(End::Done);
            }
        };
        let Some(msg) = msg else {
            return Ok(End::Resume);
        };
        let text = match msg.context("reading")? {
            Message::Text(t) => t,
            Message::Close(c) => {
                let code = c.as_ref().map(|c| u16::from(c.code));
                follower.on_close(code)?;
                let reason = c
                    .as_ref()
                    .map(|c| c.reason.as_str())
                    .filter(|r| !r.is_empty());
                tracing::info!(
                    close_code = code,
                    reason,
                    "server closed the connection; resuming"
                );
                return Ok(End::Resume);
            }
            _ => continue,
        };
        match follower.on_text(&text)? {
            Step::Skip => {}
            Step::Resume => return Ok(End::Resume),
            step @ (Step::Print | Step::PrintAndStop) => {
                writeln!(out, "{text}")?;
                out.flush()?;
                if step == Step::PrintAndStop {
                    let _ = ws.close(None).await; // done
                    return Ok(End::Done);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(markets: &[&str], start: SubscribeStart) -> SubscribeConfig {
        SubscribeConfig {
            markets: markets.iter().map(|m| m.to_string()).collect(),
            start,
            ..SubscribeConfig::default()
        }
    }

    fn fatal(r: Result<Step>) -> Fatal {
        r.expect_err("fatal")
            .downcast::<Fatal>()
            .expect("a Fatal error")
    }

    fn subscribed(market: &str, head: i64, from: i64) -> String {
        json!({"type":"subscribed","id":1,"market":market,"epoch":"e1","head_seq":head,
               "last_price":null,"volume":0,"from_seq":from,"mode":"trades","heads":false,"protocol":"1.1"})
        .to_string()
    }

    fn trade(market: &str, seq: i64) -> String {
        json!({"type":"trade","market":market,"seq":seq,"trade_id":seq,"side":"yes","price":"0.5000","qty":1,"ts":"2026-11-27T05:31:02.123456Z"}).to_string()
    }

    fn ticker(market: &str, from: i64, to: i64) -> String {
        json!({"type":"ticker","market":market,"from_seq":from,"to_seq":to,"count":to-from+1,"qty":1,"volume":1,
               "open":"0.5000","high":"0.5000","low":"0.5000","last_price":"0.5000","ts":"2026-11-27T05:31:02.123456Z"})
        .to_string()
    }

    #[test]
    fn one_market_uses_the_single_form_and_resumes_after_its_last_seq() {
        let mut f = Follower::new(&cfg(&["A"], SubscribeStart::Live));
        assert_eq!(
            f.subscribe_op(),
            json!({"op":"subscribe","market":"A","id":1})
        );
        assert_eq!(f.on_text(&subscribed("A", 7, 7)).unwrap(), Step::Skip);
        assert_eq!(f.on_text(&trade("A", 8)).unwrap(), Step::Print);
        assert_eq!(
            f.subscribe_op(),
            json!({"op":"subscribe","market":"A","from_seq":8,"id":1})
        );
    }

    #[test]
    fn several_markets_go_in_one_op_each_from_its_own_position() {
        let mut f = Follower::new(&cfg(&["A", "B"], SubscribeStart::Recent(5)));
        assert_eq!(
            f.subscribe_op(),
            json!({"op":"subscribe","markets":[{"market":"A","recent":5},{"market":"B","recent":5}],"id":1})
        );
        f.on_text(&subscribed("A", 20, 15)).unwrap();
        f.on_text(&trade("A", 16)).unwrap();
        f.on_text(&trade("A", 17)).unwrap();
        // B's reply never came before the drop: it asks for `recent` again.
        assert_eq!(
            f.subscribe_op(),
            json!({"op":"subscribe","markets":[{"market":"A","from_seq":17},{"market":"B","recent":5}],"id":1})
        );
        f.on_text(&subscribed("B", 3, 0)).unwrap();
        assert_eq!(
            f.subscribe_op()["markets"][1],
            json!({"market":"B","from_seq":0})
        );
        // Each market's guarantee is its own.
        assert_eq!(f.on_text(&trade("B", 1)).unwrap(), Step::Print);
        assert_eq!(f.on_text(&trade("A", 18)).unwrap(), Step::Print);
        match fatal(f.on_text(&trade("B", 3))) {
            Fatal::Gap { market, last, got } => {
                assert_eq!((market.as_str(), last, got), ("B", 1, 3))
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_trade_out_of_sequence_is_fatal() {
        let mut f = Follower::new(&cfg(&["A"], SubscribeStart::FromSeq(4)));
        assert_eq!(
            f.subscribe_op(),
            json!({"op":"subscribe","market":"A","from_seq":4,"id":1})
        );
        f.on_text(&subscribed("A", 9, 4)).unwrap();
        f.on_text(&trade("A", 5)).unwrap();
        assert!(matches!(
            fatal(f.on_text(&trade("A", 5))),
            Fatal::Gap {
                last: 5,
                got: 5,
                ..
            }
        ));
        let mut f = Follower::new(&cfg(&["A"], SubscribeStart::FromSeq(i64::MAX - 1)));
        f.on_text(&trade("A", i64::MAX)).unwrap();
        assert!(
            matches!(fatal(f.on_text(&trade("A", i64::MIN))), Fatal::Gap { .. }),
            "no overflow panic"
        );
    }

    #[test]
    fn ticker_spans_must_be_contiguous_and_resume_after_the_last_to_seq() {
        let mut c = cfg(&["A"], SubscribeStart::Live);
        c.ticker_ms = Some(250);
        c.count = Some(3);
        let mut f = Follower::new(&c);
        assert_eq!(
            f.subscribe_op(),
            json!({"op":"subscribe","market":"A","mode":"ticker","interval_ms":250,"id":1})
        );
        f.on_text(&subscribed("A", 10, 10)).unwrap();
        assert_eq!(f.on_text(&ticker("A", 11, 14)).unwrap(), Step::Print);
        assert_eq!(f.on_text(&ticker("A", 15, 15)).unwrap(), Step::Print);
        assert_eq!(
            f.subscribe_op(),
            json!({"op":"subscribe","market":"A","from_seq":15,"mode":"ticker","interval_ms":250,"id":1})
        );
        assert!(
            f.on_text(&ticker("A", 18, 16)).is_err(),
            "an empty span is malformed"
        );
        assert!(matches!(
            fatal(f.on_text(&ticker("A", 17, 20))),
            Fatal::Gap {
                last: 15,
                got: 17,
                ..
            }
        ));
        assert_eq!(
            f.on_text(&ticker("A", 16, 20)).unwrap(),
            Step::PrintAndStop,
            "--count counts frames"
        );
        assert!(matches!(
            fatal(f.on_text(&trade("A", 21))),
            Fatal::NeedsProtocol11("--ticker")
        ));
    }

    #[test]
    fn a_v1_broadcaster_is_refused_only_for_what_it_ignores() {
        let v1 = json!({"type":"subscribed","id":1,"market":"A","epoch":"e1","head_seq":9,"last_price":null,"volume":0}).to_string();
        let mut f = Follower::new(&cfg(&["A"], SubscribeStart::Live));
        assert_eq!(f.on_text(&v1).unwrap(), Step::Skip);
        assert_eq!(f.position("A"), Some(9), "v1: live from head_seq");
        let mut f = Follower::new(&cfg(&["A"], SubscribeStart::Recent(5)));
        assert!(matches!(
            fatal(f.on_text(&v1)),
            Fatal::NeedsProtocol11("--recent")
        ));
        let mut f = Follower::new(&cfg(&["A", "B"], SubscribeStart::Live));
        assert!(matches!(
            fatal(f.on_text(&v1)),
            Fatal::NeedsProtocol11("--markets")
        ));
    }

    #[test]
    fn token_refusals_and_4001_are_fatal_other_closes_resume() {
        let mut c = cfg(&["A"], SubscribeStart::Live);
        c.token = Some("tok-secret-123".into());
        let mut f = Follower::new(&c);
        for code in ["forbidden", "invalid_token"] {
            let e = json!({"type":"error","id":1,"market":"A","code":code,"message":"not for tok-secret-123"});
            let err = fatal(f.on_text(&e.to_string()));
            assert!(matches!(&err, Fatal::TokenRefused { code: c, .. } if c == code));
            let shown = err.to_string();
            assert!(
                !shown.contains("tok-secret-123") && shown.contains("<token>"),
                "{shown}"
            );
        }
        assert!(matches!(f.on_close(Some(4001)), Err(Fatal::TokenExpired)));
        for code in [None, Some(1000), Some(1001), Some(1011), Some(4000)] {
            assert!(f.on_close(code).is_ok(), "{code:?} resumes");
        }
        let unavailable =
            json!({"type":"error","id":1,"market":"A","code":"unavailable","message":"db"});
        assert_eq!(f.on_text(&unavailable.to_string()).unwrap(), Step::Resume);
        let unknown =
            json!({"type":"error","id":1,"market":"A","code":"unknown_market","message":"no"});
        assert!(matches!(
            fatal(f.on_text(&unknown.to_string())),
            Fatal::Refused(_)
        ));
    }

    #[test]
    fn the_upgrade_carries_the_token_and_no_query() {
        let mut c = cfg(&["A"], SubscribeStart::Live);
        c.url = "ws://127.0.0.1:9/ws?market=X&token=other".into();
        c.token = Some("tok-secret-123".into());
        let req = upgrade_request(&c).unwrap();
        assert_eq!(req.uri().to_string(), "ws://127.0.0.1:9/ws");
        let auth = &req.headers()[header::AUTHORIZATION];
        assert_eq!(auth.as_bytes(), b"Bearer tok-secret-123");
        assert!(auth.is_sensitive());
        assert!(
            !format!("{c:?}").contains("tok-secret-123"),
            "config Debug hides it"
        );
    }

    #[test]
    fn an_upgrade_refused_with_401_or_403_is_fatal() {
        let refused = |status: u16, body: &str| {
            let resp = tungstenite::http::Response::builder()
                .status(status)
                .body(Some(body.as_bytes().to_vec()))
                .unwrap();
            upgrade_error(tungstenite::Error::Http(Box::new(resp)))
        };
        let e = refused(
            401,
            r#"{"error":{"code":"invalid_token","message":"expired"}}"#,
        );
        assert!(
            matches!(e.downcast_ref::<Fatal>(), Some(Fatal::Unauthorized { status: 401, code: Some(c) }) if c == "invalid_token")
        );
        let e = refused(403, "not json");
        assert!(matches!(
            e.downcast_ref::<Fatal>(),
            Some(Fatal::Unauthorized {
                status: 403,
                code: None
            })
        ));
        assert!(!refused(503, "").is::<Fatal>(), "retried");
    }
}
