//! A writer request's untrusted parts (PROTOCOL.md section 3). The input is
//! `<path>[?<query>]\n<Authorization value>\n<body>`: the path is routed, the
//! `GET .../trades` query parsed, the bearer header checked against a fixed
//! token, and the body parsed as both a create-market and a trade request.
//! Nothing may panic, every error is a 400 or a 422, and whatever is accepted
//! is within the contract's ranges.
#![no_main]

use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use hyper::StatusCode;
use libfuzzer_sys::fuzz_target;
use marketcast::protocol::market::is_market_id;
use marketcast::protocol::write_api::{
    authorized, normalize_price, parse_json_object, parse_trades_query, route_path, ApiError,
    NewMarket, NewTrade, Route, MAX_ID_BYTES, MAX_TITLE_BYTES, MAX_TRADES_PAGE,
};

const TOKEN: &str = "s3cr3t-token";

fn client_error(e: &ApiError) {
    assert!(
        e.status == StatusCode::BAD_REQUEST || e.status == StatusCode::UNPROCESSABLE_ENTITY,
        "{e:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let target = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let auth = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();

    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let market = match route_path(path) {
        Route::Market(id) | Route::Trades(id) => {
            assert!(!id.contains('/'));
            id
        }
        _ => "M",
    };
    match parse_trades_query(query) {
        Ok((after, limit)) => assert!(after >= 0 && (1..=MAX_TRADES_PAGE).contains(&limit)),
        Err(e) => client_error(&e),
    }

    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(auth) {
        headers.insert(AUTHORIZATION, v);
    }
    let expected =
        headers.contains_key(AUTHORIZATION) && auth == format!("Bearer {TOKEN}").as_bytes();
    assert_eq!(authorized(&headers, TOKEN), expected);

    let body = match parse_json_object(body) {
        Ok(b) => b,
        Err(e) => return client_error(&e),
    };
    match NewMarket::parse(&body) {
        Ok(m) => {
            assert!(is_market_id(&m.id));
            assert!(m.title.len() <= MAX_TITLE_BYTES && !m.title.contains('\0'));
        }
        Err(e) => client_error(&e),
    }
    match NewTrade::parse(market, &body) {
        Ok(t) => {
            assert!(t.side == "yes" || t.side == "no");
            assert!((1..=1_000_000_000).contains(&t.qty));
            // Canonical four-place text of the same value, and a fixed point.
            let b = t.price.as_bytes();
            assert!(b.len() == 6 && b.starts_with(b"0.") && b[2..].iter().all(u8::is_ascii_digit));
            assert_ne!(t.price, "0.0000");
            assert_eq!(normalize_price(&t.price).as_ref(), Ok(&t.price));
            let given: f64 = match &body["price"] {
                serde_json::Value::String(s) => s.parse().expect("an accepted price is a number"),
                v => v.as_f64().expect("a number"),
            };
            let canonical: f64 = t.price.parse().expect("canonical price");
            assert!((given - canonical).abs() < 1e-9, "{given} vs {}", t.price);
            for id in [&t.trader, &t.client_order_id].into_iter().flatten() {
                assert!(!id.is_empty() && id.len() <= MAX_ID_BYTES && !id.contains('\0'));
            }
        }
        Err(e) => client_error(&e),
    }
});
