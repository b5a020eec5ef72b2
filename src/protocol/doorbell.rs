//! The doorbell: the payload the trigger NOTIFYs on a shard's channel at
//! commit, `{"m":"<market>","s":<seq>}`. It is never trusted as a trade
//! (anyone who can connect can NOTIFY): it only makes the hub read the log.

use serde::Deserialize;

use super::market::is_market_id;

/// The channel of shard `shard`: `marketcast_shard_<k>`.
pub fn channel(shard: u32) -> String {
    format!("marketcast_shard_{shard}")
}

/// The doorbell payload written by the trigger: `{"m":"<market>","s":<seq>}`.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct Doorbell {
    pub m: String,
    pub s: i64,
}

/// Parse a payload; None for anything that is not a doorbell: a JSON object
/// whose `m` is a market id (docs/PROTOCOL.md grammar) and `s` an integer >= 1.
/// Extra fields are ignored (a later trigger may add some).
pub fn parse_doorbell(payload: &str) -> Option<Doorbell> {
    // Objects only: a derived Deserialize also takes the array `["M",1]`.
    if !payload
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return None;
    }
    let d: Doorbell = serde_json::from_str(payload).ok()?;
    (d.s >= 1 && is_market_id(&d.m)).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbells() {
        assert_eq!(
            parse_doorbell(" \n{\"m\":\"A\",\"s\":1,\"x\":[]}"),
            Some(Doorbell {
                m: "A".into(),
                s: 1
            }),
            "whitespace and extra fields are fine"
        );
        assert_eq!(
            parse_doorbell(r#"{"m":"A","s":2,"x":1e869}"#),
            Some(Doorbell {
                m: "A".into(),
                s: 2
            }),
            "an extra field is skipped, even a number no f64 holds (valid JSON)"
        );
        assert_eq!(
            parse_doorbell(r#"{"m":"ELECTION-2028","s":1042}"#),
            Some(Doorbell {
                m: "ELECTION-2028".into(),
                s: 1042
            })
        );
        for bad in [
            "",
            "x",
            "{}",
            r#"{"m":"A"}"#,
            r#"{"m":"A","s":0}"#,
            r#"{"m":"A","s":"1"}"#,
            r#"{"m":"","s":1}"#,
            r#"[1]"#,
            // Found by the proptest model: a derived Deserialize takes arrays.
            r#"["A",1]"#,
            // Not a market id: no such market can exist.
            r#"{"m":"a b","s":1}"#,
            r#"{"m":"-x","s":1}"#,
            r#"{"m":"é","s":1}"#,
            r#"{"m":"A","s":1,"s":2}"#,
            r#"{"m":"A","s":1.0}"#,
            r#"{"m":"A","s":9223372036854775808}"#,
        ] {
            assert_eq!(parse_doorbell(bad), None, "{bad}");
        }
    }
}
