//! The headers the worker writes on jobs it delays or dead-letters, and how they are read back.
//!
//! Anyone who can publish a job can set any header, so the count of failed attempts is believed
//! only when it carries the worker's seal ([`HeaderSeal`]): an HMAC, under a key from config,
//! of the count and the job's body. A producer that sets `x-imagegen-attempts: 99` gets a job
//! with no failed attempts, not a job failed without a call.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, LongString};
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
