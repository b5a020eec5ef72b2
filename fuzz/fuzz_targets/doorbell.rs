//! A NOTIFY payload on a shard channel: anything any SQL user can send.
//! `parse_doorbell` must never panic and may accept only a JSON object whose
//! `m` is a market id and whose `s` is an integer >= 1, exactly as parsed.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use marketcast::protocol::doorbell::parse_doorbell;
use marketcast::protocol::market::is_market_id;
use serde::de::IgnoredAny;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // Postgres hands the listener text; a payload cannot hold NUL.
    let Ok(payload) = std::str::from_utf8(data) else {
        return;
    };
    let Some(d) = parse_doorbell(payload) else {
        return;
    };
    assert!(d.s >= 1 && is_market_id(&d.m), "{d:?}");
    // A JSON object with both keys. Values are skipped as the decoder skips
    // unknown fields: `1e869` is valid JSON that a `Value` cannot hold (this
    // oracle once used `Value` and "found" exactly that).
    let keys: BTreeMap<String, IgnoredAny> = serde_json::from_str(payload).unwrap_or_else(|e| {
        panic!("accepted a payload that is not a JSON object ({e}): {payload:?}")
    });
    assert!(keys.contains_key("m") && keys.contains_key("s"));
    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(payload) {
        assert_eq!(o.get("m").and_then(Value::as_str), Some(d.m.as_str()));
        assert_eq!(o.get("s").and_then(Value::as_i64), Some(d.s));
    }
});
