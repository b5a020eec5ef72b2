//! Signed notifications (`sql/0005_signed_notifications.sql`): a payload
//! that carries the whole trade, the market's epoch, a key id and an
//! HMAC-SHA256 over the rest, which the broadcaster may publish without
//! reading the log. Everything that is not a well-formed payload with a
//! valid MAC under a known key is at most a doorbell ([`super::doorbell`]).
//!
//! The MAC covers the received bytes themselves: everything before
//! `,"h":"<64 hex>"}` (the body), so there is no canonical form to agree
//! on. The body, closed with `}`, must then parse as exactly the trigger's
//! fields (no other, none twice).

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::market::is_market_id;
use super::trade::Trade;

/// What follows the body: `,"h":"` + 64 lowercase hex digits + `"}`.
const MAC_PREFIX: &str = ",\"h\":\"";
const MAC_HEX: usize = 64;
const SUFFIX_LEN: usize = MAC_PREFIX.len() + MAC_HEX + 2;

/// The verification keys the broadcaster read from
/// `marketcast_notify_keys`, by id. Each holds HMAC's keyed state, so a
/// verification costs two SHA-256 passes over the body and no key setup.
#[derive(Clone, Default)]
pub struct NotifyKeys {
    keys: Vec<(i32, Hmac<Sha256>)>,
}

impl std::fmt::Debug for NotifyKeys {
    // Never the key material, not even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<i32> = self.keys.iter().map(|(id, _)| *id).collect();
        f.debug_struct("NotifyKeys").field("ids", &ids).finish()
    }
}

impl NotifyKeys {
    /// Keys as `(id, key bytes)` rows.
    pub fn new<K: AsRef<[u8]>>(rows: impl IntoIterator<Item = (i32, K)>) -> Self {
        NotifyKeys {
            keys: rows
                .into_iter()
                .map(|(id, k)| {
                    let mac = Hmac::<Sha256>::new_from_slice(k.as_ref())
                        .expect("HMAC takes a key of any length");
                    (id, mac)
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn get(&self, id: i32) -> Option<&Hmac<Sha256>> {
        self.keys.iter().find(|(k, _)| *k == id).map(|(_, m)| m)
    }
}

/// A verified payload: a trade exactly as the log holds it, and the epoch of
/// its market's log when the trigger wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedTrade {
    pub trade: Trade,
    pub epoch: String,
}

/// Why a payload is not a [`SignedTrade`]; each is read from the log as a
/// doorbell (if it is one), and counted by its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsigned {
    /// No MAC: a plain doorbell (an older trigger, or the fallback for a
    /// payload that would exceed NOTIFY's 8000 bytes).
    Plain,
    /// A MAC, but a body that is not the trigger's fields.
    Malformed,
    /// Signed with a key id this broadcaster does not hold (yet: a rotation
    /// it has not loaded, or a forgery).
    UnknownKey(i32),
    /// The MAC does not match: forged or altered.
    BadMac,
}

impl Unsigned {
    /// The `outcome` label of `marketcast_notification_outcomes_total`.
    pub fn label(self) -> &'static str {
        match self {
            Unsigned::Plain => "doorbell",
            Unsigned::Malformed => "malformed",
            Unsigned::UnknownKey(_) => "unknown_key",
            Unsigned::BadMac => "bad_mac",
        }
    }
}

/// The trigger's fields, in its order; nothing else is accepted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    m: String,
    s: i64,
    e: String,
    i: i64,
    d: String,
    p: String,
    q: i64,
    c: i64,
    k: i32,
}

/// Verify `payload` with `keys` and return the trade it carries. Pure, and
/// constant-time in the comparison of the MAC.
pub fn verify(payload: &str, keys: &NotifyKeys) -> Result<SignedTrade, Unsigned> {
    let bytes = payload.as_bytes();
    if bytes.len() < SUFFIX_LEN || !bytes.ends_with(b"\"}") {
        return Err(Unsigned::Plain);
    }
    let (body, suffix) = bytes.split_at(bytes.len() - SUFFIX_LEN);
    let Some(hex) = suffix.strip_prefix(MAC_PREFIX.as_bytes()) else {
        return Err(Unsigned::Plain);
    };
    let mac = decode_hex(&hex[..MAC_HEX]).ok_or(Unsigned::Malformed)?;
    // The body is parsed before the MAC is checked, to learn the key id;
    // parsing untrusted JSON is what every doorbell already costs.
    let mut closed = Vec::with_capacity(body.len() + 1);
    closed.extend_from_slice(body);
    closed.push(b'}');
    if !closed.starts_with(b"{") {
        return Err(Unsigned::Malformed);
    }
    let b: Body = serde_json::from_slice(&closed).map_err(|_| Unsigned::Malformed)?;
    let key = keys.get(b.k).ok_or(Unsigned::UnknownKey(b.k))?;
    let mut h = key.clone();
    h.update(body);
    h.verify_slice(&mac).map_err(|_| Unsigned::BadMac)?;
    // Authentic: the trigger wrote it. The checks below only guard against a
    // trigger that changed without this code (then: read the log).
    let plausible = b.s >= 1
        && is_market_id(&b.m)
        && (b.d == "yes" || b.d == "no")
        && is_price(&b.p)
        && (1..=1_000_000_000).contains(&b.q);
    if !plausible {
        return Err(Unsigned::Malformed);
    }
    Ok(SignedTrade {
        trade: Trade {
            trade_id: b.i,
            market: b.m,
            seq: b.s,
            side: b.d,
            price: b.p,
            qty: b.q,
            ts_micros: b.c,
        },
        epoch: b.e,
    })
}

/// numeric(5,4)'s text form in the log's range: `0.` and four digits.
fn is_price(p: &str) -> bool {
    let b = p.as_bytes();
    b.len() == 6 && b.starts_with(b"0.") && b[2..].iter().all(u8::is_ascii_digit) && p != "0.0000"
}

/// What the trigger sends for `body` (the payload up to its MAC, without
/// the closing brace): `body` + `,"h":"<HMAC-SHA256 of body, lowercase
/// hex>"}`. The Rust mirror of `sql/0005_signed_notifications.sql`, which
/// the tests sign with: [`verify`] accepts exactly what this returns.
pub fn sign(key: &[u8], body: &str) -> String {
    use std::fmt::Write;
    let mut h = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    h.update(body.as_bytes());
    let mut out = String::with_capacity(body.len() + SUFFIX_LEN);
    out.push_str(body);
    out.push_str(MAC_PREFIX);
    for b in h.finalize().into_bytes() {
        let _ = write!(out, "{b:02x}"); // writing to a String cannot fail
    }
    out.push_str("\"}");
    out
}

/// Lowercase hex only, as Postgres's `encode(.., 'hex')` writes it.
fn decode_hex(hex: &[u8]) -> Option<[u8; 32]> {
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = nib(pair[0])? << 4 | nib(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn body(k: i32) -> String {
        format!(
            r#"{{"m" : "ELECTION-2028", "s" : 1042, "e" : "e1", "i" : 88123, "d" : "yes", "p" : "0.6300", "q" : 25, "c" : 1795757462123456, "k" : {k}"#
        )
    }

    fn keys() -> NotifyKeys {
        NotifyKeys::new([(1, KEY.to_vec()), (2, vec![9u8; 32])])
    }

    fn expected() -> SignedTrade {
        SignedTrade {
            trade: Trade {
                trade_id: 88123,
                market: "ELECTION-2028".into(),
                seq: 1042,
                side: "yes".into(),
                price: "0.6300".into(),
                qty: 25,
                ts_micros: 1_795_757_462_123_456,
            },
            epoch: "e1".into(),
        }
    }

    #[test]
    fn a_good_mac_gives_the_trade_and_its_frame() {
        let p = sign(&KEY, &body(1));
        let got = verify(&p, &keys()).unwrap();
        assert_eq!(got, expected());
        // The frame the hub would publish is the one a log row with these
        // values encodes to (src/protocol/trade.rs's contract test).
        assert_eq!(
            String::from_utf8(got.trade.to_json()).unwrap(),
            r#"{"type":"trade","market":"ELECTION-2028","seq":1042,"trade_id":88123,"side":"yes","price":"0.6300","qty":25,"ts":"2026-11-27T05:31:02.123456Z"}"#
        );
        // Also as a doorbell, for a broadcaster that predates signing.
        let d = super::super::doorbell::parse_doorbell(&p).unwrap();
        assert_eq!((d.m.as_str(), d.s), ("ELECTION-2028", 1042));
    }

    #[test]
    fn any_flipped_byte_fails() {
        let p = sign(&KEY, &body(1));
        for at in 0..p.len() {
            let mut b = p.clone().into_bytes();
            b[at] ^= 0x01;
            let Ok(s) = String::from_utf8(b) else {
                continue;
            };
            assert!(verify(&s, &keys()).is_err(), "byte {at} flipped: {s}");
        }
    }

    #[test]
    fn a_price_changed_under_a_kept_mac_fails() {
        let p = sign(&KEY, &body(1)).replace("0.6300", "0.9999");
        assert_eq!(verify(&p, &keys()), Err(Unsigned::BadMac));
    }

    #[test]
    fn the_wrong_key_or_an_unknown_id_fails() {
        // Signed with key 2's bytes but naming key 1, and the reverse.
        assert_eq!(
            verify(&sign(&[9u8; 32], &body(1)), &keys()),
            Err(Unsigned::BadMac)
        );
        assert_eq!(
            verify(&sign(&KEY, &body(2)), &keys()),
            Err(Unsigned::BadMac)
        );
        assert_eq!(
            verify(&sign(&KEY, &body(3)), &keys()),
            Err(Unsigned::UnknownKey(3))
        );
        assert_eq!(
            verify(&sign(&KEY, &body(1)), &NotifyKeys::default()),
            Err(Unsigned::UnknownKey(1))
        );
    }

    #[test]
    fn another_epoch_is_another_payload() {
        // The epoch is under the MAC: changing it breaks the MAC, and a
        // genuinely signed other epoch comes out as that epoch (the hub
        // compares it with the market's).
        let p = sign(&KEY, &body(1)).replace("\"e1\"", "\"e2\"");
        assert_eq!(verify(&p, &keys()), Err(Unsigned::BadMac));
        let p = sign(&KEY, &body(1).replace("\"e1\"", "\"e2\""));
        assert_eq!(verify(&p, &keys()).unwrap().epoch, "e2");
    }

    #[test]
    fn truncated_payloads_are_not_signed() {
        let p = sign(&KEY, &body(1));
        for n in 0..p.len() {
            let r = verify(&p[..n], &keys());
            assert!(r.is_err(), "{n}: {r:?}");
        }
        // Plain doorbells, old and fallback alike.
        assert_eq!(
            verify(r#"{"m" : "A", "s" : 1}"#, &keys()),
            Err(Unsigned::Plain)
        );
    }

    #[test]
    fn extra_missing_or_repeated_fields_are_refused_even_when_signed() {
        for b in [
            format!("{}, \"x\" : 1", body(1)),
            body(1).replace(", \"q\" : 25", ""),
            format!("{}, \"s\" : 1043", body(1)),
            body(1).replace("{", "["),
        ] {
            assert_eq!(
                verify(&sign(&KEY, &b), &keys()),
                Err(Unsigned::Malformed),
                "{b}"
            );
        }
    }

    #[test]
    fn huge_or_implausible_numbers_are_refused_even_when_signed() {
        for (from, to) in [
            ("\"s\" : 1042", "\"s\" : 9223372036854775808"),
            ("\"s\" : 1042", "\"s\" : 1e3"),
            ("\"s\" : 1042", "\"s\" : 0"),
            ("\"q\" : 25", "\"q\" : 1000000001"),
            ("\"c\" : 1795757462123456", "\"c\" : 1e999"),
            ("\"k\" : 1", "\"k\" : 4294967297"),
            ("\"p\" : \"0.6300\"", "\"p\" : \"1.5\""),
            ("\"d\" : \"yes\"", "\"d\" : \"maybe\""),
        ] {
            let b = body(1).replace(from, to);
            assert_eq!(
                verify(&sign(&KEY, &b), &keys()),
                Err(Unsigned::Malformed),
                "{b}"
            );
        }
    }

    #[test]
    fn uppercase_or_short_macs_are_not_accepted() {
        let p = sign(&KEY, &body(1));
        let (head, mac) = p.split_at(p.len() - 66);
        let upper = format!("{head}{}", mac.to_uppercase());
        assert!(verify(&upper, &keys()).is_err());
    }
}
