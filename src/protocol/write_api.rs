//! The write API's requests and errors as data (docs/PROTOCOL.md, "HTTP write
//! API"): routes from the path, the bearer check, bodies parsed and checked
//! (types first: 400, then values: 422), and [`ApiError`], the
//! `{"error":{"code","message"}}` every failure is answered with.

use hyper::{header, Method, StatusCode};
use serde_json::{Map, Value};

use super::market::is_market_id;

/// Largest page of `GET /v1/markets/{id}/trades`.
pub const MAX_TRADES_PAGE: i64 = 1000;
/// Largest page of `GET /v1/markets`, and its default: an anonymous client
/// cannot make one request read every market.
pub const MAX_MARKETS_PAGE: i64 = 1000;
/// Longest accepted client_order_id and trader, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest accepted market title, in bytes.
pub const MAX_TITLE_BYTES: usize = 1024;

/// A writer-side failure, answered as `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m)
    }
    pub fn unknown_market(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_market",
            format!("no market named {id}"),
        )
    }
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("database unavailable, nothing was committed: {e}"),
        )
    }
}

/// Whether the bearer token `given` is the configured `token`, in time that
/// does not depend on where the two first differ (subtle's `ct_eq`, which
/// the optimiser cannot turn back into an early exit), so a client cannot
/// guess the token byte by byte from response times. The *length* does leak:
/// `ct_eq` answers unequal lengths at once. That is accepted (docs/SECURITY.md):
/// a token's length is no secret worth protecting, and a random token of 32
/// or more characters is out of reach of guessing whatever its length.
pub fn token_matches(given: &[u8], token: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(given.ct_eq(token))
}

/// The writer's routes, from the request path alone (the method is checked
/// per route). `{id}` is the raw segment: validated where it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    Metrics,
    /// `/v1/markets`
    Markets,
    /// `/v1/markets/{id}`
    Market(&'a str),
    /// `/v1/markets/{id}/trades`
    Trades(&'a str),
    NotFound,
}

impl Route<'_> {
    /// The name of what `method` on this route does: the `route` label of
    /// the writer's metrics, written once here.
    pub fn label(&self, method: &Method) -> &'static str {
        match (self, method) {
            (Route::Healthz, _) => "healthz",
            (Route::Metrics, _) => "metrics",
            (Route::Markets, &Method::GET) => "list_markets",
            (Route::Markets, &Method::POST) => "create_market",
            (Route::Markets, _) => "markets",
            (Route::Market(_), &Method::GET) => "get_market",
            (Route::Market(_), _) => "market",
            (Route::Trades(_), &Method::GET) => "list_trades",
            (Route::Trades(_), &Method::POST) => "post_trade",
            (Route::Trades(_), _) => "trades",
            (Route::NotFound, _) => "not_found",
        }
    }
}

/// Route a request path; one trailing slash or more is ignored.
pub fn route_path(path: &str) -> Route<'_> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segs.as_slice() {
        ["healthz"] => Route::Healthz,
        ["metrics"] => Route::Metrics,
        ["v1", "markets"] => Route::Markets,
        ["v1", "markets", id] => Route::Market(id),
        ["v1", "markets", id, "trades"] => Route::Trades(id),
        _ => Route::NotFound,
    }
}

/// Whether the request carries `Authorization: Bearer <token>`.
pub fn authorized(headers: &header::HeaderMap, token: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|g| token_matches(g.as_bytes(), token.as_bytes()))
}

/// A request body: one JSON object, else 400.
pub fn parse_json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request("body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("malformed JSON: {e}"))),
    }
}

/// `?after_seq=N&limit=M` of `GET /v1/markets/{id}/trades`: (after, limit).
/// Unknown keys are ignored; after_seq or limit not an integer is 400, out
/// of range 422.
pub fn parse_trades_query(query: &str) -> Result<(i64, i64), ApiError> {
    let mut after: i64 = 0;
    let mut limit: i64 = 100;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k != "after_seq" && k != "limit" {
            continue; // say a cache buster: not ours to judge
        }
        let n: i64 = v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{k} must be an integer")))?;
        match &*k {
            "after_seq" if n >= 0 => after = n,
            "after_seq" => return Err(ApiError::invalid("after_seq must be >= 0")),
            "limit" if (1..=MAX_TRADES_PAGE).contains(&n) => limit = n,
            "limit" => {
                return Err(ApiError::invalid(format!(
                    "limit must be between 1 and {MAX_TRADES_PAGE}"
                )))
            }
            _ => {}
        }
    }
    Ok((after, limit))
}

/// `?after=ID&limit=N` of `GET /v1/markets`: markets with an id above
/// `after` (None: from the first), in id order, at most `limit` (default and
/// maximum [`MAX_MARKETS_PAGE`]). Unknown keys are ignored; a limit that is
/// not an integer is 400, out of range 422.
pub fn parse_markets_query(query: &str) -> Result<(Option<String>, i64), ApiError> {
    let mut after = None;
    let mut limit = MAX_MARKETS_PAGE;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "after" => after = Some(v.into_owned()),
            "limit" => {
                let n: i64 = v
                    .parse()
                    .map_err(|_| ApiError::bad_request("limit must be an integer"))?;
                if !(1..=MAX_MARKETS_PAGE).contains(&n) {
                    return Err(ApiError::invalid(format!(
                        "limit must be between 1 and {MAX_MARKETS_PAGE}"
                    )));
                }
                limit = n;
            }
            _ => {}
        }
    }
    Ok((after, limit))
}

/// A validated `POST /v1/markets` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMarket {
    pub id: String,
    /// Empty when absent or null.
    pub title: String,
}

impl NewMarket {
    /// Types are checked first (400), then values (422).
    pub fn parse(body: &Map<String, Value>) -> Result<NewMarket, ApiError> {
        let id = match body.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(ApiError::bad_request("id must be a string")),
            None => return Err(ApiError::bad_request("missing field id")),
        };
        let title = match body.get("title") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(ApiError::bad_request("title must be a string")),
        };
        validate_market_id(&id)?;
        if title.len() > MAX_TITLE_BYTES {
            return Err(ApiError::invalid(format!(
                "title is over {MAX_TITLE_BYTES} bytes"
            )));
        }
        // Valid JSON ("\u0000"), but Postgres text cannot hold NUL: left to the
        // database it is a 22021 error, answered 500 instead of 422.
        if title.contains('\0') {
            return Err(ApiError::invalid("title must not contain NUL"));
        }
        Ok(NewMarket { id, title })
    }
}

pub fn validate_market_id(id: &str) -> Result<(), ApiError> {
    if is_market_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "market id {id:?} must match ^[A-Za-z0-9][A-Za-z0-9_.:-]{{0,63}}$"
        )))
    }
}

/// A validated trade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTrade {
    pub market: String,
    pub side: &'static str,
    /// Four-place decimal text, e.g. "0.6300".
    pub price: String,
    pub qty: i64,
    pub trader: Option<String>,
    pub client_order_id: Option<String>,
}

impl NewTrade {
    /// Types are checked first (400), then values (422).
    pub fn parse(market: &str, body: &Map<String, Value>) -> Result<NewTrade, ApiError> {
        let side = match body.get("side") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(ApiError::bad_request("side must be a string")),
            None => return Err(ApiError::bad_request("missing field side")),
        };
        let price_text = match body.get("price") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "price must be a decimal string such as \"0.63\"",
                ))
            }
            None => return Err(ApiError::bad_request("missing field price")),
        };
        let qty = match body.get("qty") {
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.as_i64(),
            Some(_) => return Err(ApiError::bad_request("qty must be an integer")),
            None => return Err(ApiError::bad_request("missing field qty")),
        };
        let opt_string = |k: &str| match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::bad_request(format!("{k} must be a string"))),
        };
        let client_order_id = opt_string("client_order_id")?;
        let trader = opt_string("trader")?;

        let side = match side {
            "yes" => "yes",
            "no" => "no",
            other => {
                return Err(ApiError::invalid(format!(
                    "side must be \"yes\" or \"no\", not {other:?}"
                )))
            }
        };
        let price = normalize_price(&price_text)?;
        let qty = match qty {
            Some(q) if (1..=1_000_000_000).contains(&q) => q,
            _ => return Err(ApiError::invalid("qty must be between 1 and 1000000000")),
        };
        for (k, v) in [("client_order_id", &client_order_id), ("trader", &trader)] {
            if let Some(v) = v {
                if v.is_empty() || v.len() > MAX_ID_BYTES {
                    return Err(ApiError::invalid(format!(
                        "{k} must be 1 to {MAX_ID_BYTES} bytes"
                    )));
                }
                // Postgres text cannot hold NUL: refused here it is a 422 for
                // this request alone, instead of a 22021 that fails the whole
                // batch and then answers this request 500.
                if v.contains('\0') {
                    return Err(ApiError::invalid(format!("{k} must not contain NUL")));
                }
            }
        }
        Ok(NewTrade {
            market: market.to_string(),
            side,
            price,
            qty,
            trader,
            client_order_id,
        })
    }
}

/// "0.63" -> "0.6300". Exactly representable prices only: more than four
/// decimal places is refused rather than rounded.
pub fn normalize_price(s: &str) -> Result<String, ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "price {s:?} must be a decimal between 0.0001 and 0.9999 with at most 4 places"
        ))
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if !int.bytes().all(|c| c == b'0')
        || frac.len() > 4
        || !frac.bytes().all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    let ticks: u32 = format!("{frac:0<4}").parse().map_err(|_| bad())?;
    if ticks == 0 {
        return Err(bad());
    }
    Ok(format!("0.{ticks:04}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tokens_match_only_exactly() {
        assert!(token_matches(b"s3cret-token", b"s3cret-token"));
        for given in [
            &b"s3cret-tokeN"[..],
            b"s3cret-toke",
            b"s3cret-token!",
            b"",
            b"S3CRET-TOKEN",
        ] {
            assert!(!token_matches(given, b"s3cret-token"), "{given:?}");
        }
    }

    #[test]
    fn prices() {
        assert_eq!(normalize_price("0.63").unwrap(), "0.6300");
        assert_eq!(normalize_price(".5").unwrap(), "0.5000");
        assert_eq!(normalize_price("0.0001").unwrap(), "0.0001");
        assert_eq!(normalize_price("0.9999").unwrap(), "0.9999");
        for bad in [
            "0", "1", "1.0", "0.0000", "0.00001", "-0.5", "abc", "", ".", "0.5e1", " 0.5",
        ] {
            assert!(normalize_price(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trade_page_queries() {
        assert_eq!(parse_trades_query("").unwrap(), (0, 100));
        assert_eq!(
            parse_trades_query("after_seq=5&limit=1000").unwrap(),
            (5, 1000)
        );
        // Found by the property test: unknown keys used to be parsed as
        // integers too, so `?_=abc` was a 400.
        assert_eq!(parse_trades_query("_=abc&limit=7").unwrap(), (0, 7));
        let status = |q| parse_trades_query(q).unwrap_err().status;
        assert_eq!(status("after_seq=x"), StatusCode::BAD_REQUEST);
        assert_eq!(status("after_seq=-1"), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status("limit=0"), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status("limit=1001"), StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn market_page_queries() {
        assert_eq!(parse_markets_query("").unwrap(), (None, MAX_MARKETS_PAGE));
        assert_eq!(
            parse_markets_query("after=B-1&limit=2&_=x").unwrap(),
            (Some("B-1".into()), 2)
        );
        let status = |q| parse_markets_query(q).unwrap_err().status;
        assert_eq!(status("limit=x"), StatusCode::BAD_REQUEST);
        assert_eq!(status("limit=0"), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status("limit=1001"), StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn market_ids() {
        assert!(validate_market_id("ELECTION-2028").is_ok());
        assert!(validate_market_id("a.b:c_d-e").is_ok());
        assert!(validate_market_id(&"a".repeat(64)).is_ok());
        for bad in ["", "-x", "a b", &"a".repeat(65), "é"] {
            assert!(validate_market_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trade_requests() {
        let parse = |v: Value| NewTrade::parse("M", v.as_object().unwrap());
        let t = parse(json!({"side":"no","price":"0.25","qty":3,"client_order_id":"c1"})).unwrap();
        assert_eq!(
            (
                t.side,
                t.price.as_str(),
                t.qty,
                t.client_order_id.as_deref()
            ),
            ("no", "0.2500", 3, Some("c1"))
        );
        assert_eq!(
            parse(json!({"side":"yes","price":0.5,"qty":1}))
                .unwrap()
                .price,
            "0.5000"
        );
        let status = |v| parse(v).unwrap_err().status;
        assert_eq!(
            status(json!({"price":"0.5","qty":1})),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(json!({"side":1,"price":"0.5","qty":1})),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(json!({"side":"yes","price":"0.5","qty":"1"})),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(json!({"side":"yes","price":"0.5","qty":1.5})),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(json!({"side":"maybe","price":"0.5","qty":1})),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(json!({"side":"yes","price":"1.5","qty":1})),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(json!({"side":"yes","price":"0.5","qty":0})),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(json!({"side":"yes","price":"0.5","qty":1_000_000_001u64})),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(json!({"side":"yes","price":"0.5","qty":-1})),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}
