//! What every command shares in its output: the exit codes and the progress bars.
//!
//! Exit codes: 0 success; 1 error (configuration, broker, storage); 2 usage error; 3 the command
//! ran but some jobs or input lines failed. Progress and messages go to stderr, data to stdout.

use std::io::IsTerminal;

/// Exit code: published, but some input lines were invalid (or jobs failed, for other commands).
pub const EXIT_PARTIAL: u8 = 3;
/// Exit code: a usage problem (bad arguments, a guard tripped, no confirmation).
pub const EXIT_USAGE: u8 = 2;

/// A progress bar on stderr; hidden when stderr is not a terminal.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {wide_bar} {pos}/{len} ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

pub use crate::domain::printable;
