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

/// A client op, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Subscribe {
        market: String,
        from_seq: Option<i64>,
        epoch: Option<String>,
        id: Option<Value>,
    },
    Unsubscribe {
        market: String,
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

/// Parse one client message (docs/PROTOCOL.md, "Client messages"). Types are checked
/// strictly: a wrong type is `bad_request`, never a guess.
pub fn parse_op(msg: &[u8]) -> Result<Op, ErrorReply> {
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
    let market = || match o.get("market") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad("market must be a string")),
        None => Err(bad("missing field market")),
    };
    match op {
        "subscribe" => {
            let market = market()?;
            let from_seq = match o.get("from_seq") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => match n.as_i64().and_then(from_seq) {
                    Some(f) => Some(f),
                    None => return Err(bad(FROM_SEQ_RULE)),
                },
                Some(_) => return Err(bad(FROM_SEQ_RULE)),
            };
            let epoch = match o.get("epoch") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(bad("epoch must be a string")),
            };
            Ok(Op::Subscribe {
                market,
                from_seq,
                epoch,
                id,
            })
        }
        "unsubscribe" => Ok(Op::Unsubscribe {
            market: market()?,
            id,
        }),
        "ping" => Ok(Op::Ping { id }),
        other => Err(ErrorReply::new(
            id.clone(),
            "unknown_op",
            format!("unknown op {other:?}"),
        )),
    }
}

/// The `subscribed` reply: the market's state as the subscription starts.
pub fn subscribed(m: &Market, id: Option<Value>) -> Bytes {
    let mut reply = json!({
        "type": "subscribed",
        "market": m.market,
        "epoch": m.epoch,
        "head_seq": m.head_seq,
        "last_price": m.last_price,
        "volume": m.volume,
    });
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

/// `?market=ID&from_seq=N&epoch=E`: a subscribe made at connect time. None
/// without `market`; a bad `from_seq` is the error a `subscribe` op would get.
pub fn initial_op(query: &str) -> Option<Result<Op, ErrorReply>> {
    let mut market = None;
    let mut from_seq = None;
    let mut epoch = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "market" => market = Some(v.into_owned()),
            "from_seq" => match v.parse::<i64>().ok().and_then(self::from_seq) {
                Some(n) => from_seq = Some(n),
                None => return Some(Err(ErrorReply::new(None, "bad_request", FROM_SEQ_RULE))),
            },
            "epoch" => epoch = Some(v.into_owned()),
            _ => {}
        }
    }
    let market = market?;
    Some(Ok(Op::Subscribe {
        market,
        from_seq,
        epoch,
        id: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_parse_strictly() {
        assert_eq!(
            parse_op(br#"{"op":"subscribe","market":"M","from_seq":5,"epoch":"e1","id":7}"#)
                .unwrap(),
            Op::Subscribe {
                market: "M".into(),
                from_seq: Some(5),
                epoch: Some("e1".into()),
                id: Some(json!(7))
            }
        );
        assert_eq!(
            parse_op(br#"{"op":"ping","id":"x"}"#).unwrap(),
            Op::Ping {
                id: Some(json!("x"))
            }
        );
        assert_eq!(
            parse_op(br#"{"op":"unsubscribe","market":"M"}"#).unwrap(),
            Op::Unsubscribe {
                market: "M".into(),
                id: None
            }
        );
        let code = |m: &[u8]| parse_op(m).unwrap_err().code;
        assert_eq!(code(b"nope"), "bad_request");
        assert_eq!(code(b"[1]"), "bad_request");
        assert_eq!(code(br#"{"market":"M"}"#), "bad_request");
        assert_eq!(code(br#"{"op":"subscribe"}"#), "bad_request");
        assert_eq!(code(br#"{"op":"subscribe","market":1}"#), "bad_request");
        assert_eq!(
            code(br#"{"op":"subscribe","market":"M","from_seq":-1}"#),
            "bad_request"
        );
        assert_eq!(
            code(br#"{"op":"subscribe","market":"M","from_seq":"3"}"#),
            "bad_request"
        );
        assert_eq!(
            code(br#"{"op":"subscribe","market":"M","from_seq":1.5}"#),
            "bad_request"
        );
        assert_eq!(
            code(br#"{"op":"subscribe","market":"M","from_seq":9223372036854775807}"#),
            "bad_request",
            "from_seq + 1 must not overflow"
        );
        assert_eq!(code(br#"{"op":"ping","id":[1]}"#), "bad_request");
        assert_eq!(code(br#"{"op":"dance","id":3}"#), "unknown_op");
        assert_eq!(
            parse_op(br#"{"op":"dance","id":3}"#).unwrap_err().id,
            Some(json!(3))
        );
    }

    #[test]
    fn url_subscribes_follow_the_same_from_seq_rule() {
        assert_eq!(initial_op(""), None);
        assert_eq!(
            initial_op("market=M&from_seq=5&epoch=e"),
            Some(Ok(Op::Subscribe {
                market: "M".into(),
                from_seq: Some(5),
                epoch: Some("e".into()),
                id: None
            }))
        );
        for bad in ["-1", "x", "9223372036854775807"] {
            let q = format!("market=M&from_seq={bad}");
            assert_eq!(
                initial_op(&q).unwrap().unwrap_err().code,
                "bad_request",
                "{q}"
            );
        }
    }
}
