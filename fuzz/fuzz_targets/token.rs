//! A bearer token (contract 1.1 section 1): anything a client puts in an
//! `Authorization` header, a `?token=` or an `auth` op. The input is
//! `<Authorization value>\n<rest>`. The header value goes to `bearer`; `rest`
//! goes to `Verifier::verify` twice: as a token (a fuzzer cannot forge the
//! HMAC, so this explores the framing: nothing may panic or be accepted), and
//! as the claims of a token signed here with the verifier's secret, so that
//! the claim rules are explored past the signature. Whatever is accepted must
//! be a JSON object with a numeric `exp`, inside its time bounds.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use marketcast::protocol::token::{bearer, TokenError, Verifier};
use serde_json::Value;

const SECRET: &str = "fuzz-secret-of-at-least-thirty-two-bytes";
const NOW: i64 = 1_796_000_000;
const LEEWAY: i64 = 30;

static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    Verifier::new(Some(SECRET), None, Duration::from_secs(LEEWAY as u64))
        .expect("a valid secret")
        .expect("keys configured")
});

fuzz_target!(|data: &[u8]| {
    let (header, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };

    if let Some(token) = bearer(header) {
        let scheme = header.get(..6).expect("a Bearer scheme is 6 bytes");
        assert!(scheme.eq_ignore_ascii_case(b"bearer"));
        assert!(header.len() == 6 || header[6] == b' ');
        assert_eq!(token.trim_matches([' ', '\t']), token);
    } else {
        assert!(
            !header
                .get(..6)
                .is_some_and(|s| s.eq_ignore_ascii_case(b"bearer"))
                || header.get(6).is_some_and(|&b| b != b' ')
        );
    }

    let raw = String::from_utf8_lossy(rest);
    if let Ok(grant) = VERIFIER.verify(&raw, NOW) {
        panic!("accepted an unsigned input: {grant:?}");
    }

    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#),
        URL_SAFE_NO_PAD.encode(rest)
    );
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
        .expect("HMAC signs anything");
    let result = VERIFIER.verify(&format!("{message}.{signature}"), NOW);
    let claims = || match serde_json::from_slice::<Value>(rest) {
        Ok(Value::Object(o)) => o,
        other => panic!("accepted claims that are not an object: {other:?}"),
    };
    match result {
        Ok(grant) => {
            assert!(claims().get("exp").is_some_and(Value::is_number));
            assert_eq!(grant.valid_until, grant.exp.saturating_add(LEEWAY));
            assert!(NOW < grant.valid_until);
        }
        Err(TokenError::Expired) => assert!(claims().get("exp").is_some_and(Value::is_number)),
        Err(TokenError::Invalid(m)) => assert!(!m.is_empty()),
    }
});
