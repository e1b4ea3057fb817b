//! The headers of a message, as the broker client parses them from the wire: the readers never
//! panic, a count is believed only under the fleet's seal, and the size the worker computes for
//! a table (to keep republished headers within a frame) is the size it takes on the wire.
#![no_main]

use amq_protocol_types::generation::gen_field_table;
use amq_protocol_types::parsing::parse_field_table;
use imagegen_core::amqp::{
    ATTEMPTS_HEADER, ERROR_KIND_HEADER, ERROR_MESSAGE_HEADER, HeaderSeal, claimed_attempts,
    latest_death, table_size, text,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((_, mut table)) = parse_field_table(data) else {
        return;
    };
    let seal = HeaderSeal::new(b"fleet key");
    let body = b"{\"prompt\":\"p\"}";
    let headers = Some(&table);
    // Whatever a producer wrote, it is not sealed by this fleet's key.
    assert_eq!(seal.believed_attempts(headers, body), 0);
    let _ = claimed_attempts(headers);
    let _ = text(headers, ERROR_KIND_HEADER);
    let _ = text(headers, ERROR_MESSAGE_HEADER);
    let _ = latest_death(headers);

    let wire = cookie_factory::gen_simple(gen_field_table(&table), Vec::new()).expect("encodes");
    assert_eq!(table_size(table.inner()), wire.len());

    // The worker's own sealed count, added to any table, is read back as written.
    let attempts = u32::from(data.first().copied().unwrap_or(0));
    for (name, value) in seal.attempts_headers(attempts, body) {
        table.insert(name.into(), value);
    }
    assert_eq!(seal.believed_attempts(Some(&table), body), attempts);
    assert_eq!(claimed_attempts(Some(&table)), attempts);
    assert!(table.inner().contains_key(ATTEMPTS_HEADER));
});
