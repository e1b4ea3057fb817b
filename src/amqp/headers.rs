//! The headers the worker writes on jobs it delays or dead-letters, and how they are read back.
//!
//! Anyone who can publish a job can set any header, so the count of failed attempts is believed
//! only when it carries the worker's seal ([`HeaderSeal`]): an HMAC, under a key from config,
//! of the count and the job's body. A producer that sets `x-imagegen-attempts: 99` gets a job
//! with no failed attempts, not a job failed without a call.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use ring::hmac;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tracing::warn;

/// Header carrying the count of provider attempts that really failed, across deliveries.
pub const ATTEMPTS_HEADER: &str = "x-imagegen-attempts";
/// The error kind of a job the worker dead-lettered.
pub const ERROR_KIND_HEADER: &str = "x-imagegen-error-kind";
/// The error message of a job the worker dead-lettered.
pub const ERROR_MESSAGE_HEADER: &str = "x-imagegen-error";
/// The seal of the attempts header: hex HMAC-SHA256 of the count and the body's digest.
pub const SEAL_HEADER: &str = "x-imagegen-seal";

/// Seals and checks the worker's own headers with a key shared by the fleet.
pub struct HeaderSeal {
    key: hmac::Key,
}

impl HeaderSeal {
    /// A seal with `secret` as its key; an empty secret gives a random key of this process
    /// alone (counts written by other workers, or before a restart, are then not believed:
    /// jobs get more attempts, never fewer).
    pub fn new(secret: &SecretString) -> Self {
        let secret = secret.expose_secret().as_bytes();
        let key = if secret.is_empty() {
            warn!(
                "amqp.header_key is not set: failed attempts are counted by this process alone \
                 (set the same key on every worker of a fleet)"
            );
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

    /// The count of failed attempts a message carries, when the worker wrote it; 0 otherwise.
    pub fn attempts_of(&self, properties: &BasicProperties, body: &[u8]) -> u32 {
        let attempts = attempts_of(properties);
        if attempts == 0 {
            return 0;
        }
        let seal = properties
            .headers()
            .as_ref()
            .and_then(|h| match h.inner().get(SEAL_HEADER) {
                Some(AMQPValue::LongString(s)) => hex::decode(s.as_bytes()).ok(),
                _ => None,
            });
        match seal {
            Some(seal) if hmac::verify(&self.key, &signed_input(attempts, body), &seal).is_ok() => {
                attempts
            }
            _ => {
                warn!(
                    attempts,
                    "the message's {ATTEMPTS_HEADER} is not sealed by a worker of this fleet: ignored"
                );
                0
            }
        }
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
/// [`HeaderSeal::attempts_of`]).
pub fn attempts_of(properties: &BasicProperties) -> u32 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPTS_HEADER).cloned());
    match value {
        Some(AMQPValue::LongInt(n)) => n.max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => n.clamp(0, u32::MAX as i64) as u32,
        Some(AMQPValue::LongUInt(n)) => n,
        Some(AMQPValue::ShortInt(n)) => n.max(0) as u32,
        Some(AMQPValue::ShortUInt(n)) => n as u32,
        Some(AMQPValue::ShortShortInt(n)) => n.max(0) as u32,
        Some(AMQPValue::ShortShortUInt(n)) => n as u32,
        Some(AMQPValue::LongString(s)) => s.to_string().parse().unwrap_or(0),
        _ => 0,
    }
}

/// Header saying how many of the producer's headers were left off a republished message.
pub const HEADERS_DROPPED_HEADER: &str = "x-imagegen-headers-dropped";

/// Room kept in a frame for the content header's other properties (`message_id`,
/// `content_type`, `correlation_id`, ...: short strings of at most 255 bytes each).
const OTHER_PROPERTIES: usize = 2048;

/// The message's properties with `ours` set, for a message the worker republishes (to a delay
/// queue, to the dead-letter queue). The broker cannot split a content header across frames:
/// when the producer's headers and ours would not fit in a frame of `frame_max` bytes, the
/// producer's headers are left off (their count in [`HEADERS_DROPPED_HEADER`]), so that the
/// republish always goes through and never closes a connection.
pub fn republish_properties(
    properties: &BasicProperties,
    ours: &[(&str, AMQPValue)],
    frame_max: u32,
) -> BasicProperties {
    let with_ours = with_headers(properties, ours);
    let budget = (frame_max as usize).saturating_sub(OTHER_PROPERTIES);
    let size = with_ours
        .headers()
        .as_ref()
        .map_or(0, |h| table_size(h.inner()));
    if size <= budget {
        return with_ours;
    }
    let dropped = properties.headers().as_ref().map_or(0, |h| h.inner().len());
    warn!(
        header_bytes = size,
        frame_max,
        dropped,
        "the message's headers do not fit in a frame: the producer's are left off"
    );
    let mut table = FieldTable::default();
    for (k, v) in ours {
        table.insert((*k).into(), v.clone());
    }
    table.insert(
        HEADERS_DROPPED_HEADER.into(),
        AMQPValue::LongUInt(dropped.min(u32::MAX as usize) as u32),
    );
    properties.clone().with_headers(table)
}

/// The bytes a field table takes on the wire (AMQP 0-9-1 encoding, as RabbitMQ reads it).
pub fn table_size(table: &std::collections::BTreeMap<ShortString, AMQPValue>) -> usize {
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

/// The message's properties with `headers` set (others kept).
pub fn with_headers(
    properties: &BasicProperties,
    headers: &[(&str, AMQPValue)],
) -> BasicProperties {
    let mut table = properties.headers().clone().unwrap_or_default();
    for (k, v) in headers {
        table.insert((*k).into(), v.clone());
    }
    properties.clone().with_headers(table)
}

/// The attempts header's value.
pub fn attempts_value(attempts: u32) -> AMQPValue {
    AMQPValue::LongInt(attempts.min(i32::MAX as u32) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(seal: &HeaderSeal, attempts: u32, body: &[u8]) -> BasicProperties {
        with_headers(
            &BasicProperties::default(),
            &seal.attempts_headers(attempts, body),
        )
    }

    #[test]
    fn a_republished_message_keeps_the_producers_headers_only_when_they_fit_a_frame() {
        let producer = |bytes: usize| {
            with_headers(
                &BasicProperties::default(),
                &[("x-note", AMQPValue::LongString("n".repeat(bytes).into()))],
            )
        };
        let ours = [(
            ERROR_MESSAGE_HEADER,
            AMQPValue::LongString("e".repeat(1000).into()),
        )];
        let header =
            |p: &BasicProperties, k: &str| p.headers().as_ref().unwrap().inner().get(k).cloned();
        let kept = republish_properties(&producer(1000), &ours, 16384);
        assert!(header(&kept, "x-note").is_some());
        assert!(header(&kept, HEADERS_DROPPED_HEADER).is_none());
        // 14 KB of the producer's plus 1 KB of ours: over a 16 KiB frame less the room kept.
        let cut = republish_properties(&producer(14_000), &ours, 16384);
        assert!(header(&cut, "x-note").is_none());
        assert!(header(&cut, ERROR_MESSAGE_HEADER).is_some());
        assert_eq!(
            header(&cut, HEADERS_DROPPED_HEADER),
            Some(AMQPValue::LongUInt(1))
        );
        assert!(table_size(cut.headers().as_ref().unwrap().inner()) < 16384 - OTHER_PROPERTIES);
        // The size is counted as the wire counts it.
        let mut t = FieldTable::default();
        t.insert("k".into(), AMQPValue::LongString("abc".into()));
        assert_eq!(table_size(t.inner()), 4 + (1 + 1) + (1 + 4 + 3));
    }

    #[test]
    fn only_counts_sealed_by_the_fleets_key_for_this_body_are_believed() {
        let seal = HeaderSeal::new(&SecretString::from("fleet key"));
        let body = br#"{"prompt":"p"}"#;
        assert_eq!(seal.attempts_of(&sealed(&seal, 3, body), body), 3);
        // The same key on another worker of the fleet.
        let other_worker = HeaderSeal::new(&SecretString::from("fleet key"));
        assert_eq!(other_worker.attempts_of(&sealed(&seal, 3, body), body), 3);
        // Not sealed, sealed for another body or count, or under another key: not believed.
        let bare = with_headers(
            &BasicProperties::default(),
            &[(ATTEMPTS_HEADER, attempts_value(99))],
        );
        assert_eq!(seal.attempts_of(&bare, body), 0);
        assert_eq!(
            seal.attempts_of(&sealed(&seal, 3, b"other"), body),
            0,
            "a seal moved to another body"
        );
        let mut forged = sealed(&seal, 1, body);
        forged = with_headers(&forged, &[(ATTEMPTS_HEADER, attempts_value(50))]);
        assert_eq!(seal.attempts_of(&forged, body), 0, "a count changed");
        let stranger = HeaderSeal::new(&SecretString::from("another key"));
        assert_eq!(stranger.attempts_of(&sealed(&seal, 3, body), body), 0);
        // Without a key, a process believes only itself.
        let random = HeaderSeal::new(&SecretString::from(""));
        assert_eq!(random.attempts_of(&sealed(&random, 2, body), body), 2);
        assert_eq!(seal.attempts_of(&sealed(&random, 2, body), body), 0);
    }

    #[test]
    fn attempts_header_reads_any_integer_type() {
        let props =
            |v: AMQPValue| with_headers(&BasicProperties::default(), &[(ATTEMPTS_HEADER, v)]);
        assert_eq!(attempts_of(&BasicProperties::default()), 0);
        assert_eq!(attempts_of(&props(AMQPValue::LongInt(3))), 3);
        assert_eq!(attempts_of(&props(AMQPValue::LongLongInt(4))), 4);
        assert_eq!(attempts_of(&props(AMQPValue::ShortShortUInt(2))), 2);
        assert_eq!(attempts_of(&props(AMQPValue::LongInt(-1))), 0);
        assert_eq!(attempts_of(&props(AMQPValue::LongString("5".into()))), 5);
        assert_eq!(
            attempts_of(&props(attempts_value(u32::MAX))),
            i32::MAX as u32
        );
    }
}
