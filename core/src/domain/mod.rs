//! The domain: what a job is, what its outcome is, how failures are classified, what a purchase
//! costs, and where a job's objects live. Plain data and rules: nothing here talks to a broker,
//! a provider or a store, and nothing here imports the rest of the crate.

pub mod cost;
pub mod error;
pub mod event;
pub mod job;
pub mod json;
pub mod keys;
pub mod limits;

/// `s` with its control characters escaped (`\u{1b}`, `\n`, ...): text that came from a job or a
/// message can then neither move a terminal's cursor, nor recolour it, nor forge a log line or
/// a header, wherever it is shown.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(printable("job-1 é ✓"), "job-1 é ✓");
        assert_eq!(
            printable("a\u{1b}[2Jb\nc\u{7}\u{9b}d"),
            "a\\u{1b}[2Jb\\nc\\u{7}\\u{9b}d"
        );
    }
}
