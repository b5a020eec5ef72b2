//! Property tests of everything that parses untrusted input, each checked
//! against a model written from PROTOCOL.md rather than from the code: the
//! client op (section 2), the connect-time query, NOTIFY doorbells (anyone
//! can NOTIFY), the writer's bodies, prices, market ids, paths, queries and
//! bearer header (section 3). Then one end-to-end property against a real
//! broadcaster and Postgres: random op sequences on one connection never
//! crash it, never break a subscription's order, and never disturb a
//! control client's gapless stream.
//!
//! Case counts are modest so `make test` stays fast; `PROPTEST_CASES=10000`
//! raises every property at once. The cargo-fuzz targets in `fuzz/` cover
//! the same parsers with coverage guidance (docs/TESTING.md).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use hyper::StatusCode;
use marketcast::protocol::client::{initial_op, parse_op, Entry, Limits, Mode, Op, Start};
use marketcast::protocol::doorbell::{parse_doorbell, Doorbell};
use marketcast::protocol::market::is_market_id;
use marketcast::protocol::signed::{verify, NotifyKeys, Unsigned};
use marketcast::protocol::write_api::{
    authorized, normalize_price, parse_json_object, parse_trades_query, route_path,
    validate_market_id, NewMarket, NewTrade, Route,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{self, Event};

/// `cases` unless PROPTEST_CASES says otherwise.
fn config(cases: u32) -> Config {
    let mut c = Config::default(); // reads PROPTEST_CASES, PROPTEST_RNG_SEED, ...
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    // The minimal failing input is printed; these runners have no source
    // file to keep a regressions file beside, and fixed bugs get unit tests.
    c.failure_persistence = None;
    c
}

// ------------------------------------------------------------------ values

/// Strings a parser may trip on.
fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("\0".to_string()),
        Just("é".to_string()),
        Just("ELECTION-2028".to_string()),
        Just("subscribe".to_string()),
        Just("a b".to_string()),
        Just("9223372036854775808".to_string()),
        "[ -~]{0,12}",
        any::<String>(),
    ]
}

/// Numbers at the edges of i64/u64/f64.
fn nasty_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1)),
        Just(json!(i64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MAX as u64 + 1)),
        Just(json!(1.5)),
        Just(json!(5.0)),
        Just(json!(-0.0)),
        Just(json!(1e300)),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN/inf become null
    ]
}

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        nasty_number(),
        nasty_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Keys of the contract, and others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "op", "market", "from_seq", "epoch", "id", "m", "s", "side", "price", "qty",
            "trader", "client_order_id", "title", "markets", "recent", "mode", "interval_ms",
            "heads", "token",
        ])
        .prop_map(String::from),
        1 => "[a-z_]{1,8}",
    ]
}

/// An object's field: absent, or a value from `valid` or anything at all.
fn field(valid: BoxedStrategy<Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        3 => valid.prop_map(Some),
        2 => any_json().prop_map(Some),
    ]
}

fn object(fields: Vec<(&'static str, Option<Value>)>, extra: Vec<(String, Value)>) -> Value {
    let mut m = Map::new();
    // Unknown keys first: the contract's own keys (set below) win over them.
    for (k, v) in extra {
        m.insert(k, v);
    }
    for (k, v) in fields {
        match v {
            Some(v) => {
                m.insert(k.to_string(), v);
            }
            None => {
                m.remove(k);
            }
        }
    }
    Value::Object(m)
}

// ------------------------------------------------------------------ client ops

/// The limits the op properties run with (small, so the bounds are hit).
const LIMITS: Limits = Limits {
    max_subscriptions: 3,
    max_recent: 50,
    min_interval_ms: 100,
};

/// One market's subscribe fields, read literally from PROTOCOL.md and
/// PROTOCOL-1.1 section 2.3: `Err(())` is `bad_request`.
fn entry_model(o: &Map<String, Value>) -> Result<Entry, ()> {
    let market = o
        .get("market")
        .and_then(Value::as_str)
        .ok_or(())?
        .to_string();
    let present = |k: &str| o.get(k).filter(|v| !v.is_null());
    let int = |k: &str| match present(k) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or(()),
    };
    // An integer >= 0; i64::MAX too is refused, so that the first seq owed,
    // from_seq + 1, exists (the contract's seqs are bigint).
    let from_seq = int("from_seq")?;
    if from_seq.is_some_and(|n| !(0..i64::MAX).contains(&n)) {
        return Err(());
    }
    let recent = int("recent")?;
    let interval = int("interval_ms")?;
    let epoch = match present("epoch") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(()),
    };
    let mode = match present("mode") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(()),
    };
    let heads = match present("heads") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(()),
    };
    let start = match (from_seq, recent) {
        (Some(_), Some(_)) => return Err(()),
        (Some(f), None) => Start::After(f),
        (None, Some(n)) if (1..=50).contains(&n) => Start::Recent(n as u32),
        (None, Some(_)) => return Err(()),
        (None, None) => Start::Head,
    };
    let mode = match (mode, interval) {
        (None | Some("trades"), None) => Mode::Trades,
        (Some("ticker"), None) => Mode::Ticker { interval_ms: 1000 },
        (Some("ticker"), Some(ms)) if (100..=60_000).contains(&ms) => Mode::Ticker {
            interval_ms: ms as u32,
        },
        _ => return Err(()),
    };
    Ok(Entry {
        market,
        start,
        epoch,
        mode,
        heads,
    })
}

/// What PROTOCOL.md section 2 (and 1.1's section 2) says a message means:
/// the op, or the error code with the id echoed (an id is echoed only when
/// it is an integer or a string; a message whose id is anything else has no
/// usable id).
fn op_model(v: &Value) -> Result<Op, (&'static str, Option<Value>)> {
    let bad = |id: &Option<Value>| ("bad_request", id.clone());
    let Value::Object(o) = v else {
        return Err(("bad_request", None));
    };
    let id = match o.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(Value::String(s.clone())),
        Some(Value::Number(n)) if n.as_i64().is_some() || n.as_u64().is_some() => {
            Some(Value::Number(n.clone()))
        }
        Some(_) => return Err(("bad_request", None)),
    };
    let markets = match o.get("markets") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if !a.is_empty() => Some(a),
        Some(_) => Some(&EMPTY),
    };
    match o.get("op") {
        Some(Value::String(op)) if op == "subscribe" => {
            let Some(list) = markets else {
                let e = entry_model(o).map_err(|()| bad(&id))?;
                return Ok(Op::Subscribe {
                    entries: vec![e],
                    id,
                });
            };
            let top = [
                "market",
                "from_seq",
                "recent",
                "epoch",
                "mode",
                "interval_ms",
                "heads",
            ];
            if list.is_empty() || top.iter().any(|k| o.get(*k).is_some_and(|v| !v.is_null())) {
                return Err(bad(&id));
            }
            let entries = list
                .iter()
                .map(|e| e.as_object().ok_or(()).and_then(entry_model))
                .collect::<Result<Vec<_>, ()>>()
                .map_err(|()| bad(&id))?;
            if entries.len() > LIMITS.max_subscriptions {
                return Err(("too_many_subscriptions", id));
            }
            Ok(Op::Subscribe { entries, id })
        }
        Some(Value::String(op)) if op == "unsubscribe" => {
            let Some(list) = markets else {
                let market = o
                    .get("market")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(&id))?;
                return Ok(Op::Unsubscribe {
                    markets: vec![market.to_string()],
                    id,
                });
            };
            let market = o.get("market").is_some_and(|v| !v.is_null());
            if list.is_empty() || list.len() > LIMITS.max_subscriptions || market {
                return Err(bad(&id));
            }
            let markets = list
                .iter()
                .map(|m| m.as_str().map(str::to_string).ok_or(()))
                .collect::<Result<Vec<_>, ()>>()
                .map_err(|()| bad(&id))?;
            Ok(Op::Unsubscribe { markets, id })
        }
        Some(Value::String(op)) if op == "auth" => match o.get("token") {
            Some(Value::String(t)) => Ok(Op::Auth {
                token: t.clone(),
                id,
            }),
            _ => Err(bad(&id)),
        },
        Some(Value::String(op)) if op == "ping" => Ok(Op::Ping { id }),
        Some(Value::String(_)) => Err(("unknown_op", id)),
        _ => Err(bad(&id)),
    }
}

/// `markets` that is present but not a non-empty array: the model treats it
/// as an empty list, which every op refuses.
static EMPTY: Vec<Value> = Vec::new();

/// Op-shaped objects: each field of the contract absent, valid or anything.
fn op_message() -> impl Strategy<Value = Value> {
    let op = prop_oneof![
        prop::sample::select(vec![
            "subscribe",
            "unsubscribe",
            "ping",
            "pong",
            "SUBSCRIBE",
            ""
        ])
        .prop_map(Value::from),
        nasty_string().prop_map(Value::from),
    ]
    .boxed();
    let market = nasty_string().prop_map(Value::from).boxed();
    let from_seq = nasty_number().boxed();
    let epoch = nasty_string().prop_map(Value::from).boxed();
    let id = prop_oneof![nasty_number(), nasty_string().prop_map(Value::from)].boxed();
    let small = prop_oneof![(-2i64..70).prop_map(Value::from), nasty_number()].boxed();
    let mode = prop::sample::select(vec!["trades", "ticker", "Ticker", ""])
        .prop_map(Value::from)
        .boxed();
    let interval = prop_oneof![(0i64..70_000).prop_map(Value::from), nasty_number()].boxed();
    let heads = any::<bool>().prop_map(Value::from).boxed();
    let entry = (
        field(nasty_string().prop_map(Value::from).boxed()),
        field(small.clone()),
        field(mode.clone()),
        field(interval.clone()),
    )
        .prop_map(|(market, recent, mode, interval)| {
            object(
                vec![
                    ("market", market),
                    ("recent", recent),
                    ("mode", mode),
                    ("interval_ms", interval),
                ],
                vec![],
            )
        });
    let markets = prop::collection::vec(entry, 0..5)
        .prop_map(Value::from)
        .boxed();
    let v1 = (
        field(op),
        field(market),
        field(from_seq),
        field(epoch),
        field(id),
        prop::collection::vec((key(), any_json()), 0..3),
    );
    let v11 = (
        prop_oneof![3 => Just(None), 1 => field(markets)],
        prop_oneof![2 => Just(None), 1 => field(small)],
        prop_oneof![2 => Just(None), 1 => field(mode)],
        prop_oneof![2 => Just(None), 1 => field(interval)],
        prop_oneof![2 => Just(None), 1 => field(heads)],
        prop_oneof![2 => Just(None), 1 => field(nasty_string().prop_map(Value::from).boxed())],
    );
    (v1, v11).prop_map(
        |(
            (op, market, from_seq, epoch, id, extra),
            (markets, recent, mode, interval, heads, token),
        )| {
            object(
                vec![
                    ("op", op),
                    ("market", market),
                    ("from_seq", from_seq),
                    ("epoch", epoch),
                    ("id", id),
                    ("markets", markets),
                    ("recent", recent),
                    ("mode", mode),
                    ("interval_ms", interval),
                    ("heads", heads),
                    ("token", token),
                ],
                extra,
            )
        },
    )
}

#[test]
fn parse_op_never_panics_on_bytes() {
    let mut r = TestRunner::new(config(2000));
    r.run(&prop::collection::vec(any::<u8>(), 0..256), |b| {
        let _ = parse_op(&b, &LIMITS);
        Ok(())
    })
    .unwrap();
}

#[test]
fn parse_op_matches_the_protocol_on_any_json() {
    let mut r = TestRunner::new(config(3000));
    let msg = prop_oneof![3 => op_message(), 1 => any_json()];
    r.run(&msg, |v| {
        let bytes = serde_json::to_vec(&v).unwrap();
        match (parse_op(&bytes, &LIMITS), op_model(&v)) {
            (Ok(got), Ok(want)) => prop_assert_eq!(got, want, "{}", v),
            (Err(e), Err((code, id))) => {
                prop_assert_eq!(e.code, code, "{}", v);
                prop_assert_eq!(&e.id, &id, "{}", v);
                // The reply frame carries the id and the code.
                let frame = e.frame();
                prop_assert!(frame.windows(code.len()).any(|w| w == code.as_bytes()));
            }
            (got, want) => prop_assert!(false, "{v}: parsed {got:?}, protocol says {want:?}"),
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn accepted_ops_round_trip_their_fields() {
    let id = prop_oneof![
        Just(None),
        any::<i64>().prop_map(|n| Some(json!(n))),
        any::<u64>().prop_map(|n| Some(json!(n))),
        any::<String>().prop_map(|s| Some(json!(s))),
    ];
    let start = prop_oneof![
        Just(Start::Head),
        (0..i64::MAX).prop_map(Start::After),
        (1..=LIMITS.max_recent).prop_map(Start::Recent),
    ];
    let mode = prop_oneof![
        Just(Mode::Trades),
        (LIMITS.min_interval_ms..=60_000).prop_map(|interval_ms| Mode::Ticker { interval_ms }),
    ];
    let entry = (
        any::<String>(),
        start,
        prop::option::of(any::<String>()),
        mode,
        any::<bool>(),
    )
        .prop_map(|(market, start, epoch, mode, heads)| Entry {
            market,
            start,
            epoch,
            mode,
            heads,
        });
    let op = prop_oneof![
        (
            prop::collection::vec(entry, 1..=LIMITS.max_subscriptions),
            id.clone()
        )
            .prop_map(|(entries, id)| Op::Subscribe { entries, id }),
        (
            prop::collection::vec(any::<String>(), 1..=LIMITS.max_subscriptions),
            id.clone()
        )
            .prop_map(|(markets, id)| Op::Unsubscribe { markets, id }),
        (any::<String>(), id.clone()).prop_map(|(token, id)| Op::Auth { token, id }),
        id.prop_map(|id| Op::Ping { id }),
    ];
    let entry_json = |e: &Entry| {
        let mut v = json!({"market": e.market, "heads": e.heads});
        match e.start {
            Start::Head => {}
            Start::After(f) => v["from_seq"] = json!(f),
            Start::Recent(n) => v["recent"] = json!(n),
        }
        if let Some(ep) = &e.epoch {
            v["epoch"] = json!(ep);
        }
        if let Mode::Ticker { interval_ms } = e.mode {
            v["mode"] = json!("ticker");
            v["interval_ms"] = json!(interval_ms);
        }
        v
    };
    let mut r = TestRunner::new(config(1000));
    r.run(&op, |op| {
        let mut v = match &op {
            // One entry goes in the single form, several in `markets`.
            Op::Subscribe { entries, .. } if entries.len() == 1 => {
                let mut v = entry_json(&entries[0]);
                v["op"] = json!("subscribe");
                v
            }
            Op::Subscribe { entries, .. } => {
                json!({"op": "subscribe", "markets": entries.iter().map(entry_json).collect::<Vec<_>>()})
            }
            Op::Unsubscribe { markets, .. } if markets.len() == 1 => {
                json!({"op": "unsubscribe", "market": markets[0]})
            }
            Op::Unsubscribe { markets, .. } => json!({"op": "unsubscribe", "markets": markets}),
            Op::Auth { token, .. } => json!({"op": "auth", "token": token}),
            Op::Ping { .. } => json!({"op": "ping"}),
        };
        let (Op::Subscribe { id, .. }
        | Op::Unsubscribe { id, .. }
        | Op::Auth { id, .. }
        | Op::Ping { id }) = &op;
        if let Some(id) = id {
            v["id"] = id.clone();
        }
        prop_assert_eq!(parse_op(v.to_string().as_bytes(), &LIMITS), Ok(op));
        Ok(())
    })
    .unwrap();
}

// ------------------------------------------------------------------ query subscription

#[test]
fn the_query_subscription_is_a_subscribe_op() {
    let pair = prop_oneof![
        (Just("market".to_string()), nasty_string()),
        (
            Just("from_seq".to_string()),
            prop_oneof![
                (0..=i64::MAX).prop_map(|n| n.to_string()),
                nasty_string(),
                Just("-1".to_string()),
                Just("+5".to_string()),
                Just("05".to_string()),
            ]
        ),
        (Just("epoch".to_string()), nasty_string()),
        (nasty_string(), nasty_string()),
    ];
    let mut r = TestRunner::new(config(1000));
    r.run(&prop::collection::vec(pair, 0..5), |pairs| {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&pairs)
            .finish();
        // Model: the last of each key wins; a from_seq that is not a decimal
        // integer in 0..i64::MAX (Rust's i64 grammar: an optional '+') is
        // bad_request, as in an op; no market, no subscription.
        let last = |k: &str| {
            pairs
                .iter()
                .rev()
                .find(|(kk, _)| kk == k)
                .map(|p| p.1.clone())
        };
        let from_seqs: Vec<Option<i64>> = pairs
            .iter()
            .filter(|(k, _)| k == "from_seq")
            .map(|(_, v)| v.parse::<i64>().ok().filter(|n| (0..i64::MAX).contains(n)))
            .collect();
        match initial_op(&query, &LIMITS) {
            Some(Err(e)) => {
                prop_assert!(from_seqs.contains(&None), "{query}");
                prop_assert_eq!((e.code, e.id), ("bad_request", None));
            }
            None => prop_assert!(last("market").is_none() && !from_seqs.contains(&None)),
            Some(Ok(op)) => {
                prop_assert!(!from_seqs.contains(&None));
                prop_assert_eq!(
                    op,
                    Op::Subscribe {
                        entries: vec![Entry {
                            epoch: last("epoch"),
                            ..Entry::v1(
                                last("market").unwrap(),
                                from_seqs.last().copied().flatten()
                            )
                        }],
                        id: None,
                    }
                );
            }
        }
        Ok(())
    })
    .unwrap();
}

// ------------------------------------------------------------------ market ids

const ALNUM: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const ID_REST: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-";

/// `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$`, read literally.
fn id_model(s: &str) -> bool {
    let mut cs = s.chars();
    let Some(first) = cs.next() else {
        return false;
    };
    ALNUM.contains(first) && cs.clone().all(|c| ID_REST.contains(c)) && cs.count() <= 63
}

fn valid_id() -> impl Strategy<Value = String> {
    let chars = |set: &'static str| prop::sample::select(set.chars().collect::<Vec<_>>());
    (chars(ALNUM), prop::collection::vec(chars(ID_REST), 0..=63))
        .prop_map(|(f, rest)| std::iter::once(f).chain(rest).collect())
}

/// Market id candidates: valid ones, valid ones with one bad character
/// inserted or made too long, and anything.
fn id_candidate() -> impl Strategy<Value = String> {
    prop_oneof![
        valid_id(),
        (
            valid_id(),
            any::<prop::sample::Index>(),
            prop::sample::select(vec![
                ' ', '/', '\\', 'é', '\0', '\n', '#', '%', '?', '+', 'İ', '٣'
            ]),
        )
            .prop_map(|(s, i, c)| {
                let mut s: Vec<char> = s.chars().collect();
                s.insert(i.index(s.len() + 1), c);
                s.into_iter().collect()
            }),
        (valid_id(), 1..20usize).prop_map(|(s, n)| format!("{s}{}", "x".repeat(64 + n))),
        prop::sample::select(vec!["_a", "-a", ".a", ":a", ""]).prop_map(String::from),
        any::<String>(),
    ]
}

#[test]
fn market_ids_follow_the_grammar() {
    let mut r = TestRunner::new(config(2000));
    r.run(&id_candidate(), |s| {
        let want = id_model(&s);
        prop_assert_eq!(is_market_id(&s), want, "{:?}", s);
        prop_assert_eq!(validate_market_id(&s).is_ok(), want, "{:?}", s);
        if let Err(e) = validate_market_id(&s) {
            prop_assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        }
        Ok(())
    })
    .unwrap();
}

// ------------------------------------------------------------------ doorbells

/// What a doorbell must be: a JSON object with a market id `m` and an
/// integer seq `s` >= 1 (extra fields ignored); anything else is dropped.
fn doorbell_model(v: &Value) -> Option<Doorbell> {
    let o = v.as_object()?;
    let m = o.get("m")?.as_str()?;
    let s = o.get("s")?.as_i64()?;
    (s >= 1 && id_model(m)).then(|| Doorbell {
        m: m.to_string(),
        s,
    })
}

#[test]
fn doorbells_are_exactly_the_trigger_payload() {
    let m = prop_oneof![
        3 => id_candidate().prop_map(Value::from),
        1 => any_json(),
    ]
    .boxed();
    let s = prop_oneof![
        3 => (1..=i64::MAX).prop_map(Value::from),
        2 => nasty_number(),
        1 => any_json(),
    ]
    .boxed();
    let payload = prop_oneof![
        6 => (field(m.clone()), field(s.clone()), prop::collection::vec((key(), any_json()), 0..2))
            .prop_map(|(m, s, extra)| object(vec![("m", m), ("s", s)], extra)),
        1 => (m, s).prop_map(|(m, s)| json!([m, s])),
        1 => any_json(),
    ];
    let ws = prop::sample::select(vec!["", " ", "\n\t", "\r\n "]);
    let mut r = TestRunner::new(config(3000));
    r.run(&(payload, ws.clone(), ws), |(v, before, after)| {
        let text = format!("{before}{v}{after}");
        prop_assert_eq!(parse_doorbell(&text), doorbell_model(&v), "{}", text);
        Ok(())
    })
    .unwrap();
}

/// Signed notifications (sql/0005): whatever the trigger can sign verifies
/// to exactly its fields; any one byte changed, or any string at all
/// under a key nobody holds, never verifies; nothing panics.
#[test]
fn signed_payloads_verify_exactly_what_was_signed() {
    let key = [5u8; 32];
    let keys = NotifyKeys::new([(4, key)]);
    let sign = |body: &str| marketcast::protocol::signed::sign(&key, body);
    let fields = (
        valid_id(),
        1..=i64::MAX,
        any::<String>(),
        any::<i64>(),
        prop::bool::ANY,
        1..=9999u32,
        1..=1_000_000_000i64,
        any::<i64>(),
    );
    let mut r = TestRunner::new(config(1000));
    r.run(&(fields, any::<prop::sample::Index>(), 1..=255u8), |((m, s, e, i, yes, bp, q, c), at, flip)| {
        let side = if yes { "yes" } else { "no" };
        let price = format!("0.{bp:04}");
        // json_build_object's form; the epoch is any text, JSON-escaped.
        let body = format!(
            r#"{{"m" : "{m}", "s" : {s}, "e" : {}, "i" : {i}, "d" : "{side}", "p" : "{price}", "q" : {q}, "c" : {c}, "k" : 4"#,
            Value::from(e.clone())
        );
        let payload = sign(&body);
        let got = verify(&payload, &keys).map_err(|u| TestCaseError::fail(format!("{u:?}: {payload}")))?;
        prop_assert_eq!(
            (&got.trade.market, got.trade.seq, &got.epoch, got.trade.trade_id, got.trade.side.as_str(), &got.trade.price, got.trade.qty, got.trade.ts_micros),
            (&m, s, &e, i, side, &price, q, c)
        );
        let mut bytes = payload.clone().into_bytes();
        let k = at.index(bytes.len());
        bytes[k] ^= flip;
        if let Ok(altered) = String::from_utf8(bytes) {
            prop_assert!(verify(&altered, &keys).is_err(), "byte {} changed: {}", k, altered);
        }
        Ok(())
    })
    .unwrap();
    r.run(&any::<String>(), |s| {
        prop_assert!(
            matches!(
                verify(&s, &keys),
                Err(Unsigned::Plain | Unsigned::Malformed)
            ),
            "{:?}",
            s
        );
        Ok(())
    })
    .unwrap();
}

#[test]
fn doorbells_never_panic_and_accept_what_the_trigger_sends() {
    let mut r = TestRunner::new(config(2000));
    r.run(&any::<String>(), |s| {
        if let Some(d) = parse_doorbell(&s) {
            prop_assert!(d.s >= 1 && id_model(&d.m), "{s:?}");
        }
        Ok(())
    })
    .unwrap();
    // json_build_object('m', id, 's', seq)::text, as the trigger sends it.
    r.run(&(valid_id(), 1..=i64::MAX), |(m, s)| {
        let payload = format!(r#"{{"m" : "{m}", "s" : {s}}}"#);
        prop_assert_eq!(parse_doorbell(&payload), Some(Doorbell { m, s }));
        Ok(())
    })
    .unwrap();
}

// ------------------------------------------------------------------ prices

/// A price as a client may write it, with the canonical text PROTOCOL.md's
/// numeric(5,4) holds (None: 422). Valid ones are built from the tick count.
fn price_text() -> impl Strategy<Value = (String, Option<String>)> {
    let valid = (
        1..=9999u32,
        prop::sample::select(vec!["", "0", "00"]),
        0..4usize,
    )
        .prop_map(|(ticks, int, extra)| {
            let digits = format!("{ticks:04}");
            let min = digits.trim_end_matches('0').len();
            let places = (min + extra).min(4);
            (
                format!("{int}.{}", &digits[..places]),
                Some(format!("0.{digits}")),
            )
        });
    let invalid = prop_oneof![
        prop::sample::select(vec![
            "", ".", "0", "0.", "00", "0.0", ".0000", "1", "1.0", "1.5", "01.5", "10.5", "-0.5",
            "+0.5", "5e-1", "0.5e0", " 0.5", "0.5 ", "0.5\n", "..5", "0..5", "0.5.", "0,5", "½",
            "٠.٥", "0x1", "NaN", "inf", "0.50000", "0.00001", "0.99999", "1.0000", "0.5\0",
        ])
        .prop_map(String::from),
        (1..=9999u32, 1..=9u32).prop_map(|(t, d)| format!("0.{t:04}{d}")),
        (1..=9u32, 1..=9999u32).prop_map(|(i, t)| format!("{i}.{t:04}")),
    ]
    .prop_map(|s| (s, None));
    prop_oneof![3 => valid, 2 => invalid]
}

/// A `price` field: text, or a JSON number (written by the client as a
/// float), with its canonical form.
fn price_field() -> impl Strategy<Value = (Value, Option<String>)> {
    prop_oneof![
        3 => price_text().prop_map(|(s, c)| (Value::from(s), c)),
        1 => (1..=9999u32).prop_map(|t| (json!(t as f64 / 10000.0), Some(format!("0.{t:04}")))),
        1 => prop::sample::select(vec![json!(0), json!(1), json!(0.0), json!(1.5), json!(-0.5), json!(0.00001), json!(0.12345)])
            .prop_map(|v| (v, None)),
    ]
}

#[test]
fn prices_canonicalise_idempotently_and_in_order() {
    let mut r = TestRunner::new(config(2000));
    r.run(&price_text(), |(s, want)| {
        let got = normalize_price(&s).ok();
        prop_assert_eq!(&got, &want, "{:?}", s);
        if let Some(c) = got {
            prop_assert_eq!(normalize_price(&c).ok(), Some(c.clone()), "idempotent");
        }
        Ok(())
    })
    .unwrap();
    // Canonical text orders as the prices do.
    let two = (price_text(), price_text());
    r.run(&two, |((a, ca), (b, cb))| {
        if let (Some(ca), Some(cb)) = (ca, cb) {
            let (na, nb) = (normalize_price(&a).unwrap(), normalize_price(&b).unwrap());
            let (fa, fb): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
            prop_assert_eq!(na.cmp(&nb), fa.partial_cmp(&fb).unwrap());
            prop_assert_eq!((na, nb), (ca, cb));
        }
        Ok(())
    })
    .unwrap();
    r.run(&any::<String>(), |s| {
        let _ = normalize_price(&s);
        Ok(())
    })
    .unwrap();
}

// ------------------------------------------------------------------ writer bodies

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Ok,
    Invalid, // 422: well-formed, wrong value
    Bad,     // 400: wrong type or missing
}

/// A field of a trade request and how PROTOCOL.md section 3 judges it.
fn judged<T: Strategy<Value = (Value, Verdict)> + 'static>(
    s: T,
) -> impl Strategy<Value = (Option<Value>, Verdict)> {
    s.prop_map(|(v, j)| (Some(v), j))
}

fn side() -> impl Strategy<Value = (Option<Value>, Verdict)> {
    prop_oneof![
        judged(prop::sample::select(vec!["yes", "no"]).prop_map(|s| (json!(s), Verdict::Ok))),
        judged(
            prop::sample::select(vec!["YES", "No", "maybe", "", "yes "])
                .prop_map(|s| (json!(s), Verdict::Invalid))
        ),
        judged(
            prop_oneof![nasty_number(), Just(Value::Null), Just(json!(["yes"]))]
                .prop_map(|v| (v, Verdict::Bad))
        ),
        Just((None, Verdict::Bad)),
    ]
}

fn qty() -> impl Strategy<Value = (Option<Value>, Verdict)> {
    prop_oneof![
        judged((1..=1_000_000_000i64).prop_map(|q| (json!(q), Verdict::Ok))),
        judged(
            prop_oneof![
                Just(json!(0)),
                Just(json!(1_000_000_001)),
                Just(json!(u64::MAX)),
                Just(json!(i64::MIN)),
                (i64::MIN..=0i64).prop_map(Value::from),
                (1_000_000_001..=i64::MAX).prop_map(Value::from),
            ]
            .prop_map(|v| (v, Verdict::Invalid))
        ),
        judged(
            prop_oneof![
                Just(json!(1.0)),
                Just(json!(1.5)),
                Just(json!("1")),
                Just(Value::Null),
                Just(json!(true))
            ]
            .prop_map(|v| (v, Verdict::Bad))
        ),
        Just((None, Verdict::Bad)),
    ]
}

/// `trader` / `client_order_id`: optional strings of 1 to 128 bytes, no NUL.
fn opt_id() -> impl Strategy<Value = (Option<Value>, Verdict)> {
    prop_oneof![
        Just((None, Verdict::Ok)),
        Just((Some(Value::Null), Verdict::Ok)),
        judged("[a-zA-Z0-9é-]{1,40}".prop_map(|s| (json!(s), Verdict::Ok))),
        judged(Just((json!("é".repeat(64)), Verdict::Ok))), // 128 bytes
        judged(Just((
            json!(format!("{}x", "é".repeat(64))),
            Verdict::Invalid
        ))),
        judged(Just((json!(""), Verdict::Invalid))),
        judged(Just((json!("a\0b"), Verdict::Invalid))),
        judged(
            prop_oneof![nasty_number(), Just(json!([])), Just(json!({}))]
                .prop_map(|v| (v, Verdict::Bad))
        ),
    ]
}

#[test]
fn trade_requests_are_judged_as_the_protocol_says() {
    let price = prop_oneof![
        4 => price_field().prop_map(|(v, c)| {
            let j = if c.is_some() { Verdict::Ok } else { Verdict::Invalid };
            (Some(v), j, c)
        }),
        1 => prop_oneof![Just(Value::Null), Just(json!(true)), Just(json!(["0.5"]))]
            .prop_map(|v| (Some(v), Verdict::Bad, None)),
        1 => Just((None, Verdict::Bad, None)),
    ];
    let body = (
        side(),
        price,
        qty(),
        opt_id(),
        opt_id(),
        prop::collection::vec((key(), any_json()), 0..2),
    );
    let mut r = TestRunner::new(config(3000));
    r.run(
        &body,
        |((sv, sj), (pv, pj, canon), (qv, qj), (cv, cj), (tv, tj), extra)| {
            let v = object(
                vec![
                    ("side", sv.clone()),
                    ("price", pv),
                    ("qty", qv.clone()),
                    ("client_order_id", cv.clone()),
                    ("trader", tv.clone()),
                ],
                extra,
            );
            // Wrong types are 400 whatever the values; then wrong values are 422.
            let want = [sj, pj, qj, cj, tj].into_iter().max().unwrap();
            let got = NewTrade::parse("M", v.as_object().unwrap());
            match (&got, want) {
                (Ok(t), Verdict::Ok) => {
                    prop_assert_eq!(Some(t.side), sv.as_ref().and_then(Value::as_str));
                    prop_assert_eq!(Some(&t.price), canon.as_ref());
                    prop_assert_eq!(Some(t.qty), qv.as_ref().and_then(Value::as_i64));
                    let s =
                        |o: &Option<Value>| o.as_ref().and_then(Value::as_str).map(String::from);
                    prop_assert_eq!(&t.client_order_id, &s(&cv));
                    prop_assert_eq!(&t.trader, &s(&tv));
                    prop_assert_eq!(t.market.as_str(), "M");
                }
                (Err(e), Verdict::Invalid) => {
                    prop_assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", v)
                }
                (Err(e), Verdict::Bad) => {
                    prop_assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", v)
                }
                _ => prop_assert!(false, "{v}: got {got:?}, protocol says {want:?}"),
            }
            Ok(())
        },
    )
    .unwrap();
    // Any object at all: a 400 or a 422, never a panic.
    r.run(&any_json(), |v| {
        let body = serde_json::to_vec(&v).unwrap();
        match parse_json_object(&body) {
            Ok(o) => {
                for e in [NewTrade::parse("M", &o).err(), NewMarket::parse(&o).err()]
                    .into_iter()
                    .flatten()
                {
                    prop_assert!(
                        e.status == StatusCode::BAD_REQUEST
                            || e.status == StatusCode::UNPROCESSABLE_ENTITY
                    );
                }
            }
            Err(e) => {
                prop_assert!(!v.is_object());
                prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
            }
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn market_requests_are_judged_as_the_protocol_says() {
    let id = prop_oneof![
        3 => id_candidate().prop_map(|s| { let ok = id_model(&s); (Some(json!(s)), if ok { Verdict::Ok } else { Verdict::Invalid }) }),
        1 => prop_oneof![nasty_number(), Just(Value::Null)].prop_map(|v| (Some(v), Verdict::Bad)),
        1 => Just((None, Verdict::Bad)),
    ];
    let title = prop_oneof![
        Just((None, Verdict::Ok)),
        Just((Some(Value::Null), Verdict::Ok)),
        ".{0,30}".prop_map(|s: String| {
            let j = if s.contains('\0') {
                Verdict::Invalid
            } else {
                Verdict::Ok
            };
            (Some(json!(s)), j)
        }),
        Just((Some(json!("t".repeat(1024))), Verdict::Ok)),
        Just((Some(json!("t".repeat(1025))), Verdict::Invalid)),
        Just((Some(json!("a\0")), Verdict::Invalid)),
        nasty_number().prop_map(|v| (Some(v), Verdict::Bad)),
    ];
    let mut r = TestRunner::new(config(1000));
    r.run(&(id, title), |((iv, ij), (tv, tj))| {
        let v = object(vec![("id", iv.clone()), ("title", tv.clone())], vec![]);
        let want = ij.max(tj);
        match (NewMarket::parse(v.as_object().unwrap()), want) {
            (Ok(m), Verdict::Ok) => {
                prop_assert_eq!(Some(m.id.as_str()), iv.as_ref().and_then(Value::as_str));
                prop_assert_eq!(
                    m.title.as_str(),
                    tv.as_ref().and_then(Value::as_str).unwrap_or("")
                );
            }
            (Err(e), Verdict::Invalid) => {
                prop_assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY)
            }
            (Err(e), Verdict::Bad) => prop_assert_eq!(e.status, StatusCode::BAD_REQUEST),
            (got, want) => prop_assert!(false, "{v}: got {got:?}, protocol says {want:?}"),
        }
        Ok(())
    })
    .unwrap();
}

// ------------------------------------------------------------------ paths, queries, token

#[test]
fn paths_route_as_the_protocol_lists_them() {
    let seg = prop_oneof![
        3 => valid_id(),
        1 => prop::sample::select(vec!["v1", "markets", "trades", "", "..", "%2F"]).prop_map(String::from),
        1 => "[^/]{0,8}",
    ];
    let mut r = TestRunner::new(config(1000));
    r.run(
        &(prop::collection::vec(seg, 0..6), 0..3usize),
        |(segs, slashes)| {
            let path = format!("/{}{}", segs.join("/"), "/".repeat(slashes));
            let s: Vec<&str> = segs.iter().map(String::as_str).collect();
            // Trailing empty segments are trailing slashes.
            let mut s = s.as_slice();
            while let [rest @ .., ""] = s {
                s = rest;
            }
            let want = match s {
                ["healthz"] => Route::Healthz,
                ["metrics"] => Route::Metrics,
                ["v1", "markets"] => Route::Markets,
                ["v1", "markets", id] => Route::Market(id),
                ["v1", "markets", id, "trades"] => Route::Trades(id),
                _ => Route::NotFound,
            };
            prop_assert_eq!(route_path(&path), want, "{}", path);
            Ok(())
        },
    )
    .unwrap();
    r.run(&any::<String>(), |p| {
        let _ = route_path(&p);
        Ok(())
    })
    .unwrap();
}

#[test]
fn trade_page_queries_are_checked() {
    let value = prop_oneof![
        (-5..2000i64).prop_map(|n| n.to_string()),
        nasty_string(),
        Just(i64::MAX.to_string()),
    ];
    let pair = (
        prop::sample::select(vec!["after_seq", "limit", "other"]).prop_map(String::from),
        value,
    );
    let mut r = TestRunner::new(config(1000));
    r.run(&prop::collection::vec(pair, 0..4), |pairs| {
        let q = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&pairs)
            .finish();
        // Unknown keys are ignored; after_seq and limit must be integers
        // (400), after_seq >= 0 and 1 <= limit <= 1000 (422); the first
        // failure wins, else the last of each.
        let mut want = Ok((0, 100));
        for (k, v) in &pairs {
            if k == "other" {
                continue;
            }
            let Ok(n) = v.parse::<i64>() else {
                want = Err(StatusCode::BAD_REQUEST);
                break;
            };
            match k.as_str() {
                "after_seq" if n < 0 => {
                    want = Err(StatusCode::UNPROCESSABLE_ENTITY);
                    break;
                }
                "limit" if !(1..=1000).contains(&n) => {
                    want = Err(StatusCode::UNPROCESSABLE_ENTITY);
                    break;
                }
                "after_seq" => want = want.map(|(_, l)| (n, l)),
                "limit" => want = want.map(|(a, _)| (a, n)),
                _ => {}
            }
        }
        prop_assert_eq!(parse_trades_query(&q).map_err(|e| e.status), want, "{}", q);
        Ok(())
    })
    .unwrap();
}

#[test]
fn only_the_exact_bearer_token_authorizes() {
    let token = "[!-~]{1,24}";
    let header = prop_oneof![
        Just(None),
        any::<Vec<u8>>().prop_map(Some),
        "[ -~]{0,30}".prop_map(|s| Some(s.into_bytes())),
    ];
    let mut r = TestRunner::new(config(1000));
    r.run(&(token, header, any::<bool>()), |(token, header, exact)| {
        let header = if exact {
            Some(format!("Bearer {token}").into_bytes())
        } else {
            header
        };
        let mut h = HeaderMap::new();
        if let Some(v) = header
            .as_ref()
            .and_then(|b| HeaderValue::from_bytes(b).ok())
        {
            h.insert(AUTHORIZATION, v);
        }
        let want = h.contains_key(AUTHORIZATION)
            && header.as_deref() == Some(format!("Bearer {token}").as_bytes());
        prop_assert_eq!(authorized(&h, &token), want);
        Ok(())
    })
    .unwrap();
}

// ------------------------------------------------------------------ end to end

/// One thing a client may send. Terminal ops end the connection.
#[derive(Debug, Clone)]
enum ClientOp {
    Subscribe {
        market: usize,
        from_seq: Option<i64>,
    },
    Unsubscribe {
        market: usize,
    },
    Ping,
    /// A text message that is not JSON: bad_request, no id.
    Garbage(String),
    /// JSON with a wrong type: bad_request with the id.
    WrongType,
    /// A message over the size limit: close 1009.
    Oversize,
    /// A binary frame: close 1008.
    Binary,
}

/// Markets the ops pick from: two real ones, one that does not exist, one
/// that cannot exist.
const E2E_MARKETS: [&str; 4] = ["P1", "P2", "NOPE", "a b"];

fn client_ops() -> impl Strategy<Value = Vec<ClientOp>> {
    let market = prop_oneof![4 => 0..2usize, 1 => 2..4usize];
    let from_seq = prop_oneof![
        2 => Just(None),
        4 => (0..60i64).prop_map(Some),
        1 => prop::sample::select(vec![i64::MAX, i64::MAX - 1, 1 << 53]).prop_map(Some),
    ];
    // Terminal ops are rare so that most sequences run to their end.
    let op = prop_oneof![
        10 => (market.clone(), from_seq).prop_map(|(market, from_seq)| ClientOp::Subscribe { market, from_seq }),
        5 => market.prop_map(|market| ClientOp::Unsubscribe { market }),
        3 => Just(ClientOp::Ping),
        2 => "[^{]{1,20}".prop_map(ClientOp::Garbage),
        2 => Just(ClientOp::WrongType),
        1 => prop_oneof![Just(ClientOp::Oversize), Just(ClientOp::Binary)],
    ];
    prop::collection::vec(op, 1..14)
}

/// What the connection must see in reply to each op, in op order.
#[derive(Debug, PartialEq)]
enum Reply {
    Subscribed,
    Unsubscribed,
    Pong,
    Error(&'static str),
    Close(u16),
}

/// Run `ops` on a fresh connection and check the transcript: replies in op
/// order with the expected kinds, and per subscription exactly the trades
/// from `from_seq + 1` (or `head_seq + 1`) on, gapless, until unsubscribed;
/// then, for what is still subscribed, every trade up to the log's head.
async fn run_ops(ws_url: &str, db: &tokio_postgres::Client, ops: &[ClientOp]) {
    let mut ws = support::connect_ws(ws_url).await;
    let mut expected: Vec<(i64, Reply)> = Vec::new(); // (id, reply)
    let mut subscribed: HashMap<usize, ()> = HashMap::new();
    let mut requested_from: HashMap<i64, Option<i64>> = HashMap::new();
    let mut terminal = None;
    for (n, op) in ops.iter().enumerate() {
        let id = n as i64 + 1;
        let msg = match op {
            ClientOp::Subscribe { market, from_seq } => {
                let mut v = json!({"op": "subscribe", "market": E2E_MARKETS[*market], "id": id});
                if let Some(f) = from_seq {
                    v["from_seq"] = json!(f);
                }
                let reply = if *from_seq == Some(i64::MAX) || *market >= 2 {
                    // from_seq + 1 must exist; types are checked before markets.
                    Reply::Error(if *from_seq == Some(i64::MAX) {
                        "bad_request"
                    } else {
                        "unknown_market"
                    })
                } else if subscribed.insert(*market, ()).is_some() {
                    Reply::Error("already_subscribed")
                } else {
                    requested_from.insert(id, *from_seq);
                    Reply::Subscribed
                };
                expected.push((id, reply));
                Message::Text(v.to_string().into())
            }
            ClientOp::Unsubscribe { market } => {
                let reply = if subscribed.remove(market).is_some() {
                    Reply::Unsubscribed
                } else {
                    Reply::Error("not_subscribed")
                };
                expected.push((id, reply));
                Message::Text(
                    json!({"op": "unsubscribe", "market": E2E_MARKETS[*market], "id": id})
                        .to_string()
                        .into(),
                )
            }
            ClientOp::Ping => {
                expected.push((id, Reply::Pong));
                Message::Text(json!({"op": "ping", "id": id}).to_string().into())
            }
            ClientOp::Garbage(s) => {
                expected.push((0, Reply::Error("bad_request")));
                Message::Text(s.clone().into())
            }
            ClientOp::WrongType => {
                expected.push((id, Reply::Error("bad_request")));
                Message::Text(
                    json!({"op": "subscribe", "market": 7, "id": id})
                        .to_string()
                        .into(),
                )
            }
            ClientOp::Oversize => {
                terminal = Some(1009);
                Message::Text(
                    json!({"op": "ping", "id": id, "pad": "x".repeat(4096)})
                        .to_string()
                        .into(),
                )
            }
            ClientOp::Binary => {
                terminal = Some(1008);
                Message::Binary(vec![b'{', b'}'].into())
            }
        };
        ws.send(msg).await.expect("send an op");
        if terminal.is_some() {
            break;
        }
    }
    let end_id = ops.len() as i64 + 100;
    match terminal {
        Some(code) => expected.push((0, Reply::Close(code))),
        None => {
            ws.send(Message::Text(
                json!({"op": "ping", "id": end_id}).to_string().into(),
            ))
            .await
            .expect("send the final ping");
            expected.push((end_id, Reply::Pong));
        }
    }

    // Read the transcript up to the last expected reply.
    let mut next: HashMap<String, i64> = HashMap::new(); // market -> next seq owed
    let mut replies = expected.into_iter();
    let mut want = replies.next();
    while let Some((want_id, want_reply)) = &want {
        let v = match support::next_event(&mut ws).await {
            Event::Json(v) => v,
            Event::Closed(code) => {
                assert_eq!(Reply::Close(code.unwrap_or(0)), *want_reply, "ops {ops:?}");
                want = replies.next();
                continue;
            }
        };
        let market = v["market"].as_str().map(String::from);
        let got = match v["type"].as_str() {
            Some("trade") => {
                let m = market.expect("a trade names its market");
                let owed = next.get_mut(&m).unwrap_or_else(|| {
                    panic!("trade of {m} without a subscription: {v}; ops {ops:?}")
                });
                assert_eq!(
                    v["seq"].as_i64(),
                    Some(*owed),
                    "gapless, in order: {v}; ops {ops:?}"
                );
                *owed += 1;
                continue;
            }
            Some("subscribed") => {
                let id = v["id"].as_i64().expect("subscribed echoes the id");
                let from = requested_from[&id].unwrap_or(v["head_seq"].as_i64().unwrap());
                next.insert(market.unwrap(), from.saturating_add(1));
                Reply::Subscribed
            }
            Some("unsubscribed") => {
                next.remove(&market.unwrap());
                Reply::Unsubscribed
            }
            Some("pong") => Reply::Pong,
            Some("error") => Reply::Error(match v["code"].as_str().unwrap() {
                "unknown_market" => "unknown_market",
                "already_subscribed" => "already_subscribed",
                "not_subscribed" => "not_subscribed",
                "bad_request" => "bad_request",
                other => panic!("unexpected error {other}: {v}; ops {ops:?}"),
            }),
            _ => panic!("unexpected message {v}; ops {ops:?}"),
        };
        assert_eq!(&got, want_reply, "{v}; ops {ops:?}");
        assert_eq!(
            v["id"].as_i64().unwrap_or(0),
            *want_id,
            "the reply echoes the op's id: {v}"
        );
        want = replies.next();
    }
    if terminal.is_some() {
        return;
    }
    // Everything committed so far reaches every subscription still open.
    let mut heads = HashMap::new();
    for m in next.keys() {
        let head: i64 = db
            .query_one("SELECT last_seq FROM markets WHERE id = $1", &[m])
            .await
            .unwrap()
            .get(0);
        heads.insert(m.clone(), head);
    }
    while next.iter().any(|(m, owed)| *owed <= heads[m]) {
        let v = support::recv(&mut ws).await;
        assert_eq!(v["type"], "trade", "{v}; ops {ops:?}");
        let owed = next
            .get_mut(v["market"].as_str().unwrap())
            .unwrap_or_else(|| panic!("a trade without a subscription: {v}; ops {ops:?}"));
        assert_eq!(v["seq"].as_i64(), Some(*owed), "{v}; ops {ops:?}");
        *owed += 1;
    }
    let _ = ws.close(None).await; // the server may already be closing; nothing to check
}

/// Random op sequences, one connection each, against one broadcaster while
/// trades flow; a control client follows P1 from 0 throughout.
#[test]
fn random_client_ops_never_break_the_stream() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (db, server, control) = rt.block_on(async {
        let db = support::TestDb::new().await;
        db.market("P1").await;
        db.market("P2").await;
        db.trades("P1", 30).await;
        db.trades("P2", 5).await;
        let server = support::broadcaster(support::broadcaster_config(&db)).await;
        let mut control = support::connect_ws(&server.ws()).await;
        support::subscribe(&mut control, "P1", Some(0)).await;
        (db, server, control)
    });
    // Trades keep flowing into both markets while the cases run.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = rt.spawn({
        let stop = stop.clone();
        let url = db.url.clone();
        async move {
            let c = support::connect(&url).await;
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let m = if k % 3 == 0 { "P2" } else { "P1" };
                c.execute(
                    "INSERT INTO trades (market_id, side, price, qty) VALUES ($1, 'no', 0.25, 1)",
                    &[&m],
                )
                .await
                .unwrap();
                k += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }
    });
    // The control client is read all along (a socket left unread would be
    // closed as a slow consumer), and checked as it goes.
    let control_seen = Arc::new(AtomicI64::new(0));
    let control_task = rt.spawn({
        let seen = control_seen.clone();
        let mut control = control;
        async move {
            loop {
                let v = support::recv(&mut control).await;
                assert_eq!(v["type"], "trade", "{v}");
                assert_eq!(v["market"], "P1", "{v}");
                let s = v["seq"].as_i64().unwrap();
                assert_eq!(
                    s,
                    seen.load(Ordering::Relaxed) + 1,
                    "gapless, in order: {v}"
                );
                seen.store(s, Ordering::Relaxed);
            }
        }
    });
    let client = rt.block_on(db.client());
    let ws_url = server.ws();
    let mut runner = TestRunner::new(Config {
        max_shrink_iters: 64,
        ..config(64)
    });
    let result = runner.run(&client_ops(), |ops| {
        rt.block_on(run_ops(&ws_url, &client, &ops));
        Ok(())
    });
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        feeder.await.unwrap();
        if let Err(e) = result {
            panic!("{e}");
        }
        // The control client got every trade of P1, gapless, and the server
        // still serves new connections.
        let head = support::seqs(&client, "P1").await.len() as i64;
        let caught_up = tokio::time::timeout(support::WAIT, async {
            while control_seen.load(Ordering::Relaxed) < head && !control_task.is_finished() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if control_task.is_finished() {
            control_task.await.expect("the control client's checks");
            unreachable!("the control client reads forever");
        }
        assert!(
            caught_up.is_ok(),
            "the control client got {} of {head} trades",
            control_seen.load(Ordering::Relaxed)
        );
        control_task.abort();
        let mut ws = support::connect_ws(&server.ws()).await;
        support::send(&mut ws, json!({"op": "ping", "id": "alive"})).await;
        assert_eq!(
            support::recv(&mut ws).await,
            json!({"type": "pong", "id": "alive"})
        );
        server.stop().await;
    });
}

// ------------------------------------------------------------------ WebSocket frames

/// A client's message as sent: a text split into fragments with control
/// frames between them, or a control frame alone.
#[derive(Debug, Clone)]
enum Sent {
    Text {
        text: String,
        /// Fragment lengths in bytes (cut at char boundaries), then the
        /// control frames sent after each fragment but the last.
        cuts: Vec<prop::sample::Index>,
        between: Vec<Option<(bool, Vec<u8>)>>, // (is_ping, payload)
    },
    Control(bool, Vec<u8>),
}

/// One masked client frame; `form` picks the length encoding (RFC 6455
/// requires the shortest, but a reader must not choke on the longer ones).
fn ws_frame(b0: u8, payload: &[u8], mask: [u8; 4], form: u8) -> Vec<u8> {
    let mut v = vec![b0];
    let n = payload.len();
    match form {
        0 if n <= 125 => v.push(0x80 | n as u8),
        0 | 1 if n <= 65535 => {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            v.push(0x80 | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

/// Hands out the bytes in the given chunk sizes, and says Pending (after
/// waking itself) between chunks: what a socket does.
struct Chunked {
    data: Vec<u8>,
    pos: usize,
    chunks: Vec<usize>,
    turn: usize,
    pending: bool,
}

impl tokio::io::AsyncRead for Chunked {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let me = &mut *self;
        if me.pending {
            me.pending = false;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        me.pending = true;
        let chunk = me.chunks[me.turn % me.chunks.len()];
        me.turn += 1;
        let n = chunk.min(buf.remaining()).min(me.data.len() - me.pos);
        buf.put_slice(&me.data[me.pos..me.pos + n]);
        me.pos += n;
        std::task::Poll::Ready(Ok(()))
    }
}

#[test]
fn websocket_frames_read_back_as_sent() {
    use marketcast::broadcaster::session::{FrameReader, Inbound, ReadError};
    use marketcast::protocol::frame::control_frame;

    let control = (any::<bool>(), prop::collection::vec(any::<u8>(), 0..=125));
    let sent = prop_oneof![
        3 => (
            ".{0,120}",
            prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            prop::collection::vec(prop::option::of(control.clone()), 4),
        )
            .prop_map(|(text, cuts, between)| Sent::Text { text, cuts, between }),
        1 => control.prop_map(|(p, b)| Sent::Control(p, b)),
    ];
    let case = (
        prop::collection::vec((sent, any::<[u8; 4]>(), 0..3u8), 1..6),
        prop::collection::vec(1..20usize, 1..4),
        1..400usize,
        // Polls before a `next()` future is dropped (as a `select!` drops
        // it when another branch wins); 0: polled to the end.
        prop::collection::vec(0..4usize, 1..4),
    );
    let mut r = TestRunner::new(config(1000));
    r.run(&case, |(msgs, chunks, max, cancel)| {
        // Frame everything, and say what RFC 6455 means by it: controls as
        // they come (also between fragments), a text when its last fragment
        // is in; a message over `max` bytes (control frames are not part of
        // the message) ends the stream with 1009.
        let mut bytes = Vec::new();
        let mut want: Vec<Inbound> = Vec::new();
        let mut too_large = false;
        let ctl = |ping: bool, p: &[u8]| {
            if ping {
                Inbound::Ping(control_frame(fastwebsockets::Frame::pong(
                    p.to_vec().into(),
                )))
            } else {
                Inbound::Pong
            }
        };
        'msgs: for (m, mask, form) in &msgs {
            match m {
                Sent::Control(ping, p) => {
                    bytes.extend(ws_frame(if *ping { 0x89 } else { 0x8A }, p, *mask, 0));
                    want.push(ctl(*ping, p));
                }
                Sent::Text {
                    text,
                    cuts,
                    between,
                } => {
                    let mut at: Vec<usize> = cuts
                        .iter()
                        .map(|i| i.index(text.len() + 1))
                        .filter(|&i| text.is_char_boundary(i))
                        .collect();
                    at.push(0);
                    at.push(text.len());
                    at.sort();
                    at.dedup();
                    let pieces: Vec<&[u8]> = if at.len() < 2 {
                        vec![text.as_bytes()]
                    } else {
                        at.windows(2)
                            .map(|w| &text.as_bytes()[w[0]..w[1]])
                            .collect()
                    };
                    let mut so_far = 0;
                    for (k, piece) in pieces.iter().enumerate() {
                        let last = k + 1 == pieces.len();
                        let b0 = match (k == 0, last) {
                            (true, true) => 0x81,
                            (true, false) => 0x01,
                            (false, true) => 0x80,
                            (false, false) => 0x00,
                        };
                        bytes.extend(ws_frame(b0, piece, *mask, *form));
                        so_far += piece.len();
                        if so_far > max {
                            too_large = true;
                            break 'msgs;
                        }
                        if last {
                            want.push(Inbound::Text(text.as_bytes().to_vec()));
                        } else if let Some(Some((ping, p))) = between.get(k) {
                            bytes.extend(ws_frame(if *ping { 0x89 } else { 0x8A }, p, *mask, 0));
                            want.push(ctl(*ping, p));
                        }
                    }
                }
            }
        }
        let mut src = Chunked {
            data: bytes,
            pos: 0,
            chunks,
            turn: 0,
            pending: false,
        };
        let mut reader = FrameReader::new(max);
        let mut got = Vec::new();
        let mut budgets = cancel.iter().cycle();
        let end = loop {
            let budget = *budgets.next().unwrap();
            let mut next = std::pin::pin!(reader.next(&mut src));
            let mut polls = 0;
            let done = loop {
                // `Chunked` wakes itself: polling again at once is what a runtime does.
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match next.as_mut().poll(&mut cx) {
                    std::task::Poll::Ready(r) => break Some(r),
                    std::task::Poll::Pending => {
                        polls += 1;
                        if budget != 0 && polls >= budget {
                            break None; // dropped midway: the reader keeps what it read
                        }
                    }
                }
            };
            match done {
                Some(Ok(m)) => got.push(m),
                Some(Err(e)) => break e,
                None => {}
            }
        };
        prop_assert_eq!(got, want);
        match end {
            ReadError::TooLarge => prop_assert!(too_large),
            ReadError::Gone(_) => prop_assert!(!too_large),
            e => prop_assert!(false, "{e:?}"),
        }
        Ok(())
    })
    .unwrap();
}

// ------------------------------------------------------------------ the writer over HTTP

/// One request to the writer, with what PROTOCOL.md section 3 says of it
/// judged by the model below.
#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    /// 0 `/v1/markets`, 1 `/v1/markets/{id}`, 2 `/v1/markets/{id}/trades`, 3 `/v1/nope`
    route: u8,
    id: &'static str,
    query: Vec<(String, String)>,
    /// 0 the token, 1 a wrong one, 2 none
    auth: u8,
    json: bool,
    body: ReqBody,
}

#[derive(Debug, Clone)]
enum ReqBody {
    Market(Value, Verdict, Option<String>),
    Trade(Value, Verdict, Option<String>, Option<String>), // (body, verdict, canonical price, client_order_id)
    Raw(String),
}

/// Path ids: an existing market, a valid unknown one, and two that can
/// never exist (one of them percent-encoded, which the writer does not decode).
const HTTP_IDS: [&str; 4] = ["W1", "W-NONE", "a%20b", "-x"];

fn writer_request() -> impl Strategy<Value = Req> {
    let market_body = (
        prop_oneof![
            3 => prop::sample::select(vec!["W1", "W2", "W3"]).prop_map(|s| (Some(json!(s)), Verdict::Ok)),
            1 => prop::sample::select(vec!["", "a b", "é"]).prop_map(|s| (Some(json!(s)), Verdict::Invalid)),
            1 => Just((Some(json!(5)), Verdict::Bad)),
            1 => Just((None, Verdict::Bad)),
        ],
        prop_oneof![Just(None), Just(Some(json!("t"))), Just(Some(json!(1)))],
    )
        .prop_map(|((id, ij), title)| {
            let tj = if title.as_ref().is_some_and(Value::is_number) { Verdict::Bad } else { Verdict::Ok };
            let created = id.as_ref().and_then(Value::as_str).map(String::from);
            let v = object(vec![("id", id), ("title", title)], vec![]);
            ReqBody::Market(v, ij.max(tj), created)
        });
    let trade_body = (
        side(),
        prop_oneof![
            4 => price_field().prop_map(|(v, c)| {
                let j = if c.is_some() { Verdict::Ok } else { Verdict::Invalid };
                (Some(v), j, c)
            }),
            1 => Just((Some(json!(true)), Verdict::Bad, None)),
        ],
        qty(),
        prop_oneof![
            Just((None, Verdict::Ok)),
            prop::sample::select(vec!["c1", "c2"]).prop_map(|c| (Some(json!(c)), Verdict::Ok)),
            Just((Some(json!("")), Verdict::Invalid)),
        ],
    )
        .prop_map(|((sv, sj), (pv, pj, canon), (qv, qj), (cv, cj))| {
            let coid = cv.as_ref().and_then(Value::as_str).map(String::from);
            let v = object(
                vec![
                    ("side", sv),
                    ("price", pv),
                    ("qty", qv),
                    ("client_order_id", cv),
                ],
                vec![],
            );
            ReqBody::Trade(v, [sj, pj, qj, cj].into_iter().max().unwrap(), canon, coid)
        });
    let body = prop_oneof![
        2 => market_body,
        4 => trade_body,
        1 => prop::sample::select(vec!["", "[]", "{", "null", "\"x\"", "{}"]).prop_map(|s| ReqBody::Raw(s.to_string())),
    ];
    let query = prop::collection::vec(
        (
            prop::sample::select(vec!["after_seq", "limit", "x"]).prop_map(String::from),
            prop_oneof![
                (-2..1002i64).prop_map(|n| n.to_string()),
                Just("z".to_string())
            ],
        ),
        0..3,
    );
    (
        prop::sample::select(vec!["GET", "POST", "POST", "POST", "PUT", "DELETE"]),
        prop_oneof![1 => Just(0u8), 1 => Just(1u8), 3 => Just(2u8), 1 => Just(3u8)],
        prop::sample::select(HTTP_IDS.to_vec()),
        query,
        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        prop_oneof![6 => Just(true), 1 => Just(false)],
        body,
    )
        .prop_map(|(method, route, id, query, auth, json, body)| Req {
            method,
            route,
            id,
            query,
            auth,
            json,
            body,
        })
}

/// What the writer owes, from PROTOCOL.md section 3 and the documented
/// order of checks: route (404), method (405), then for a POST the token
/// (401), the content type (415), JSON (400: not an object), the path's
/// market id (422), the body (400 types, then 422 values), and last what the
/// database says (404 unknown market, 409 market exists; a retried
/// client_order_id is 200 with the original trade).
struct WriterModel {
    markets: std::collections::HashSet<String>,
    coids: std::collections::HashSet<(String, String)>,
}

impl WriterModel {
    fn expect(&mut self, r: &Req) -> u16 {
        let id = r.id.to_string();
        let allowed: &[&str] = match r.route {
            0 => &["GET", "POST"],
            1 => &["GET"],
            2 => &["GET", "POST"],
            _ => return 404,
        };
        if !allowed.contains(&r.method) {
            return 405;
        }
        if r.method == "GET" {
            return match r.route {
                // GET /v1/markets is paged: `limit` must be an integer
                // (400) from 1 to 1000 (422), the first failure wins;
                // `after` and other keys are not judged.
                0 => {
                    for (k, v) in &r.query {
                        if k == "limit" {
                            match v.parse::<i64>() {
                                Err(_) => return 400,
                                Ok(n) if !(1..=1000).contains(&n) => return 422,
                                Ok(_) => {}
                            }
                        }
                    }
                    200
                }
                1 => {
                    if self.markets.contains(&id) {
                        200
                    } else {
                        404
                    }
                }
                _ => {
                    for (k, v) in &r.query {
                        if k == "x" {
                            continue;
                        }
                        let Ok(n) = v.parse::<i64>() else { return 400 };
                        if (k == "after_seq" && n < 0) || (k == "limit" && !(1..=1000).contains(&n))
                        {
                            return 422;
                        }
                    }
                    if self.markets.contains(&id) {
                        200
                    } else {
                        404
                    }
                }
            };
        }
        if r.auth != 0 {
            return 401;
        }
        if !r.json {
            return 415;
        }
        let (object, verdict) = match &r.body {
            // `{}` lacks every field; the others are not objects.
            ReqBody::Raw(s) => (s == "{}", Verdict::Bad),
            ReqBody::Market(_, j, _) if r.route == 0 => (true, *j),
            ReqBody::Trade(_, j, _, _) if r.route == 2 => (true, *j),
            // A body of the other kind: its fields are missing here.
            _ => (true, Verdict::Bad),
        };
        if !object {
            return 400;
        }
        if r.route == 2 && !id_model(&id) {
            return 422;
        }
        match verdict {
            Verdict::Bad => return 400,
            Verdict::Invalid => return 422,
            Verdict::Ok => {}
        }
        if r.route == 0 {
            let ReqBody::Market(_, _, Some(m)) = &r.body else {
                unreachable!("a valid market body has an id")
            };
            return if self.markets.insert(m.clone()) {
                201
            } else {
                409
            };
        }
        if !self.markets.contains(&id) {
            return 404;
        }
        match &r.body {
            ReqBody::Trade(_, _, _, Some(c)) if !self.coids.insert((id, c.clone())) => 200,
            _ => 201,
        }
    }
}

/// Random request sequences against a real writer (with a write token):
/// every answer is the status the contract gives it, every error has the
/// `{"error":{"code","message"}}` shape, every trade created is the canonical
/// form of what was sent, and nothing is ever a 500.
#[test]
fn the_writer_answers_as_the_protocol_says() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_db, server) = rt.block_on(async {
        let db = support::TestDb::new().await;
        let mut cfg = support::writer_config(&db);
        cfg.write_token = Some("tok3n".into());
        let server = support::writer(cfg).await;
        (db, server)
    });
    let base = server.http();
    // One model for the whole run: the database keeps what earlier cases made.
    let model = std::sync::Mutex::new(WriterModel {
        markets: Default::default(),
        coids: Default::default(),
    });
    // W1 exists from the start.
    let (status, _) = rt.block_on(support::http(
        "POST",
        &format!("{base}/v1/markets"),
        &[("authorization", "Bearer tok3n")],
        Some(r#"{"id":"W1"}"#),
    ));
    assert_eq!(status, 201);
    model.lock().unwrap().markets.insert("W1".into());

    let mut runner = TestRunner::new(Config {
        max_shrink_iters: 32,
        ..config(48)
    });
    let result = runner.run(&prop::collection::vec(writer_request(), 1..8), |reqs| {
        for r in &reqs {
            let path = match r.route {
                0 => "/v1/markets".to_string(),
                1 => format!("/v1/markets/{}", r.id),
                2 => format!("/v1/markets/{}/trades", r.id),
                _ => "/v1/nope".to_string(),
            };
            let query = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&r.query)
                .finish();
            let url = format!("{base}{path}?{query}");
            let mut headers = vec![];
            match r.auth {
                0 => headers.push(("authorization", "Bearer tok3n")),
                1 => headers.push(("authorization", "Bearer tok3n2")),
                _ => {}
            }
            headers.push((
                "content-type",
                if r.json {
                    "application/json; charset=utf-8"
                } else {
                    "text/plain"
                },
            ));
            let body = match &r.body {
                ReqBody::Market(v, ..) | ReqBody::Trade(v, ..) => v.to_string(),
                ReqBody::Raw(s) => s.clone(),
            };
            let body = (r.method != "GET").then_some(body);
            let (status, v) = rt.block_on(support::http(r.method, &url, &headers, body.as_deref()));
            let want = model.lock().unwrap().expect(r);
            prop_assert_eq!(status, want, "{:?} answered {}", r, v);
            if status >= 400 {
                prop_assert!(
                    v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                    "{v}"
                );
            }
            if let (201, ReqBody::Trade(_, _, canon, _)) = (status, &r.body) {
                prop_assert_eq!(v["type"].as_str(), Some("trade"));
                prop_assert_eq!(v["market"].as_str(), Some(r.id));
                prop_assert_eq!(v["price"].as_str(), canon.as_deref());
            }
        }
        Ok(())
    });
    rt.block_on(server.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}
