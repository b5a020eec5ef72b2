//! One client WebSocket message (PROTOCOL.md section 2 and 1.1's), arbitrary
//! bytes. `parse_op` must never panic; an accepted op must survive a round
//! trip through its own JSON; an error must encode and echo the client's
//! `id` exactly when that id was valid (an integer or a string).
#![no_main]

use libfuzzer_sys::fuzz_target;
use marketcast::protocol::client::{parse_op, Entry, Limits, Mode, Op, Start};
use serde_json::{json, Value};

const LIMITS: Limits = Limits {
    max_subscriptions: 100,
    max_recent: 1000,
    min_interval_ms: 100,
};

fn entry_json(e: &Entry) -> Value {
    let mut v = json!({"market": e.market, "epoch": e.epoch, "heads": e.heads});
    match e.start {
        Start::Head => {}
        Start::After(f) => {
            assert!((0..i64::MAX).contains(&f), "{e:?}");
            v["from_seq"] = json!(f);
        }
        Start::Recent(n) => {
            assert!((1..=LIMITS.max_recent).contains(&n), "{e:?}");
            v["recent"] = json!(n);
        }
    }
    if let Mode::Ticker { interval_ms } = e.mode {
        assert!((LIMITS.min_interval_ms..=60_000).contains(&interval_ms), "{e:?}");
        v["mode"] = json!("ticker");
        v["interval_ms"] = json!(interval_ms);
    }
    v
}

fuzz_target!(|data: &[u8]| {
    match parse_op(data, &LIMITS) {
        Ok(op) => {
            let v = match &op {
                Op::Subscribe { entries, id } => {
                    assert!(!entries.is_empty() && entries.len() <= LIMITS.max_subscriptions);
                    let list: Vec<Value> = entries.iter().map(entry_json).collect();
                    json!({"op": "subscribe", "markets": list, "id": id})
                }
                Op::Unsubscribe { markets, id } => {
                    json!({"op": "unsubscribe", "markets": markets, "id": id})
                }
                Op::Auth { token, id } => json!({"op": "auth", "token": token, "id": id}),
                Op::Ping { id } => json!({"op": "ping", "id": id}),
            };
            let again = parse_op(&serde_json::to_vec(&v).expect("a Value serialises"), &LIMITS)
                .expect("an accepted op, re-encoded, is accepted");
            assert_eq!(again, op);
        }
        Err(e) => {
            assert!(
                matches!(e.code, "bad_request" | "unknown_op" | "too_many_subscriptions"),
                "{e:?}"
            );
            let frame = e.frame();
            assert!(frame.len() > 2);
            let valid_id = match serde_json::from_slice::<Value>(data) {
                Ok(Value::Object(o)) => match o.get("id") {
                    Some(v @ Value::String(_)) => Some(v.clone()),
                    Some(v @ Value::Number(n)) if n.is_i64() || n.is_u64() => Some(v.clone()),
                    _ => None,
                },
                _ => None,
            };
            assert_eq!(e.id, valid_id, "the reply echoes the id when it is valid");
        }
    }
});
