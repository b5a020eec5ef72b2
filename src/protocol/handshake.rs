//! The opening handshake's rules a server must hold (RFC 6455 section 4.2.1),
//! checked before fastwebsockets answers 101: fastwebsockets checks that
//! the key and the version are there, not what they hold.

use base64::Engine;
use hyper::{header, Request, Version};

/// The only version of the protocol there is.
pub const WEBSOCKET_VERSION: &str = "13";

/// Why an upgrade request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `Sec-WebSocket-Version` is not 13: 426 with `Sec-WebSocket-Version: 13`
    /// (section 4.4), so the client can retry with a version we speak.
    Version,
    /// Anything else malformed: 400 with this reason.
    Malformed(&'static str),
}

/// Check an upgrade request that already asks for `Upgrade: websocket`.
pub fn check<B>(req: &Request<B>) -> Result<(), Refusal> {
    // Section 4.1: "the HTTP version MUST be at least 1.1" (HTTP/2 is not
    // served at all).
    if req.version() != Version::HTTP_11 {
        return Err(Refusal::Malformed("a WebSocket upgrade needs HTTP/1.1"));
    }
    let h = req.headers();
    if !h.contains_key(header::HOST) {
        return Err(Refusal::Malformed(
            "a WebSocket upgrade needs a Host header",
        ));
    }
    let version = h
        .get_all(header::SEC_WEBSOCKET_VERSION)
        .iter()
        .collect::<Vec<_>>();
    if version.len() != 1 || version[0] != WEBSOCKET_VERSION {
        return Err(Refusal::Version);
    }
    // Section 4.1: the key is a random 16-byte value, base64-encoded.
    let key = h
        .get_all(header::SEC_WEBSOCKET_KEY)
        .iter()
        .collect::<Vec<_>>();
    let decoded = match key.as_slice() {
        [k] => base64::engine::general_purpose::STANDARD
            .decode(k.as_bytes())
            .ok(),
        _ => None,
    };
    if decoded.is_none_or(|k| k.len() != 16) {
        return Err(Refusal::Malformed(
            "Sec-WebSocket-Key must be the base64 of 16 bytes",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/ws").version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const GOOD: &[(&str, &str)] = &[
        ("host", "x"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    fn without(name: &str) -> Vec<(&'static str, &'static str)> {
        GOOD.iter().copied().filter(|(k, _)| *k != name).collect()
    }

    fn with(name: &'static str, value: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut h = without(name);
        h.push((name, value));
        h
    }

    #[test]
    fn the_rfc_sample_handshake_passes() {
        assert_eq!(check(&req(Version::HTTP_11, GOOD)), Ok(()));
    }

    #[test]
    fn http_1_0_and_a_missing_host_are_refused() {
        assert!(matches!(
            check(&req(Version::HTTP_10, GOOD)),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            check(&req(Version::HTTP_11, &without("host"))),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn any_version_but_13_is_a_426() {
        for v in ["8", "12", "14", "13, 8", ""] {
            let h = with("sec-websocket-version", v);
            assert_eq!(
                check(&req(Version::HTTP_11, &h)),
                Err(Refusal::Version),
                "{v}"
            );
        }
        let h = without("sec-websocket-version");
        assert_eq!(check(&req(Version::HTTP_11, &h)), Err(Refusal::Version));
    }

    #[test]
    fn the_key_must_be_16_bytes_in_base64() {
        for k in [
            "",
            "not base64!",
            "dGhlIHNhbXBsZQ==",
            "dGhlIHNhbXBsZSBub25jZSEh",
        ] {
            let h = with("sec-websocket-key", k);
            assert!(
                matches!(
                    check(&req(Version::HTTP_11, &h)),
                    Err(Refusal::Malformed(_))
                ),
                "{k:?}"
            );
        }
        let h = without("sec-websocket-key");
        assert!(matches!(
            check(&req(Version::HTTP_11, &h)),
            Err(Refusal::Malformed(_))
        ));
    }
}
