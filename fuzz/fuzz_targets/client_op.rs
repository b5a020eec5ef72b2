//! One client WebSocket message (PROTOCOL.md section 2), arbitrary bytes.
//! `parse_op` must never panic; an accepted op must survive a round trip
//! through its own JSON; an error must encode and echo the client's `id`
//! exactly when that id was valid (an integer or a string).
#![no_main]

use libfuzzer_sys::fuzz_target;
use marketcast::protocol::client::{parse_op, Op};
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    match parse_op(data) {
        Ok(op) => {
            let v = match &op {
                Op::Subscribe {
                    market,
                    from_seq,
                    epoch,
                    id,
                } => {
                    assert!(
                        from_seq.is_none_or(|f| (0..i64::MAX).contains(&f)),
                        "{op:?}"
                    );
                    json!({"op": "subscribe", "market": market, "from_seq": from_seq, "epoch": epoch, "id": id})
                }
                Op::Unsubscribe { market, id } => {
                    json!({"op": "unsubscribe", "market": market, "id": id})
                }
                Op::Ping { id } => json!({"op": "ping", "id": id}),
            };
            let again = parse_op(&serde_json::to_vec(&v).expect("a Value serialises"))
                .expect("an accepted op, re-encoded, is accepted");
            assert_eq!(again, op);
        }
        Err(e) => {
            assert!(e.code == "bad_request" || e.code == "unknown_op", "{e:?}");
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
