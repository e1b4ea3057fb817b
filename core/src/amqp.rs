//! The headers the worker writes on jobs it delays or dead-letters, and how any message's
//! headers are read back: the count of failed attempts (believed only under the fleet's seal),
//! the failure the worker recorded, and the broker's death records.
//!
//! Anyone who can publish a job can set any header, so the count of failed attempts is believed
//! only when it carries the worker's seal ([`HeaderSeal`]): an HMAC, under a key from config,
//! of the count and the job's body. A producer that sets `x-imagegen-attempts: 99` gets a job
//! with no failed attempts, not a job failed without a call.

use std::collections::BTreeMap;

use amq_protocol_types::{AMQPValue, FieldTable, LongString, ShortString};
use ring::hmac;
use sha2::{Digest, Sha256};

/// Header carrying the count of provider attempts that really failed, across deliveries.
pub const ATTEMPTS_HEADER: &str = "x-imagegen-attempts";
/// The error kind of a job the worker dead-lettered.
pub const ERROR_KIND_HEADER: &str = "x-imagegen-error-kind";
/// The error message of a job the worker dead-lettered.
pub const ERROR_MESSAGE_HEADER: &str = "x-imagegen-error";
/// The seal of the attempts header: hex HMAC-SHA256 of the count and the body's digest.
pub const SEAL_HEADER: &str = "x-imagegen-seal";
/// Header saying how many of the producer's headers were left off a republished message.
pub const HEADERS_DROPPED_HEADER: &str = "x-imagegen-headers-dropped";
/// Header of a job the batch lane sent back to be called live (its provider batch expired or
/// failed): `live` wins over the body's `lane` and the deadline routing, so the job does not go
/// back to the lane.
pub const LANE_HEADER: &str = "x-imagegen-lane";
/// The broker's record of a message's deaths (dead-lettering), newest first.
pub const DEATH_HEADER: &str = "x-death";

/// Seals and checks the worker's own headers with a key shared by the fleet.
pub struct HeaderSeal {
    key: hmac::Key,
}

impl HeaderSeal {
    /// A seal with `secret` as its key; an empty secret gives a random key of this process
    /// alone (counts written by other workers, or before a restart, are then not believed:
    /// jobs get more attempts, never fewer).
    pub fn new(secret: &[u8]) -> Self {
        let key = if secret.is_empty() {
            let rng = ring::rand::SystemRandom::new();
            hmac::Key::generate(hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
                hmac::Key::new(hmac::HMAC_SHA256, &fastrand::u64(..).to_be_bytes())
            })
        } else {
            hmac::Key::new(hmac::HMAC_SHA256, secret)
        };
        Self { key }
    }

    /// The headers that carry `attempts` for the message `body`.
    pub fn attempts_headers(&self, attempts: u32, body: &[u8]) -> [(&'static str, AMQPValue); 2] {
        let tag = hmac::sign(&self.key, &signed_input(attempts, body));
        let tag = hex::encode(tag.as_ref());
        [
            (ATTEMPTS_HEADER, attempts_value(attempts)),
            (SEAL_HEADER, AMQPValue::LongString(LongString::from(tag))),
        ]
    }

    /// The count of failed attempts a message carries, when a worker of this fleet wrote it for
    /// this body; 0 otherwise.
    pub fn believed_attempts(&self, headers: Option<&FieldTable>, body: &[u8]) -> u32 {
        let attempts = claimed_attempts(headers);
        if self.seals(attempts, headers, body) {
            attempts
        } else {
            0
        }
    }

    /// True when `headers` carry this fleet's seal of `attempts` (as [`claimed_attempts`] read
    /// it) for this body. A count of 0 needs no seal.
    pub fn seals(&self, attempts: u32, headers: Option<&FieldTable>, body: &[u8]) -> bool {
        if attempts == 0 {
            return true;
        }
        let seal = headers.and_then(|h| match h.inner().get(SEAL_HEADER) {
            Some(AMQPValue::LongString(s)) => hex::decode(s.as_bytes()).ok(),
            _ => None,
        });
        seal.is_some_and(|seal| {
            hmac::verify(&self.key, &signed_input(attempts, body), &seal).is_ok()
        })
    }
}

/// What the seal signs: the header's name, the count and the body's SHA-256.
fn signed_input(attempts: u32, body: &[u8]) -> Vec<u8> {
    let mut input = b"x-imagegen-attempts\0".to_vec();
    input.extend_from_slice(&attempts.to_be_bytes());
    input.extend_from_slice(&Sha256::digest(body));
    input
}

/// The count of failed attempts a message's header says, believed or not (see
/// [`HeaderSeal::believed_attempts`]). Any integer type, or digits in a string; anything else,
/// or a negative count, is 0.
pub fn claimed_attempts(headers: Option<&FieldTable>) -> u32 {
    match headers.and_then(|h| h.inner().get(ATTEMPTS_HEADER)) {
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => (*n).clamp(0, u32::MAX as i64) as u32,
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::ShortInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::ShortUInt(n)) => *n as u32,
        Some(AMQPValue::ShortShortInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::ShortShortUInt(n)) => *n as u32,
        Some(AMQPValue::LongString(s)) => s.to_string().parse().unwrap_or(0),
        _ => 0,
    }
}

/// The attempts header's value.
pub fn attempts_value(attempts: u32) -> AMQPValue {
    AMQPValue::LongInt(attempts.min(i32::MAX as u32) as i32)
}

/// A header's value as text, when it is a string (long or short; invalid UTF-8 replaced).
pub fn text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// What the broker recorded of a message's latest death: its reason (`rejected`,
/// `delivery_limit`, `expired`, `maxlen`) and how many times the message died that way.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Death {
    pub reason: Option<String>,
    pub count: u64,
}

/// The latest of the broker's death records (`x-death`), when there is one.
pub fn latest_death(headers: Option<&FieldTable>) -> Option<Death> {
    let Some(AMQPValue::FieldArray(entries)) = headers?.inner().get(DEATH_HEADER) else {
        return None;
    };
    let AMQPValue::FieldTable(latest) = entries.as_slice().first()? else {
        return None;
    };
    let count = match latest.inner().get("count") {
        Some(AMQPValue::LongLongInt(n)) => (*n).max(0) as u64,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u64,
        _ => 0,
    };
    Some(Death {
        reason: text(Some(latest), "reason"),
        count,
    })
}

/// The bytes a field table takes on the wire (AMQP 0-9-1 encoding, as RabbitMQ reads it).
pub fn table_size(table: &BTreeMap<ShortString, AMQPValue>) -> usize {
    4 + table
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_size(v))
        .sum::<usize>()
}

fn value_size(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_size(t.inner()),
        AMQPValue::Void => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::FieldArray;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn sealed(seal: &HeaderSeal, attempts: u32, body: &[u8]) -> FieldTable {
        table(&seal.attempts_headers(attempts, body))
    }

    #[test]
    fn only_counts_sealed_by_the_fleets_key_for_this_body_are_believed() {
        let seal = HeaderSeal::new(b"fleet key");
        let body = br#"{"prompt":"p"}"#;
        let believed = |s: &HeaderSeal, t: &FieldTable| s.believed_attempts(Some(t), body);
        assert_eq!(believed(&seal, &sealed(&seal, 3, body)), 3);
        // The same key on another worker of the fleet.
        let other_worker = HeaderSeal::new(b"fleet key");
        assert_eq!(believed(&other_worker, &sealed(&seal, 3, body)), 3);
        // Not sealed, sealed for another body or count, or under another key: not believed.
        let bare = table(&[(ATTEMPTS_HEADER, attempts_value(99))]);
        assert_eq!(believed(&seal, &bare), 0);
        assert_eq!(
            believed(&seal, &sealed(&seal, 3, b"other")),
            0,
            "a seal moved to another body"
        );
        let mut forged = sealed(&seal, 1, body);
        forged.insert(ATTEMPTS_HEADER.into(), attempts_value(50));
        assert_eq!(believed(&seal, &forged), 0, "a count changed");
        let stranger = HeaderSeal::new(b"another key");
        assert_eq!(believed(&stranger, &sealed(&seal, 3, body)), 0);
        // Without a key, a process believes only itself.
        let random = HeaderSeal::new(b"");
        assert_eq!(believed(&random, &sealed(&random, 2, body)), 2);
        assert_eq!(believed(&seal, &sealed(&random, 2, body)), 0);
        assert_eq!(seal.believed_attempts(None, body), 0);
    }

    #[test]
    fn attempts_header_reads_any_integer_type() {
        let of = |v: AMQPValue| claimed_attempts(Some(&table(&[(ATTEMPTS_HEADER, v)])));
        assert_eq!(claimed_attempts(None), 0);
        assert_eq!(claimed_attempts(Some(&FieldTable::default())), 0);
        assert_eq!(of(AMQPValue::LongInt(3)), 3);
        assert_eq!(of(AMQPValue::LongLongInt(4)), 4);
        assert_eq!(of(AMQPValue::ShortShortUInt(2)), 2);
        assert_eq!(of(AMQPValue::LongInt(-1)), 0);
        assert_eq!(of(AMQPValue::LongLongInt(i64::MAX)), u32::MAX);
        assert_eq!(of(AMQPValue::LongString("5".into())), 5);
        assert_eq!(of(AMQPValue::LongString("-5".into())), 0);
        assert_eq!(of(AMQPValue::Boolean(true)), 0);
        assert_eq!(of(attempts_value(u32::MAX)), i32::MAX as u32);
    }

    #[test]
    fn the_latest_death_is_read_whatever_its_shape() {
        let death = |fields: &[(&str, AMQPValue)]| {
            table(&[(
                DEATH_HEADER,
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(table(fields))])),
            )])
        };
        assert_eq!(
            latest_death(Some(&death(&[
                ("reason", AMQPValue::LongString("delivery_limit".into())),
                ("count", AMQPValue::LongLongInt(2)),
            ]))),
            Some(Death {
                reason: Some("delivery_limit".into()),
                count: 2
            })
        );
        assert_eq!(
            latest_death(Some(&death(&[("count", AMQPValue::LongLongInt(-9))]))),
            Some(Death::default())
        );
        let not_an_array = table(&[(DEATH_HEADER, AMQPValue::LongString("x".into()))]);
        assert_eq!(latest_death(Some(&not_an_array)), None);
        let empty = table(&[(DEATH_HEADER, AMQPValue::FieldArray(FieldArray::default()))]);
        assert_eq!(latest_death(Some(&empty)), None);
        assert_eq!(latest_death(None), None);
    }

    #[test]
    fn names_and_strings_that_are_not_utf8_are_read_within_a_short_strings_length() {
        // A table of one entry: a 255-byte name of invalid bytes (its value an empty long
        // string).
        let mut entry = vec![255];
        entry.extend([0xfe; 255]);
        entry.extend(b"S\0\0\0\0");
        let mut wire = (entry.len() as u32).to_be_bytes().to_vec();
        wire.extend(entry);
        let (rest, t) = amq_protocol_types::parsing::parse_field_table(&wire[..]).unwrap();
        assert!(rest.is_empty());
        let name = t.inner().keys().next().unwrap();
        assert_eq!(name.as_str(), "\u{fffd}".repeat(85));
    }

    #[test]
    fn a_tables_size_is_counted_as_the_wire_counts_it() {
        let t = table(&[("k", AMQPValue::LongString("abc".into()))]);
        assert_eq!(table_size(t.inner()), 4 + (1 + 1) + (1 + 4 + 3));
    }
}
