//! The connect-time subscription `GET /ws?market=ID&from_seq=N&epoch=E`
//! (PROTOCOL.md section 2), an arbitrary query string. `initial_op` must never
//! panic and must agree with a model of the query: the last `market`, `epoch`
//! and `from_seq` win, a `from_seq` that is not an integer in 0..i64::MAX is
//! `bad_request` (as in an op), no `market` means no subscription. Queries
//! with the 1.1 keys (`recent`, `mode`, `interval_ms`, `heads`) are checked
//! for the error shape only; the property tests model them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use marketcast::protocol::client::{initial_op, Entry, Limits, Op};

const LIMITS: Limits = Limits {
    max_subscriptions: 100,
    max_recent: 1000,
    min_interval_ms: 100,
};

fuzz_target!(|data: &[u8]| {
    let query = String::from_utf8_lossy(data);
    let got = initial_op(&query, &LIMITS);
    let v11 = url::form_urlencoded::parse(query.as_bytes())
        .any(|(k, _)| matches!(&*k, "recent" | "mode" | "interval_ms" | "heads"));
    if v11 {
        if let Some(Err(e)) = got {
            assert_eq!((e.code, e.id), ("bad_request", None));
        }
        return;
    }

    let mut market = None;
    let mut epoch = None;
    let mut from_seq = None;
    let mut bad_from_seq = false;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "market" => market = Some(v.into_owned()),
            "epoch" => epoch = Some(v.into_owned()),
            "from_seq" if !bad_from_seq => match v.parse::<i64>() {
                Ok(n) if (0..i64::MAX).contains(&n) => from_seq = Some(n),
                _ => bad_from_seq = true,
            },
            _ => {}
        }
    }
    match got {
        Some(Err(e)) => {
            assert!(bad_from_seq, "{e:?}");
            assert_eq!((e.code, e.id), ("bad_request", None));
        }
        None => assert!(market.is_none() && !bad_from_seq),
        Some(Ok(op)) => {
            assert!(!bad_from_seq);
            assert_eq!(
                op,
                Op::Subscribe {
                    entries: vec![Entry {
                        epoch,
                        ..Entry::v1(market.expect("a subscription names a market"), from_seq)
                    }],
                    id: None
                }
            );
        }
    }
});
