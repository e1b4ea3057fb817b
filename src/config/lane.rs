//! `[lane]`: the batch lane, jobs bought through one provider's batch API (OpenAI's Batch API:
//! half the live price, done within 24 hours, from its own rate-limit pool).

use serde::Deserialize;

use super::{ConfigError, in_range, invalid};

/// The OpenAI Batch API's bounds on one input file.
pub const MAX_FILE_REQUESTS: u64 = 50_000;
/// 200 MB.
pub const MAX_FILE_BYTES: u64 = 200 * 1024 * 1024;
/// What a batch's completion window (`24h`) is, in seconds.
pub const WINDOW_SECS: u64 = 86_400;

/// What becomes of the jobs a provider batch did not run (it expired, or failed to validate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unfinished {
    /// Back to the jobs queue, to be called live (a header keeps them from the lane).
    Live,
    /// They fail (`retries_exhausted`), dead-lettered like any failed job.
    Fail,
}

/// `[lane]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneSettings {
    /// The provider (a name of `[providers]`, of kind `openai`) whose batch API takes the lane's
    /// jobs. Empty: no lane; jobs that ask for it run live.
    pub provider: String,
    /// Jobs of that provider whose `deadline` is more than this many seconds away go to the lane
    /// by themselves. 0: only jobs that say `lane: "batch"`. Otherwise at least a day plus a
    /// margin (90000).
    pub route_deadline_after_secs: u64,
    /// Seconds a lane job's deadline must leave beyond the completion window (24 h) for the
    /// job to be sent to the lane; a job with less runs live.
    pub deadline_margin_secs: u64,
    /// What the lane's images cost as a share of the live price (the Batch API: 0.5).
    pub price_factor: f64,
    /// Requests in one input file, at most (the API takes 50,000).
    pub file_max_requests: u64,
    /// Bytes of one input file, at most (the API takes 200 MB).
    pub file_max_bytes: u64,
    /// A file is closed and sent once its oldest job has waited this many seconds, even when
    /// it is not full.
    pub file_max_age_secs: u64,
    /// Seconds between two steps of the collector (the one worker of the fleet that turns lane
    /// records into input files and follows the provider's batches).
    pub tick_secs: u64,
    /// Seconds between two looks at a provider batch that is running.
    pub poll_secs: u64,
    /// What becomes of the jobs of a provider batch that expired or failed: `live` or `fail`.
    pub unfinished: Unfinished,
    /// Output lines split at once (each holds a job's images: their upload overlaps).
    pub split_concurrency: usize,
    /// Lines split between two checkpoints of a provider batch's output.
    pub checkpoint_lines: u64,
}

impl LaneSettings {
    /// Whether there is a lane.
    pub fn enabled(&self) -> bool {
        !self.provider.is_empty()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.route_deadline_after_secs != 0 {
            in_range(
                "lane.route_deadline_after_secs",
                self.route_deadline_after_secs,
                WINDOW_SECS + self.deadline_margin_secs,
                365 * 86_400,
            )?;
        }
        in_range(
            "lane.deadline_margin_secs",
            self.deadline_margin_secs,
            60,
            7 * 86_400,
        )?;
        if !(self.price_factor > 0.0 && self.price_factor <= 1.0) {
            return Err(invalid(
                "lane.price_factor",
                format!("is {}, must be above 0 and at most 1", self.price_factor),
            ));
        }
        in_range(
            "lane.file_max_requests",
            self.file_max_requests,
            1,
            MAX_FILE_REQUESTS,
        )?;
        in_range(
            "lane.file_max_bytes",
            self.file_max_bytes,
            64 * 1024,
            MAX_FILE_BYTES,
        )?;
        in_range("lane.file_max_age_secs", self.file_max_age_secs, 0, 86_400)?;
        in_range("lane.tick_secs", self.tick_secs, 1, 3600)?;
        in_range("lane.poll_secs", self.poll_secs, 1, 86_400)?;
        in_range(
            "lane.split_concurrency",
            self.split_concurrency as u64,
            1,
            256,
        )?;
        in_range(
            "lane.checkpoint_lines",
            self.checkpoint_lines,
            1,
            MAX_FILE_REQUESTS,
        )?;
        Ok(())
    }
}

impl super::Settings {
    /// The lane's provider must be configured, and of a kind that has a batch API.
    pub(super) fn validate_lane_provider(&self) -> Result<(), ConfigError> {
        if !self.lane.enabled() {
            return Ok(());
        }
        match self.provider(&self.lane.provider) {
            None => Err(invalid(
                "lane.provider",
                format!(
                    "is {:?}, which is not a configured provider",
                    self.lane.provider
                ),
            )),
            Some(p) if !matches!(p.kind, super::KindSettings::Openai(_)) => Err(invalid(
                "lane.provider",
                format!(
                    "is {:?}, of kind {}: only kind openai has a batch API the lane can use",
                    p.name,
                    p.kind.kind().as_str()
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    /// The queue of the collector's ticks (single active consumer: one collector at a time).
    pub fn lane_ticks_queue(&self) -> String {
        format!("{}.lane.ticks", self.amqp.jobs_queue)
    }

    /// Where a tick waits `lane.tick_secs` before it returns to the ticks queue.
    pub fn lane_ticks_delay_queue(&self) -> String {
        format!("{}.lane.ticks.delay", self.amqp.jobs_queue)
    }
}
