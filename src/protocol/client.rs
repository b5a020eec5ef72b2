//! The WebSocket API's client side of the conversation: the ops a client
//! sends (and the subscribe a URL's query makes at connect time), parsed
//! strictly, and the replies the server sends back, as frames.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::frame::json_frame;
use super::market::Market;

/// The one rule for `from_seq`, wherever it comes from: an integer
/// `0 <= f < 2^63-1`. i64::MAX is refused too: the first seq owed,
/// `from_seq + 1`, must exist as an i64 (it overflowed: a panic in debug
/// builds).
pub fn from_seq(f: i64) -> Option<i64> {
    (0..i64::MAX).contains(&f).then_some(f)
}

/// The message of a `bad_request` for a `from_seq` outside [`from_seq`].
const FROM_SEQ_RULE: &str = "from_seq must be an integer >= 0";

/// How a subscription delivers (docs/PROTOCOL.md, "Ticker mode").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every trade, as a `trade` frame (v1).
    Trades,
    /// At most one `ticker` frame per interval, folding every trade.
    Ticker { interval_ms: u32 },
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Trades => "trades",
            Mode::Ticker { .. } => "ticker",
        }
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Live from the head as the subscribe reads it.
    Head,
    /// After this seq (`from_seq`).
    After(i64),
    /// The newest N trades, then live (`recent`).
    Recent(u32),
}

/// One market of a subscribe op: the single form's fields, or one entry of
/// `markets` (docs/PROTOCOL.md, "Several markets in one op").
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub market: String,
    pub start: Start,
    pub epoch: Option<String>,
    pub mode: Mode,
    pub heads: bool,
}

impl Entry {
    /// A v1 subscribe: live or after `from_seq`, trades, no heads.
    pub fn v1(market: impl Into<String>, from_seq: Option<i64>) -> Self {
        Entry {
            market: market.into(),
            start: from_seq.map_or(Start::Head, Start::After),
            epoch: None,
            mode: Mode::Trades,
            heads: false,
        }
    }
}

/// The bounds an op is checked against (from the broadcaster's options):
/// a value outside them is `bad_request`, a `markets` list longer than
/// `max_subscriptions` is `too_many_subscriptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `--max-subscriptions`.
    pub max_subscriptions: usize,
    /// `--max-recent`: the upper bound of `recent`.
    pub max_recent: u32,
    /// `--min-ticker-interval` in ms: the lower bound of `interval_ms`.
    pub min_interval_ms: u32,
}

/// The contract's fixed upper bound of `interval_ms`.
pub const MAX_INTERVAL_MS: u32 = 60_000;
/// `interval_ms` when a ticker subscribe gives none.
pub const DEFAULT_INTERVAL_MS: u32 = 1000;

/// A client op, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// One entry for the single form, one per element of `markets`.
    Subscribe {
        entries: Vec<Entry>,
        id: Option<Value>,
    },
    Unsubscribe {
        markets: Vec<String>,
        id: Option<Value>,
    },
    /// Authenticate or refresh in place (docs/PROTOCOL.md, "auth").
    Auth {
        token: String,
        id: Option<Value>,
    },
    Ping {
        id: Option<Value>,
    },
}

/// An `error` reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorReply {
    pub id: Option<Value>,
    pub code: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
}

impl ErrorReply {
    pub fn new(id: Option<Value>, code: &'static str, message: impl Into<String>) -> Self {
        ErrorReply {
            id,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }
    /// An extra field of the error (`shard`, `url`, `earliest_seq`, ...).
    pub fn with(mut self, k: &str, v: Value) -> Self {
        self.extra.insert(k.to_string(), v);
        self
    }
    /// The `error` message as a frame.
    pub fn frame(&self) -> Bytes {
        let mut m = Map::new();
        m.insert("type".into(), "error".into());
        if let Some(id) = &self.id {
            m.insert("id".into(), id.clone());
        }
        m.insert("code".into(), self.code.into());
        m.insert("message".into(), self.message.clone().into());
        m.extend(self.extra.clone());
        json_frame(&Value::Object(m))
    }
}

/// The optional fields of a subscribe (an op, an entry of `markets`, or the
/// URL's query), typed but not yet checked against each other or the limits.
#[derive(Debug, Default)]
struct Fields {
    from_seq: Option<i64>,
    recent: Option<i64>,
    epoch: Option<String>,
    mode: Option<String>,
    interval_ms: Option<i64>,
    heads: Option<bool>,
}

/// The keys of [`Fields`]: next to `markets` they make the op `bad_request`.
const ENTRY_KEYS: [&str; 6] = [
    "from_seq",
    "recent",
    "epoch",
    "mode",
    "interval_ms",
    "heads",
];

impl Fields {
    /// From a JSON object; `null` counts as absent; a wrong type is an error.
    fn from_json(o: &Map<String, Value>) -> Result<Fields, String> {
        let int = |k: &str| match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| format!("{k} must be an integer in range")),
            Some(_) => Err(format!("{k} must be an integer")),
        };
        let string = |k: &str| match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{k} must be a string")),
        };
        Ok(Fields {
            from_seq: int("from_seq").map_err(|_| FROM_SEQ_RULE.to_string())?,
            recent: int("recent")?,
            epoch: string("epoch")?,
            mode: string("mode")?,
            interval_ms: int("interval_ms")?,
            heads: match o.get("heads") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(_) => return Err("heads must be true or false".into()),
            },
        })
    }

    /// Checked against each other and the limits: the entry for `market`.
    fn entry(self, market: String, limits: &Limits) -> Result<Entry, String> {
        let from_seq = match self.from_seq {
            None => None,
            Some(f) => Some(from_seq(f).ok_or(FROM_SEQ_RULE)?),
        };
        let start = match (from_seq, self.recent) {
            (Some(_), Some(_)) => return Err("from_seq and recent exclude each other".into()),
            (Some(f), None) => Start::After(f),
            (None, Some(n)) if (1..=limits.max_recent as i64).contains(&n) => {
                Start::Recent(n as u32)
            }
            (None, Some(_)) => {
                return Err(format!(
                    "recent must be an integer from 1 to {}",
                    limits.max_recent
                ))
            }
            (None, None) => Start::Head,
        };
        let mode = match (self.mode.as_deref(), self.interval_ms) {
            (None | Some("trades"), None) => Mode::Trades,
            (None | Some("trades"), Some(_)) => {
                return Err("interval_ms is for \"mode\":\"ticker\" only".into())
            }
            (Some("ticker"), ms) => {
                let ms = ms.unwrap_or(DEFAULT_INTERVAL_MS as i64);
                let (lo, hi) = (limits.min_interval_ms, MAX_INTERVAL_MS);
                if !(lo as i64..=hi as i64).contains(&ms) {
                    return Err(format!("interval_ms must be an integer from {lo} to {hi}"));
                }
                Mode::Ticker {
                    interval_ms: ms as u32,
                }
            }
            (Some(_), _) => return Err("mode must be \"trades\" or \"ticker\"".into()),
        };
        Ok(Entry {
            market,
            start,
            epoch: self.epoch,
            mode,
            heads: self.heads.unwrap_or(false),
        })
    }
}

/// Parse one client message (docs/PROTOCOL.md, "Client messages"). Types are
/// checked strictly: a wrong type or a value out of `limits` is
/// `bad_request`, never a guess; the whole op is checked before anything
/// is done for any of its markets.
pub fn parse_op(msg: &[u8], limits: &Limits) -> Result<Op, ErrorReply> {
    let v: Value = serde_json::from_slice(msg)
        .map_err(|e| ErrorReply::new(None, "bad_request", format!("not JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(ErrorReply::new(
            None,
            "bad_request",
            "a message must be a JSON object",
        ));
    };
    let id = match o.get("id") {
        None | Some(Value::Null) => None,
        Some(v @ Value::String(_)) => Some(v.clone()),
        Some(v @ Value::Number(n)) if n.is_i64() || n.is_u64() => Some(v.clone()),
        Some(_) => {
            return Err(ErrorReply::new(
                None,
                "bad_request",
                "id must be an integer or a string",
            ))
        }
    };
    let bad = |m: &str| ErrorReply::new(id.clone(), "bad_request", m.to_string());
    let op = match o.get("op") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(bad("op must be a string")),
        None => return Err(bad("missing field op")),
    };
    let market = |o: &Map<String, Value>| match o.get("market") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad("market must be a string")),
        None => Err(bad("missing field market")),
    };
    // `markets`, when present, is an array of 1..=max_subscriptions.
    let many = |o: &Map<String, Value>| -> Result<Option<Vec<Value>>, ErrorReply> {
        match o.get("markets") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) if a.is_empty() => Err(bad("markets must not be empty")),
            Some(Value::Array(a)) => Ok(Some(a.clone())),
            Some(_) => Err(bad("markets must be an array")),
        }
    };
    let too_many = |n: usize| {
        (n > limits.max_subscriptions).then(|| {
            ErrorReply::new(
                id.clone(),
                "too_many_subscriptions",
                format!(
                    "{n} markets in one op; at most {} subscriptions per connection",
                    limits.max_subscriptions
                ),
            )
        })
    };
    match op {
        "subscribe" => {
            let entries = match many(&o)? {
                None => {
                    let market = market(&o)?;
                    let fields = Fields::from_json(&o).map_err(|m| bad(&m))?;
                    vec![fields.entry(market, limits).map_err(|m| bad(&m))?]
                }
                Some(list) => {
                    let given = |k: &str| o.get(k).is_some_and(|v| !v.is_null());
                    if given("market") || ENTRY_KEYS.iter().any(|k| given(k)) {
                        return Err(bad(
                            "markets excludes market and the per-market fields at the top level",
                        ));
                    }
                    let mut entries = Vec::with_capacity(list.len());
                    for e in &list {
                        let Value::Object(e) = e else {
                            return Err(bad("each entry of markets must be an object"));
                        };
                        let market = market(e)?;
                        let fields = Fields::from_json(e).map_err(|m| bad(&m))?;
                        entries.push(fields.entry(market, limits).map_err(|m| bad(&m))?);
                    }
                    if let Some(e) = too_many(entries.len()) {
                        return Err(e);
                    }
                    entries
                }
            };
            Ok(Op::Subscribe { entries, id })
        }
        "unsubscribe" => {
            let markets = match many(&o)? {
                None => vec![market(&o)?],
                Some(list) => {
                    if o.get("market").is_some_and(|v| !v.is_null()) {
                        return Err(bad("market and markets exclude each other"));
                    }
                    if list.len() > limits.max_subscriptions {
                        return Err(bad(&format!(
                            "markets holds at most {} ids",
                            limits.max_subscriptions
                        )));
                    }
                    list.iter()
                        .map(|m| match m {
                            Value::String(s) => Ok(s.clone()),
                            _ => Err(bad("each entry of markets must be a string")),
                        })
                        .collect::<Result<_, _>>()?
                }
            };
            Ok(Op::Unsubscribe { markets, id })
        }
        "auth" => match o.get("token") {
            Some(Value::String(t)) => Ok(Op::Auth {
                token: t.clone(),
                id,
            }),
            _ => Err(bad("token must be a string")),
        },
        "ping" => Ok(Op::Ping { id }),
        other => Err(ErrorReply::new(
            id.clone(),
            "unknown_op",
            format!("unknown op {other:?}"),
        )),
    }
}

/// The version `subscribed` and `/healthz` carry (docs/PROTOCOL.md, "Versioning").
pub const PROTOCOL_VERSION: &str = "1.1";

/// The `subscribed` reply: the market's state as the subscription starts,
/// where it starts (`from_seq`: the first trade owed is `from_seq + 1`),
/// how it delivers, and whether heads will come (`head_interval_ms`: Some
/// when they will).
pub fn subscribed(
    m: &Market,
    id: Option<Value>,
    from_seq: i64,
    mode: Mode,
    head_interval_ms: Option<u64>,
) -> Bytes {
    let mut reply = json!({
        "type": "subscribed",
        "market": m.market,
        "epoch": m.epoch,
        "head_seq": m.head_seq,
        "last_price": m.last_price,
        "volume": m.volume,
        "from_seq": from_seq,
        "mode": mode.name(),
        "heads": head_interval_ms.is_some(),
        "protocol": PROTOCOL_VERSION,
    });
    if let Mode::Ticker { interval_ms } = mode {
        reply["interval_ms"] = interval_ms.into();
    }
    if let Some(ms) = head_interval_ms {
        reply["head_interval_ms"] = ms.into();
    }
    if let Some(id) = id {
        reply["id"] = id;
    }
    json_frame(&reply)
}

/// The `unsubscribed` reply.
pub fn unsubscribed(market: &str, id: Option<Value>) -> Bytes {
    let mut m = json!({"type": "unsubscribed", "market": market});
    if let Some(id) = id {
        m["id"] = id;
    }
    json_frame(&m)
}

/// The `authed` reply: the accepted token's `exp`, and its `sub` if any.
pub fn authed(id: Option<Value>, exp: i64, sub: Option<&str>) -> Bytes {
    let mut m = json!({"type": "authed", "exp": exp});
    if let Some(sub) = sub {
        m["sub"] = sub.into();
    }
    if let Some(id) = id {
        m["id"] = id;
    }
    json_frame(&m)
}

/// A `head` message: `head_seq` is the newest seq the broadcaster knows for
/// the market, `ts_micros` the time of sending.
pub fn head(market: &str, head_seq: i64, ts_micros: i64) -> Bytes {
    #[derive(serde::Serialize)]
    struct Head<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        market: &'a str,
        head_seq: i64,
        ts: super::trade::Rfc3339,
    }
    let v = Head {
        kind: "head",
        market,
        head_seq,
        ts: super::trade::Rfc3339(ts_micros),
    };
    super::frame::text_frame(&serde_json::to_vec(&v).expect("plain fields serialise"))
}

/// The `pong` reply to a `ping` op.
pub fn pong(id: Option<Value>) -> Bytes {
    let mut m = Map::new();
    m.insert("type".into(), "pong".into());
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    json_frame(&Value::Object(m))
}

/// The `id` of a message refused before it was parsed (rate-limited), if
/// it has one: the error reply carries it back.
pub fn message_id(payload: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.get("id").cloned())
}

/// `?market=ID&from_seq=N&recent=N&epoch=E&mode=M&interval_ms=N&heads=B`:
/// a subscribe made at connect time, with the same meanings and errors as
/// the op. None without `market`. The last of a repeated key wins.
pub fn initial_op(query: &str, limits: &Limits) -> Option<Result<Op, ErrorReply>> {
    let bad = |m: String| ErrorReply::new(None, "bad_request", m);
    let mut market = None;
    let mut f = Fields::default();
    let mut error = None;
    let int = |k: &str, v: &str| {
        v.parse::<i64>()
            .map_err(|_| format!("{k} must be an integer"))
    };
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let r = match &*k {
            "market" => {
                market = Some(v.into_owned());
                Ok(())
            }
            "from_seq" => v
                .parse::<i64>()
                .ok()
                .and_then(from_seq)
                .ok_or_else(|| FROM_SEQ_RULE.to_string())
                .map(|n| f.from_seq = Some(n)),
            "recent" => int("recent", &v).map(|n| f.recent = Some(n)),
            "interval_ms" => int("interval_ms", &v).map(|n| f.interval_ms = Some(n)),
            "epoch" => {
                f.epoch = Some(v.into_owned());
                Ok(())
            }
            "mode" => {
                f.mode = Some(v.into_owned());
                Ok(())
            }
            "heads" => match &*v {
                "true" => {
                    f.heads = Some(true);
                    Ok(())
                }
                "false" => {
                    f.heads = Some(false);
                    Ok(())
                }
                _ => Err("heads must be true or false".to_string()),
            },
            _ => Ok(()),
        };
        if let Err(m) = r {
            error.get_or_insert(m);
        }
    }
    if let Some(m) = error {
        return Some(Err(bad(m)));
    }
    let market = market?;
    Some(
        f.entry(market, limits)
            .map(|e| Op::Subscribe {
                entries: vec![e],
                id: None,
            })
            .map_err(bad),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_subscriptions: 3,
        max_recent: 1000,
        min_interval_ms: 100,
    };

    fn parse(m: &str) -> Result<Op, ErrorReply> {
        parse_op(m.as_bytes(), &L)
    }

    fn one(e: Entry, id: Option<Value>) -> Op {
        Op::Subscribe {
            entries: vec![e],
            id,
        }
    }

    #[test]
    fn v1_ops_parse_strictly() {
        assert_eq!(
            parse(r#"{"op":"subscribe","market":"M","from_seq":5,"epoch":"e1","id":7}"#).unwrap(),
            one(
                Entry {
                    epoch: Some("e1".into()),
                    ..Entry::v1("M", Some(5))
                },
                Some(json!(7))
            )
        );
        assert_eq!(
            parse(r#"{"op":"ping","id":"x"}"#).unwrap(),
            Op::Ping {
                id: Some(json!("x"))
            }
        );
        assert_eq!(
            parse(r#"{"op":"unsubscribe","market":"M"}"#).unwrap(),
            Op::Unsubscribe {
                markets: vec!["M".into()],
                id: None
            }
        );
        let code = |m: &str| parse(m).unwrap_err().code;
        assert_eq!(code("nope"), "bad_request");
        assert_eq!(code("[1]"), "bad_request");
        assert_eq!(code(r#"{"market":"M"}"#), "bad_request");
        assert_eq!(code(r#"{"op":"subscribe"}"#), "bad_request");
        assert_eq!(code(r#"{"op":"subscribe","market":1}"#), "bad_request");
        for bad in ["-1", "\"3\"", "1.5", "9223372036854775807"] {
            let m = format!(r#"{{"op":"subscribe","market":"M","from_seq":{bad}}}"#);
            assert_eq!(code(&m), "bad_request", "{m}");
        }
        assert_eq!(code(r#"{"op":"ping","id":[1]}"#), "bad_request");
        assert_eq!(code(r#"{"op":"dance","id":3}"#), "unknown_op");
        assert_eq!(
            parse(r#"{"op":"dance","id":3}"#).unwrap_err().id,
            Some(json!(3))
        );
    }

    #[test]
    fn the_new_subscribe_fields_are_read_and_checked() {
        assert_eq!(
            parse(r#"{"op":"subscribe","market":"M","recent":50,"mode":"ticker","interval_ms":250,"heads":true}"#)
                .unwrap(),
            one(
                Entry {
                    market: "M".into(),
                    start: Start::Recent(50),
                    epoch: None,
                    mode: Mode::Ticker { interval_ms: 250 },
                    heads: true,
                },
                None
            )
        );
        let Op::Subscribe { entries, .. } =
            parse(r#"{"op":"subscribe","market":"M","mode":"ticker","heads":null}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(entries[0].mode, Mode::Ticker { interval_ms: 1000 });
        assert!(!entries[0].heads, "null counts as absent");
        for bad in [
            r#""recent":5,"from_seq":1"#,
            r#""recent":0"#,
            r#""recent":1001"#,
            r#""recent":"5""#,
            r#""mode":"fast""#,
            r#""interval_ms":250"#,
            r#""mode":"trades","interval_ms":250"#,
            r#""mode":"ticker","interval_ms":99"#,
            r#""mode":"ticker","interval_ms":60001"#,
            r#""heads":1"#,
        ] {
            let m = format!(r#"{{"op":"subscribe","market":"M",{bad},"id":4}}"#);
            let e = parse(&m).unwrap_err();
            assert_eq!((e.code, e.id), ("bad_request", Some(json!(4))), "{m}");
        }
    }

    #[test]
    fn several_markets_are_checked_as_a_whole_first() {
        let Op::Subscribe { entries, id } = parse(
            r#"{"op":"subscribe","markets":[{"market":"A","from_seq":10,"epoch":"e1"},{"market":"B"},{"market":"C","mode":"ticker"}],"id":1}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(id, Some(json!(1)));
        assert_eq!(
            entries
                .iter()
                .map(|e| e.market.as_str())
                .collect::<Vec<_>>(),
            ["A", "B", "C"]
        );
        assert_eq!(entries[0].start, Start::After(10));
        let code = |m: &str| {
            let e = parse(m).unwrap_err();
            assert!(
                !e.extra.contains_key("market"),
                "whole-op errors name no market"
            );
            e.code
        };
        assert_eq!(code(r#"{"op":"subscribe","markets":[]}"#), "bad_request");
        assert_eq!(
            code(r#"{"op":"subscribe","markets":{"market":"A"}}"#),
            "bad_request"
        );
        assert_eq!(code(r#"{"op":"subscribe","markets":["A"]}"#), "bad_request");
        assert_eq!(
            code(r#"{"op":"subscribe","markets":[{"market":"A"},{"market":"B","recent":0}]}"#),
            "bad_request"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","market":"A","markets":[{"market":"B"}]}"#),
            "bad_request"
        );
        assert_eq!(
            code(r#"{"op":"subscribe","heads":true,"markets":[{"market":"B"}]}"#),
            "bad_request"
        );
        assert_eq!(
            code(
                r#"{"op":"subscribe","markets":[{"market":"A"},{"market":"B"},{"market":"C"},{"market":"D"}]}"#
            ),
            "too_many_subscriptions"
        );
        assert_eq!(
            parse(r#"{"op":"unsubscribe","markets":["A","Z"],"id":2}"#).unwrap(),
            Op::Unsubscribe {
                markets: vec!["A".into(), "Z".into()],
                id: Some(json!(2))
            }
        );
        assert_eq!(code(r#"{"op":"unsubscribe","markets":[1]}"#), "bad_request");
        assert_eq!(
            code(r#"{"op":"unsubscribe","market":"A","markets":["A"]}"#),
            "bad_request"
        );
        assert_eq!(
            code(r#"{"op":"unsubscribe","markets":["A","B","C","D"]}"#),
            "bad_request"
        );
    }

    #[test]
    fn auth_takes_a_string_token() {
        assert_eq!(
            parse(r#"{"op":"auth","token":"a.b.c","id":3}"#).unwrap(),
            Op::Auth {
                token: "a.b.c".into(),
                id: Some(json!(3))
            }
        );
        assert_eq!(
            parse(r#"{"op":"auth","token":5}"#).unwrap_err().code,
            "bad_request"
        );
        assert_eq!(parse(r#"{"op":"auth"}"#).unwrap_err().code, "bad_request");
    }

    #[test]
    fn url_subscribes_follow_the_op_rules() {
        assert_eq!(initial_op("", &L), None);
        assert_eq!(
            initial_op("market=M&from_seq=5&epoch=e", &L),
            Some(Ok(one(
                Entry {
                    epoch: Some("e".into()),
                    ..Entry::v1("M", Some(5))
                },
                None
            )))
        );
        assert_eq!(
            initial_op(
                "market=M&recent=3&mode=ticker&interval_ms=200&heads=true",
                &L
            ),
            Some(Ok(one(
                Entry {
                    market: "M".into(),
                    start: Start::Recent(3),
                    epoch: None,
                    mode: Mode::Ticker { interval_ms: 200 },
                    heads: true,
                },
                None
            )))
        );
        for bad in [
            "from_seq=-1",
            "from_seq=x",
            "from_seq=9223372036854775807",
            "recent=0",
            "recent=3&from_seq=1",
            "heads=yes",
            "mode=ticker&interval_ms=5",
            "interval_ms=500",
        ] {
            let q = format!("market=M&{bad}");
            assert_eq!(
                initial_op(&q, &L).unwrap().unwrap_err().code,
                "bad_request",
                "{q}"
            );
        }
    }

    #[test]
    fn subscribed_carries_the_11_fields() {
        let m = Market {
            market: "M".into(),
            title: String::new(),
            status: "open".into(),
            shard: 0,
            epoch: "e1".into(),
            head_seq: 9,
            last_price: None,
            volume: 3,
        };
        let json = |b: Bytes| -> Value {
            let at = b.iter().position(|&c| c == b'{').unwrap();
            serde_json::from_slice(&b[at..]).unwrap()
        };
        let v = json(subscribed(&m, Some(json!(7)), 5, Mode::Trades, None));
        assert_eq!(v["from_seq"], 5);
        assert_eq!(v["mode"], "trades");
        assert_eq!(v["heads"], false);
        assert_eq!(v["protocol"], "1.1");
        assert!(v.get("head_interval_ms").is_none() && v.get("interval_ms").is_none());
        let v = json(subscribed(
            &m,
            None,
            9,
            Mode::Ticker { interval_ms: 250 },
            Some(5000),
        ));
        assert_eq!(
            (v["interval_ms"].as_u64(), v["head_interval_ms"].as_u64()),
            (Some(250), Some(5000))
        );
        assert_eq!(v["heads"], true);
    }
}
