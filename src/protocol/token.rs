//! Tokens (docs/PROTOCOL.md, "Tokens"; contract 1.1 section 1): when a JSON
//! Web Token is valid, what it grants, and where a request carries it.
//!
//! A [`Verifier`] is built once from the options and then only answers
//! questions: [`Verifier::verify`] takes the token *and the clock*, so every
//! rule is unit-tested here without waiting for time to pass.
//!
//! `jsonwebtoken` does the cryptography (HMAC-SHA256, RSASSA-PKCS1-v1_5 with
//! SHA-256, Ed25519) and nothing else. Its claim validation is not used: it
//! reads the system clock, refuses negative times, rounds a fractional `exp`
//! up, refuses a token with an `aud` when no audience is configured and
//! refuses headers whose `kid` is not a string, while the contract ignores
//! `aud` and every header field but `alg`. So the header's `alg` and every
//! claim are read here, in the order of the contract: signature, then shape,
//! then time, which makes [`TokenError::Expired`] mean "a genuine token,
//! used at the wrong time".
//!
//! Nothing in this module puts a token, a secret or a key into a message:
//! errors name the option or the claim, and [`Verifier`]'s `Debug` counts
//! keys instead of printing them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use rsa::pkcs8::spki::SubjectPublicKeyInfoRef;
use rsa::pkcs8::ObjectIdentifier;
use rsa::traits::PublicKeyParts;
use serde_json::{Map, Value};

/// Shortest accepted `--jwt-hs256-secret`: 256 bits, the size of the HMAC's
/// output (RFC 7518 section 3.2).
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Smallest accepted RSA modulus (RFC 7518 section 3.3).
pub const MIN_RSA_BITS: usize = 2048;

/// `id-Ed25519` (RFC 8410).
const ED25519_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
/// `rsaEncryption` (RFC 8017).
const RSA_OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Verifies tokens (contract 1.1 section 1.1): built once from the options,
/// then shared by every request (cloning shares the keys).
#[derive(Clone)]
pub struct Verifier {
    keys: Arc<Keys>,
    leeway: Duration,
}

/// The configured keys, each for its own algorithm only: a token's `alg`
/// picks the list, so an `HS256` token can never be checked against a
/// public key's bytes.
struct Keys {
    hs256: Option<DecodingKey>,
    /// Several for rotation: a token is valid when any of them verifies it.
    rs256: Vec<DecodingKey>,
    /// Several for rotation, as `rs256`.
    eddsa: Vec<DecodingKey>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.keys.hs256.is_some())
            .field("rs256_keys", &self.keys.rs256.len())
            .field("eddsa_keys", &self.keys.eddsa.len())
            .field("leeway", &self.leeway)
            .finish()
    }
}

impl Verifier {
    /// `None` when neither an HS256 secret nor public keys are given (token
    /// keys are not configured). An error, naming the option and never the
    /// secret's value, for a secret under [`MIN_HS256_SECRET_BYTES`], text
    /// that is not PEM, a PEM with no `PUBLIC KEY` block or with a block of
    /// another kind, and a key that is neither RSA of at least
    /// [`MIN_RSA_BITS`] bits nor Ed25519.
    pub fn new(
        hs256_secret: Option<&str>,
        public_keys_pem: Option<&str>,
        leeway: Duration,
    ) -> anyhow::Result<Option<Verifier>> {
        if hs256_secret.is_none() && public_keys_pem.is_none() {
            return Ok(None);
        }
        let hs256 = match hs256_secret {
            Some(s) if s.len() < MIN_HS256_SECRET_BYTES => bail!(
                "--jwt-hs256-secret must be at least {MIN_HS256_SECRET_BYTES} bytes \
                 (e.g. `openssl rand -base64 48`)"
            ),
            Some(s) => Some(DecodingKey::from_secret(s.as_bytes())),
            None => None,
        };
        let mut keys = Keys {
            hs256,
            rs256: Vec::new(),
            eddsa: Vec::new(),
        };
        if let Some(pem) = public_keys_pem {
            let blocks = pem::parse_many(pem)
                .map_err(|e| anyhow!("--jwt-public-key: not a readable PEM file: {e}"))?;
            if blocks.is_empty() {
                bail!("--jwt-public-key: the file holds no PUBLIC KEY block");
            }
            for (i, block) in blocks.iter().enumerate() {
                let n = i + 1;
                if block.tag() != "PUBLIC KEY" {
                    bail!(
                        "--jwt-public-key: block {n} is a {:?}, not a PUBLIC KEY (SPKI) block",
                        block.tag()
                    );
                }
                let key = PublicKey::parse(block.contents())
                    .with_context(|| format!("--jwt-public-key: block {n}"))?;
                match key {
                    PublicKey::Rsa(k) => keys.rs256.push(k),
                    PublicKey::Ed25519(k) => keys.eddsa.push(k),
                }
            }
        }
        Ok(Some(Verifier {
            keys: Arc::new(keys),
            leeway,
        }))
    }

    /// The clock skew allowed on `exp` and `nbf`.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Check `token` at Unix time `now` (seconds): the three rules of
    /// contract 1.1 section 1.1, in order (signature, claims, time).
    pub fn verify(&self, token: &str, now: i64) -> Result<Grant, TokenError> {
        let invalid = |m: &str| TokenError::Invalid(m.to_string());
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not three dot-separated parts"));
        };

        // 1. The header's alg picks the keys; the signature must match one.
        let header = decode_object(header_b64).ok_or_else(|| invalid("malformed header"))?;
        let (algorithm, keys): (Algorithm, &[DecodingKey]) = match header.get("alg") {
            Some(Value::String(alg)) if alg == "HS256" => {
                (Algorithm::HS256, self.keys.hs256.as_slice())
            }
            Some(Value::String(alg)) if alg == "RS256" => (Algorithm::RS256, &self.keys.rs256),
            Some(Value::String(alg)) if alg == "EdDSA" => (Algorithm::EdDSA, &self.keys.eddsa),
            Some(Value::String(_)) => {
                return Err(invalid("alg is not one of HS256, RS256, EdDSA"));
            }
            _ => return Err(invalid("header has no alg string")),
        };
        if keys.is_empty() {
            return Err(invalid("no key is configured for the token's alg"));
        }
        let message = &token[..header_b64.len() + 1 + payload_b64.len()];
        let signed = keys.iter().any(|key| {
            // Err: a malformed signature (the keys were checked at start-up).
            jsonwebtoken::crypto::verify(signature_b64, message.as_bytes(), key, algorithm)
                .unwrap_or(false)
        });
        if !signed {
            return Err(invalid("signature does not match"));
        }

        // 2. The claims' shape.
        let claims =
            decode_object(payload_b64).ok_or_else(|| invalid("payload is not a JSON object"))?;
        let exp = match claims.get("exp") {
            Some(v) => seconds(v, f64::floor).ok_or_else(|| invalid("exp is not a number"))?,
            None => return Err(invalid("exp is missing")),
        };
        let nbf = match claims.get("nbf") {
            // Rounded up: a fractional nbf is never honoured early.
            Some(v) => Some(seconds(v, f64::ceil).ok_or_else(|| invalid("nbf is not a number"))?),
            None => None,
        };
        let sub = match claims.get("sub") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(invalid("sub is not a string")),
            None => None,
        };
        let patterns = |claim: &str| match claims.get(claim) {
            Some(v) => Patterns::parse(v).map_err(|e| TokenError::Invalid(format!("{claim}: {e}"))),
            None => Ok(Patterns::default()),
        };
        let markets = patterns("markets")?;
        let write = patterns("write")?;

        // 3. Time: nbf - leeway <= now < exp + leeway.
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(i64::MAX);
        let valid_until = exp.saturating_add(leeway);
        if nbf.is_some_and(|nbf| now < nbf.saturating_sub(leeway)) || now >= valid_until {
            return Err(TokenError::Expired);
        }
        Ok(Grant {
            sub,
            exp,
            valid_until,
            markets,
            write,
        })
    }
}

/// A configured public key, by the algorithm it verifies.
enum PublicKey {
    Rsa(DecodingKey),
    Ed25519(DecodingKey),
}

impl PublicKey {
    /// One SPKI (`PUBLIC KEY`) block's DER.
    fn parse(der: &[u8]) -> anyhow::Result<PublicKey> {
        let spki = SubjectPublicKeyInfoRef::try_from(der)
            .map_err(|e| anyhow!("not a SubjectPublicKeyInfo: {e}"))?;
        if spki.algorithm.oid == RSA_OID {
            // rsa refuses moduli over 4096 bits (RsaPublicKey::MAX_SIZE),
            // here and at every verification alike.
            let key = rsa::RsaPublicKey::try_from(spki)
                .map_err(|e| anyhow!("an unusable RSA key (2048 to 4096 bits): {e}"))?;
            let bits = key.n().bits();
            if bits < MIN_RSA_BITS {
                bail!("an RSA key of {bits} bits; at least {MIN_RSA_BITS} are needed");
            }
            Ok(PublicKey::Rsa(DecodingKey::from_rsa_raw_components(
                &key.n().to_bytes_be(),
                &key.e().to_bytes_be(),
            )))
        } else if spki.algorithm.oid == ED25519_OID {
            let raw = spki
                .subject_public_key
                .as_bytes()
                .filter(|b| b.len() == 32)
                .ok_or_else(|| anyhow!("an Ed25519 key that is not 32 bytes"))?;
            let key = DecodingKey::from_ed_der(raw);
            // The backend decodes the point at each verification and answers
            // Err for a key it cannot use (Ok(false) for a bad signature):
            // refuse such a key now rather than every token later.
            jsonwebtoken::crypto::verify("", b"", &key, Algorithm::EdDSA)
                .map_err(|_| anyhow!("an Ed25519 key that is not a valid curve point"))?;
            Ok(PublicKey::Ed25519(key))
        } else {
            bail!(
                "a key of algorithm {}; only RSA (RS256) and Ed25519 (EdDSA) keys are accepted",
                spki.algorithm.oid
            )
        }
    }
}

/// A base64url part of a token that must hold a JSON object.
fn decode_object(part: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// A NumericDate claim as whole seconds: `round` decides a fraction, and
/// values beyond i64 saturate (a token valid until the year 292 billion is
/// as good as one valid forever).
fn seconds(v: &Value, round: fn(f64) -> f64) -> Option<i64> {
    let Value::Number(n) = v else { return None };
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    if n.is_u64() {
        return Some(i64::MAX);
    }
    // `as` saturates, and JSON has no NaN.
    n.as_f64().map(|f| round(f) as i64)
}

/// What a valid token grants, and until when.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub sub: Option<String>,
    /// The token's exp, whole seconds (a fractional exp is floored).
    pub exp: i64,
    /// exp + leeway: at or after this Unix second the token is no longer
    /// valid (the broadcaster closes 4001).
    pub valid_until: i64,
    /// Reading (broadcaster, writer GETs).
    pub markets: Patterns,
    /// Writing (writer POSTs).
    pub write: Patterns,
}

/// A `markets` or `write` claim (contract 1.1 section 1.2): market ids, and
/// prefixes ending in `*`. Empty (absent claim) grants nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Patterns(Vec<String>);

impl Patterns {
    /// An array claim. A pattern that is not a string, is empty, or has a
    /// `*` anywhere but at the end refuses the whole claim (and so the token).
    pub fn parse(v: &Value) -> Result<Patterns, String> {
        let Value::Array(items) = v else {
            return Err("must be an array of patterns".into());
        };
        let mut patterns = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(p)
                    if !p.is_empty() && p.find('*').is_none_or(|at| at == p.len() - 1) =>
                {
                    patterns.push(p.clone())
                }
                // The index, not the pattern: nothing of a token is echoed.
                _ => {
                    return Err(format!(
                        "pattern {i} must be a non-empty string with '*' only at its end"
                    ))
                }
            }
        }
        Ok(Patterns(patterns))
    }

    /// Whether a pattern grants `market`: the exact id (case-sensitive), a
    /// prefix followed by a final `*`, or `*`.
    pub fn matches(&self, market: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => market.starts_with(prefix),
            None => p == market,
        })
    }

    /// Whether the claim grants nothing (absent or `[]`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a presented token was refused. The message never holds the token or
/// a key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    /// Signature and shape fine, but outside nbf/exp with leeway.
    #[error("token expired or not yet valid")]
    Expired,
    /// Anything else (bad signature, alg not configured, none, malformed,
    /// bad claims).
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl TokenError {
    /// The `reason` label of `marketcast_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Expired => "expired",
            TokenError::Invalid(_) => "invalid",
        }
    }
}

/// The bearer token of an `Authorization` header value: `Some(token)` for
/// `Bearer <token>` (the scheme case-insensitive, RFC 7235), `None` for
/// another scheme, e.g. a proxy's `Basic`, which is ignored (contract 1.1
/// section 1.3). `Bearer` with nothing readable after it is `Some("")`: a
/// token was presented, and it is invalid.
pub fn bearer(header_value: &[u8]) -> Option<&str> {
    let (scheme, credentials) = match header_value.iter().position(|&b| b == b' ') {
        Some(i) => (&header_value[..i], &header_value[i + 1..]),
        None => (header_value, &b""[..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = std::str::from_utf8(credentials).unwrap_or("");
    Some(token.trim_matches([' ', '\t']))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const SECRET: &str = "test-only-secret-of-at-least-32-bytes!";
    const RSA_PUB: &str = include_str!("../../tests/keys/test-only-rsa-2048.pub.pem");
    const RSA_KEY: &str = include_str!("../../tests/keys/test-only-rsa-2048.key.pem");
    const RSA_1024_PUB: &str = include_str!("../../tests/keys/test-only-rsa-1024.pub.pem");
    const ED_A_PUB: &str = include_str!("../../tests/keys/test-only-ed25519-a.pub.pem");
    const ED_A_KEY: &str = include_str!("../../tests/keys/test-only-ed25519-a.key.pem");
    const ED_B_PUB: &str = include_str!("../../tests/keys/test-only-ed25519-b.pub.pem");
    const ED_B_KEY: &str = include_str!("../../tests/keys/test-only-ed25519-b.key.pem");
    const P256_PUB: &str = include_str!("../../tests/keys/test-only-p256.pub.pem");

    const NOW: i64 = 1_796_000_000;
    const LEEWAY: Duration = Duration::from_secs(30);

    fn hs256_verifier() -> Verifier {
        Verifier::new(Some(SECRET), None, LEEWAY).unwrap().unwrap()
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
    }

    fn hs256(claims: Value) -> String {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            &claims,
        )
    }

    /// A token of any header, signed with the secret whatever the header says.
    fn with_header(header: Value, claims: Value) -> String {
        let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
        let message = format!("{}.{}", b64(&header), b64(&claims));
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256);
        format!("{message}.{}", signature.unwrap())
    }

    fn invalid(r: Result<Grant, TokenError>) -> String {
        match r {
            Err(TokenError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_token_grants_its_claims() {
        let token = hs256(json!({
            "sub": "user-81", "exp": NOW + 60, "nbf": NOW - 60,
            "markets": ["ELECTION-*", "FED-2027-03"], "write": ["ELECTION-2028"],
            "iss": "ignored", "aud": "ignored", "iat": 1, "jti": "x",
        }));
        let grant = hs256_verifier().verify(&token, NOW).unwrap();
        assert_eq!(grant.sub.as_deref(), Some("user-81"));
        assert_eq!((grant.exp, grant.valid_until), (NOW + 60, NOW + 90));
        assert!(grant.markets.matches("ELECTION-2028"));
        assert!(grant.markets.matches("FED-2027-03"));
        assert!(!grant.markets.matches("FED-2027-04"));
        assert!(grant.write.matches("ELECTION-2028"));
        assert!(!grant.write.matches("ELECTION-2029"));
    }

    #[test]
    fn absent_claims_grant_nothing() {
        let grant = hs256_verifier()
            .verify(&hs256(json!({"exp": NOW + 60})), NOW)
            .unwrap();
        assert_eq!(grant.sub, None);
        assert!(grant.markets.is_empty() && grant.write.is_empty());
        assert!(!grant.markets.matches("A") && !grant.write.matches("A"));
    }

    #[test]
    fn other_header_fields_are_ignored() {
        let claims = json!({"exp": NOW + 60});
        let header = json!({"alg": "HS256", "typ": 7, "kid": ["not", "a", "string"]});
        assert!(hs256_verifier()
            .verify(&with_header(header, claims), NOW)
            .is_ok());
    }

    #[test]
    fn a_forged_signature_is_invalid() {
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!"),
            &json!({"exp": NOW + 60, "write": ["*"]}),
        );
        assert_eq!(
            invalid(hs256_verifier().verify(&forged, NOW)),
            "signature does not match"
        );
        // A genuine signature over other claims.
        let genuine = hs256(json!({"exp": NOW + 60}));
        let (head, rest) = genuine.split_once('.').unwrap();
        let signature = rest.split_once('.').unwrap().1;
        let payload = URL_SAFE_NO_PAD.encode(br#"{"exp":1796000060,"write":["*"]}"#);
        let spliced = format!("{head}.{payload}.{signature}");
        assert_eq!(
            invalid(hs256_verifier().verify(&spliced, NOW)),
            "signature does not match"
        );
    }

    #[test]
    fn time_bounds_with_leeway_on_both_sides() {
        let v = hs256_verifier();
        let token = hs256(json!({"exp": NOW, "nbf": NOW - 100}));
        // now < exp + leeway
        assert!(v.verify(&token, NOW + 29).is_ok());
        assert_eq!(v.verify(&token, NOW + 30), Err(TokenError::Expired));
        // nbf - leeway <= now
        assert!(v.verify(&token, NOW - 130).is_ok());
        assert_eq!(v.verify(&token, NOW - 131), Err(TokenError::Expired));

        let no_leeway = Verifier::new(Some(SECRET), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        assert!(no_leeway.verify(&token, NOW - 1).is_ok());
        assert_eq!(no_leeway.verify(&token, NOW), Err(TokenError::Expired));
        assert_eq!(
            no_leeway.verify(&token, NOW - 101),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn expired_and_not_yet_valid() {
        let v = hs256_verifier();
        let expired = hs256(json!({"exp": NOW - 31}));
        assert_eq!(v.verify(&expired, NOW), Err(TokenError::Expired));
        assert_eq!(TokenError::Expired.reason(), "expired");
        let future = hs256(json!({"exp": NOW + 3600, "nbf": NOW + 31}));
        assert_eq!(v.verify(&future, NOW), Err(TokenError::Expired));
        // Without nbf only the right-hand bound applies.
        let old = hs256(json!({"exp": NOW + 60}));
        assert!(v.verify(&old, i64::MIN).is_ok());
    }

    #[test]
    fn fractional_times_never_extend_a_token() {
        let v = Verifier::new(Some(SECRET), None, Duration::ZERO)
            .unwrap()
            .unwrap();
        let token = hs256(json!({"exp": NOW as f64 + 0.9, "nbf": NOW as f64 - 1.5}));
        let grant = v.verify(&token, NOW - 1).unwrap();
        assert_eq!((grant.exp, grant.valid_until), (NOW, NOW));
        assert_eq!(v.verify(&token, NOW), Err(TokenError::Expired));
        assert_eq!(v.verify(&token, NOW - 2), Err(TokenError::Expired));
        // Out of i64's range: saturates instead of wrapping into the past.
        let far = hs256(json!({"exp": u64::MAX}));
        assert_eq!(v.verify(&far, NOW).unwrap().exp, i64::MAX);
        let far = hs256(json!({"exp": 1e300}));
        assert_eq!(v.verify(&far, NOW).unwrap().valid_until, i64::MAX);
    }

    #[test]
    fn claims_of_the_wrong_shape_are_invalid() {
        let v = hs256_verifier();
        for (claims, why) in [
            (json!({}), "exp is missing"),
            (json!({"exp": "1796000060"}), "exp is not a number"),
            (json!({"exp": null}), "exp is not a number"),
            (json!({"exp": NOW + 60, "nbf": "0"}), "nbf is not a number"),
            (json!({"exp": NOW + 60, "sub": 81}), "sub is not a string"),
            (
                json!({"exp": NOW + 60, "markets": "ELECTION-*"}),
                "markets: must be an array of patterns",
            ),
            (
                json!({"exp": NOW + 60, "write": null}),
                "write: must be an array of patterns",
            ),
            (json!([NOW + 60]), "payload is not a JSON object"),
        ] {
            assert_eq!(
                invalid(v.verify(&hs256(claims.clone()), NOW)),
                why,
                "{claims}"
            );
        }
        // Shape is checked before time: an expired malformed token is invalid.
        let bad_expired = hs256(json!({"exp": NOW - 100, "sub": 1}));
        assert_eq!(invalid(v.verify(&bad_expired, NOW)), "sub is not a string");
    }

    #[test]
    fn one_bad_pattern_makes_the_token_invalid() {
        let v = hs256_verifier();
        for bad in [
            json!(["A", ""]),
            json!(["A", 1]),
            json!([null]),
            json!(["ELEC*TION"]),
            json!(["**"]),
            json!(["*A"]),
        ] {
            let token = hs256(json!({"exp": NOW + 60, "markets": bad.clone()}));
            let message = invalid(v.verify(&token, NOW));
            assert!(message.starts_with("markets: pattern "), "{bad}: {message}");
            let token = hs256(json!({"exp": NOW + 60, "write": bad.clone()}));
            assert!(invalid(v.verify(&token, NOW)).starts_with("write: "));
        }
    }

    #[test]
    fn patterns_match_ids_prefixes_and_everything() {
        let p = Patterns::parse(&json!(["FED-2027-03", "ELECTION-*"])).unwrap();
        assert!(p.matches("FED-2027-03"));
        assert!(!p.matches("FED-2027-030"));
        assert!(!p.matches("fed-2027-03"));
        assert!(p.matches("ELECTION-2028"));
        assert!(p.matches("ELECTION-"));
        assert!(!p.matches("election-2028"));
        assert!(!p.matches("XELECTION-1"));
        let all = Patterns::parse(&json!(["*"])).unwrap();
        assert!(all.matches("ANY") && all.matches("x"));
        let none = Patterns::parse(&json!([])).unwrap();
        assert!(none.is_empty() && !none.matches("ANY"));
    }

    #[test]
    fn only_hs256_rs256_and_eddsa_are_accepted() {
        let v = Verifier::new(Some(SECRET), Some(RSA_PUB), LEEWAY)
            .unwrap()
            .unwrap();
        let claims = json!({"exp": NOW + 60});
        let secret = EncodingKey::from_secret(SECRET.as_bytes());
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let m = invalid(v.verify(&sign(alg, &secret, &claims), NOW));
            assert_eq!(m, "alg is not one of HS256, RS256, EdDSA");
        }
        let rsa = EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap();
        for alg in [Algorithm::RS384, Algorithm::PS256] {
            let m = invalid(v.verify(&sign(alg, &rsa, &claims), NOW));
            assert_eq!(m, "alg is not one of HS256, RS256, EdDSA");
        }
        for header in [
            json!({"alg": "ES256"}),
            json!({"alg": "hs256"}),
            json!({"alg": ["HS256"]}),
            json!({"typ": "JWT"}),
        ] {
            assert!(v.verify(&with_header(header, claims.clone()), NOW).is_err());
        }
    }

    #[test]
    fn alg_none_is_refused() {
        let v = hs256_verifier();
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let payload = b64(r#"{"exp":1796000060,"write":["*"]}"#);
        for header in [r#"{"alg":"none"}"#, r#"{"alg":"None"}"#, r#"{"typ":"JWT"}"#] {
            let token = format!("{}.{payload}.", b64(header));
            assert!(
                matches!(v.verify(&token, NOW), Err(TokenError::Invalid(_))),
                "{header}"
            );
        }
    }

    #[test]
    fn an_hs256_token_keyed_with_the_public_key_is_refused() {
        // The classic confusion: the attacker knows the public key and uses
        // its PEM bytes as the HMAC secret.
        let claims = json!({"exp": NOW + 60, "write": ["*"]});
        let token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(RSA_PUB.as_bytes()),
            &claims,
        );
        let public_only = Verifier::new(None, Some(RSA_PUB), LEEWAY).unwrap().unwrap();
        assert_eq!(
            invalid(public_only.verify(&token, NOW)),
            "no key is configured for the token's alg"
        );
        let both = Verifier::new(Some(SECRET), Some(RSA_PUB), LEEWAY)
            .unwrap()
            .unwrap();
        assert_eq!(
            invalid(both.verify(&token, NOW)),
            "signature does not match"
        );
        // And an EdDSA key never checks an RS256 token, nor the reverse.
        let ed_only = Verifier::new(None, Some(ED_A_PUB), LEEWAY)
            .unwrap()
            .unwrap();
        let rs = sign(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap(),
            &claims,
        );
        assert!(ed_only.verify(&rs, NOW).is_err());
        let ed = sign(
            Algorithm::EdDSA,
            &EncodingKey::from_ed_pem(ED_A_KEY.as_bytes()).unwrap(),
            &claims,
        );
        assert!(public_only.verify(&ed, NOW).is_err());
        assert!(ed_only.verify(&ed, NOW).is_ok());
    }

    #[test]
    fn rs256_with_a_generated_key() {
        let v = Verifier::new(None, Some(RSA_PUB), LEEWAY).unwrap().unwrap();
        let key = EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap();
        let token = sign(
            Algorithm::RS256,
            &key,
            &json!({"exp": NOW + 60, "markets": ["*"]}),
        );
        assert!(v.verify(&token, NOW).unwrap().markets.matches("X"));
        assert_eq!(v.verify(&token, NOW + 90), Err(TokenError::Expired));
        // One flipped signature byte.
        let mut forged = token.into_bytes();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(matches!(
            v.verify(&forged, NOW),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn eddsa_keys_rotate_by_listing_several() {
        let claims = json!({"exp": NOW + 60});
        let a = sign(
            Algorithm::EdDSA,
            &EncodingKey::from_ed_pem(ED_A_KEY.as_bytes()).unwrap(),
            &claims,
        );
        let b = sign(
            Algorithm::EdDSA,
            &EncodingKey::from_ed_pem(ED_B_KEY.as_bytes()).unwrap(),
            &claims,
        );
        let only_a = Verifier::new(None, Some(ED_A_PUB), LEEWAY)
            .unwrap()
            .unwrap();
        assert!(only_a.verify(&a, NOW).is_ok());
        assert_eq!(invalid(only_a.verify(&b, NOW)), "signature does not match");
        let file = format!("# rotation: old key first\n{ED_A_PUB}{RSA_PUB}\n{ED_B_PUB}");
        let both = Verifier::new(None, Some(&file), LEEWAY).unwrap().unwrap();
        assert!(both.verify(&a, NOW).is_ok());
        assert!(both.verify(&b, NOW).is_ok());
        assert_eq!(
            format!("{both:?}"),
            "Verifier { hs256: false, rs256_keys: 1, eddsa_keys: 2, leeway: 30s }"
        );
    }

    #[test]
    fn malformed_tokens_are_invalid() {
        let v = hs256_verifier();
        let good = hs256(json!({"exp": NOW + 60}));
        for bad in [
            String::new(),
            "a.b".into(),
            "a.b.c.d".into(),
            "...".into(),
            format!("{good}."),
            format!("{good}=="),
            format!(".{good}"),
            good.replace('.', ".."),
            "\u{0}.\u{0}.\u{0}".into(),
        ] {
            assert!(
                matches!(v.verify(&bad, NOW), Err(TokenError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert_eq!(TokenError::Invalid("x".into()).reason(), "invalid");
    }

    #[test]
    fn messages_hold_neither_the_token_nor_the_secret() {
        let v = hs256_verifier();
        let token = hs256(json!({"exp": NOW + 60, "markets": ["ok", "bad*pattern"]}));
        let message = v.verify(&token, NOW).unwrap_err().to_string();
        assert!(!message.contains("bad*pattern") && !message.contains(&token));
        assert!(!format!("{v:?}").contains(SECRET));
        let short = "short-secret-value";
        let e = Verifier::new(Some(short), None, LEEWAY).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("--jwt-hs256-secret") && !e.contains(short),
            "{e}"
        );
    }

    #[test]
    fn key_options_refused_at_start() {
        assert!(Verifier::new(None, None, LEEWAY).unwrap().is_none());
        assert!(Verifier::new(Some(&"s".repeat(32)), None, LEEWAY)
            .unwrap()
            .is_some());
        let refused = |pem: &str| {
            let e = Verifier::new(None, Some(pem), LEEWAY).unwrap_err();
            let e = format!("{e:#}");
            assert!(e.starts_with("--jwt-public-key"), "{e}");
            e
        };
        assert!(refused("").contains("no PUBLIC KEY block"));
        assert!(refused("not a key at all").contains("no PUBLIC KEY block"));
        assert!(
            refused("-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n")
                .contains("not a readable PEM")
        );
        assert!(refused(RSA_1024_PUB).contains("1024 bits"));
        assert!(refused(P256_PUB).contains("1.2.840.10045.2.1"));
        let private = refused(&format!("{RSA_PUB}{RSA_KEY}"));
        assert!(
            private.contains("block 2 is a \"PRIVATE KEY\""),
            "{private}"
        );
        assert!(!private.contains(RSA_KEY.lines().nth(1).unwrap()));
        let garbage = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert!(refused(garbage).contains("not a SubjectPublicKeyInfo"));
    }

    #[test]
    fn bearer_tokens_from_the_authorization_header() {
        assert_eq!(bearer(b"Bearer abc.def.ghi"), Some("abc.def.ghi"));
        assert_eq!(bearer(b"bearer abc"), Some("abc"));
        assert_eq!(bearer(b"BEARER  abc "), Some("abc"));
        assert_eq!(bearer(b"Bearer"), Some(""));
        assert_eq!(bearer(b"Bearer \xff\xfe"), Some(""));
        assert_eq!(bearer(b"Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b""), None);
        assert_eq!(bearer(b"Token abc"), None);
    }
}
