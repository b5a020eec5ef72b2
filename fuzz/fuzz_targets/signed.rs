//! A NOTIFY payload tried as a signed notification (sql/0005): anything any
//! SQL user can send. `signed::verify` must never panic, may accept only a
//! payload whose body (everything before `,"h":"`) is a JSON object of
//! exactly the trigger's fields, returned as parsed, and must refuse the
//! same payload with any one byte of the body changed (the MAC covers it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use marketcast::protocol::signed::{verify, NotifyKeys};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(payload) = std::str::from_utf8(data) else {
        return;
    };
    // The seeds are signed with this key (fuzz/seeds/signed).
    let keys = NotifyKeys::new([(1, [7u8; 32])]);
    let Ok(got) = verify(payload, &keys) else {
        return;
    };
    let body = &payload[..payload.rfind(",\"h\":\"").expect("accepted: signed")];
    let v: Value = serde_json::from_str(&format!("{body}}}")).expect("accepted: an object");
    assert_eq!(v["m"].as_str(), Some(got.trade.market.as_str()));
    assert_eq!(v["s"].as_i64(), Some(got.trade.seq));
    assert_eq!(v["e"].as_str(), Some(got.epoch.as_str()));
    assert_eq!(v["p"].as_str(), Some(got.trade.price.as_str()));
    assert_eq!(v["c"].as_i64(), Some(got.trade.ts_micros));
    for at in 0..body.len() {
        let mut altered = payload.as_bytes().to_vec();
        altered[at] ^= 0x20;
        if let Ok(altered) = std::str::from_utf8(&altered) {
            assert!(verify(altered, &keys).is_err(), "byte {at} changed: {altered}");
        }
    }
});
