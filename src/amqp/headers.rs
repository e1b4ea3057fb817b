//! The headers the worker writes on jobs it delays or dead-letters, and how they are read back.

use lapin::BasicProperties;
use lapin::types::AMQPValue;

/// Header carrying the count of provider attempts that really failed, across deliveries.
pub const ATTEMPTS_HEADER: &str = "x-imagegen-attempts";
/// The error kind of a job the worker dead-lettered.
pub const ERROR_KIND_HEADER: &str = "x-imagegen-error-kind";
/// The error message of a job the worker dead-lettered.
pub const ERROR_MESSAGE_HEADER: &str = "x-imagegen-error";

/// The count of failed attempts a message carries.
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
