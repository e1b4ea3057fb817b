//! The worker's headers on the messages it republishes (to a delay queue, to the dead-letter
//! queue), on lapin's message properties. What they mean and how any message's headers are read
//! (the sealed count of failed attempts, the recorded failure, the broker's death records) is in
//! the core crate, where it is fuzzed: [`imagegen_core::amqp`].

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use secrecy::{ExposeSecret, SecretString};
use tracing::warn;

pub use imagegen_core::amqp::{
    ATTEMPTS_HEADER, DEATH_HEADER, Death, ERROR_KIND_HEADER, ERROR_MESSAGE_HEADER,
    HEADERS_DROPPED_HEADER, LANE_HEADER, SEAL_HEADER, attempts_value, claimed_attempts,
    latest_death, table_size, text,
};

/// Seals and checks the worker's own headers with a key shared by the fleet (see
/// [`imagegen_core::amqp::HeaderSeal`]), and says when a count is not believed.
pub struct HeaderSeal(imagegen_core::amqp::HeaderSeal);

impl HeaderSeal {
    /// A seal with `secret` as its key; an empty secret gives a random key of this process
    /// alone (counts written by other workers, or before a restart, are then not believed:
    /// jobs get more attempts, never fewer).
    pub fn new(secret: &SecretString) -> Self {
        let secret = secret.expose_secret().as_bytes();
        if secret.is_empty() {
            warn!(
                "amqp.header_key is not set: failed attempts are counted by this process alone \
                 (set the same key on every worker of a fleet)"
            );
        }
        Self(imagegen_core::amqp::HeaderSeal::new(secret))
    }

    /// The headers that carry `attempts` for the message `body`.
    pub fn attempts_headers(&self, attempts: u32, body: &[u8]) -> [(&'static str, AMQPValue); 2] {
        self.0.attempts_headers(attempts, body)
    }

    /// The count of failed attempts a message carries, when the worker wrote it; 0 otherwise.
    pub fn attempts_of(&self, properties: &BasicProperties, body: &[u8]) -> u32 {
        let headers = properties.headers().as_ref();
        let claimed = claimed_attempts(headers);
        if self.0.seals(claimed, headers, body) {
            return claimed;
        }
        warn!(
            attempts = claimed,
            "the message's {ATTEMPTS_HEADER} is not sealed by a worker of this fleet: ignored"
        );
        0
    }
}

/// The headers that say why a failed job was dead-lettered: its error's kind and message (the
/// message printable and cut to 1000 characters).
pub fn failure_headers(
    error: Option<&crate::domain::event::EventError>,
) -> [(&'static str, AMQPValue); 2] {
    let (kind, message) = error
        .map(|e| {
            (
                e.kind.as_str(),
                crate::domain::printable(&e.message)
                    .chars()
                    .take(1000)
                    .collect::<String>(),
            )
        })
        .unwrap_or(("unknown", String::new()));
    [
        (ERROR_KIND_HEADER, AMQPValue::LongString(kind.into())),
        (ERROR_MESSAGE_HEADER, AMQPValue::LongString(message.into())),
    ]
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
