//! The servers of one `comfyui` provider (one per GPU): which gets the next prompt (the shortest
//! queue), and which are out of the rotation (they stopped answering) until their next probe.
//!
//! Queue lengths are read from each server (`GET /prompt`) when a prompt is placed, so that a
//! fleet of workers sharing the servers spreads its prompts by what the servers hold, not by what
//! one worker sent; the prompts this worker placed since its last reading count on top, so that
//! many placed at once do not all go to the same server.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::super::http::{Clock, MAX_SMALL_ANSWER};
use crate::domain::error::Failure;
use imagegen_core::comfyui::queue_remaining;

/// Consecutive failed requests after which a server that still accepts connections is taken out.
const FAILURES_TO_OUT: u32 = 3;

/// Seconds allowed for reading a server's queue length when placing a prompt.
const READING_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct State {
    /// Out of the rotation until then.
    out_until: Option<Instant>,
    /// Failed requests in a row.
    failures: u32,
    /// Prompts this worker placed there since the last reading of its queue.
    placed_since: u64,
    /// Whether it has the jobs API (`/api/jobs/ID`); `None`: not known yet.
    jobs_api: Option<bool>,
}

pub struct Host {
    /// The base URL, without a trailing slash.
    pub url: String,
    state: Mutex<State>,
}

pub struct Hosts {
    pub hosts: Vec<Host>,
    probe: Duration,
}

impl Hosts {
    pub fn new(urls: &[String], probe: Duration) -> Self {
        Self {
            hosts: urls
                .iter()
                .map(|u| Host {
                    url: u.trim_end_matches('/').to_string(),
                    state: Mutex::default(),
                })
                .collect(),
            probe,
        }
    }

    fn state(&self, i: usize) -> std::sync::MutexGuard<'_, State> {
        self.hosts[i]
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The server of a base URL (as a handle names it), if it is still one of this provider's.
    pub fn find(&self, url: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.url == url)
    }

    /// Whether the server is out of the rotation now.
    pub fn is_out(&self, i: usize) -> bool {
        self.state(i)
            .out_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// The server answered.
    pub fn answered(&self, i: usize) {
        let mut s = self.state(i);
        if s.out_until.take().is_some() {
            tracing::info!(host = %self.hosts[i].url, "the ComfyUI server answers again");
        }
        s.failures = 0;
    }

    /// A request to the server failed; `refused`: no connection could be opened (nothing
    /// listens: the server is down, and its queue with it). Returns whether it is now out.
    pub fn failed(&self, i: usize, refused: bool) -> bool {
        let mut s = self.state(i);
        s.failures += 1;
        if refused || s.failures >= FAILURES_TO_OUT {
            if s.out_until.is_none() {
                tracing::warn!(host = %self.hosts[i].url, failures = s.failures,
                    "the ComfyUI server stopped answering: out of the rotation until its probe");
            }
            s.out_until = Some(Instant::now() + self.probe);
            return true;
        }
        false
    }

    pub fn jobs_api(&self, i: usize) -> Option<bool> {
        self.state(i).jobs_api
    }

    pub fn set_jobs_api(&self, i: usize, has: bool) {
        self.state(i).jobs_api = Some(has);
    }

    /// The server for the next prompt: of those in the rotation (and those due for their
    /// probe), the one with the shortest queue, by a reading of each. `Err` when none answers.
    pub async fn place(&self, client: &reqwest::Client) -> Result<usize, Failure> {
        let now = Instant::now();
        let candidates: Vec<usize> = (0..self.hosts.len())
            .filter(|&i| self.state(i).out_until.is_none_or(|until| now >= until))
            .collect();
        let readings = join_all(candidates.iter().map(|&i| self.reading(client, i))).await;
        let mut best: Option<(u64, usize)> = None;
        let mut why = Vec::new();
        for (&i, reading) in candidates.iter().zip(readings) {
            match reading {
                Ok(queued) => {
                    let load = queued + self.state(i).placed_since;
                    if best.is_none_or(|(b, _)| load < b) {
                        best = Some((load, i));
                    }
                }
                Err(e) => why.push(format!("{}: {e}", self.hosts[i].url)),
            }
        }
        let Some((_, i)) = best else {
            let out = self.hosts.len() - candidates.len();
            return Err(Failure::transient(format!(
                "no ComfyUI server answers ({} out of the rotation{}{})",
                out,
                if why.is_empty() { "" } else { "; " },
                why.join("; ")
            )));
        };
        self.state(i).placed_since += 1;
        Ok(i)
    }

    /// The length of a server's queue (waiting and running), by `GET /prompt`.
    async fn reading(&self, client: &reqwest::Client, i: usize) -> Result<u64, String> {
        let clock = Clock::start(READING_TIMEOUT);
        let url = format!("{}/prompt", self.hosts[i].url);
        let answer = async {
            let response = client.get(&url).send().await.map_err(|e| {
                let refused = e.is_connect();
                (super::super::http::transport_failure(e), refused)
            })?;
            let status = response.status().as_u16();
            if status != 200 {
                return Err((Failure::transient(format!("HTTP {status}")), false));
            }
            let body = clock
                .read_small(response, MAX_SMALL_ANSWER)
                .await
                .map_err(|f| (f, false))?;
            queue_remaining(&body).map_err(|f| (f, false))
        };
        match clock.within(answer).await {
            Ok(Ok(queued)) => {
                let mut s = self.state(i);
                s.placed_since = 0;
                drop(s);
                self.answered(i);
                Ok(queued)
            }
            Ok(Err((failure, refused))) => {
                self.failed(i, refused);
                Err(failure.message().to_string())
            }
            Err(timeout) => {
                self.failed(i, false);
                Err(timeout.message().to_string())
            }
        }
    }
}
