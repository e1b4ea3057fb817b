//! A batch's life on the fake's clock: validation, its lines run in waves as the live endpoint
//! would answer them and billed as such, and its end with its output and error files.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::{Value, json};

use super::input::{InputLine, parse_input};
use super::state::{BatchState, LineRecord, Outcome, OutputFile, PROMPT_KEPT, Status};
use super::{EDITS, new_hex_id};
use crate::openai::errors::ApiError;
use crate::openai::files::{self, Content, StoredFile, now};
use crate::openai::generate::answer_meta;
use crate::openai::validate::{GenRequest, validate};
use crate::openai::{FakeApi, Fault, lock};

/// How often a waiting batch looks at its flags (cancel, hold).
const TICK: Duration = Duration::from_millis(5);

const EXPIRED: (&str, &str) = (
    "batch_expired",
    "This request could not be executed before the completion window expired.",
);
const CANCELLED: (&str, &str) = (
    "batch_cancelled",
    "This request was not executed because the batch was cancelled.",
);
const TIMED_OUT: (&str, &str) = (
    "request_timeout",
    "The underlying call to the model timed out.",
);

/// What a batch's task needs, fixed at creation.
pub(super) struct Job {
    pub(super) id: String,
    pub(super) endpoint: &'static str,
    pub(super) input: Bytes,
    /// When the window closes.
    pub(super) deadline: Instant,
    pub(super) validating_until: Instant,
    pub(super) fail: bool,
    pub(super) expire_early: bool,
    /// The `Host` the batch was created through, for answers given by URL.
    pub(super) host: Option<String>,
    /// `output_expires_after.seconds`.
    pub(super) output_ttl: u64,
}

/// What a line that ran costs, applied when its result is recorded.
struct Bill {
    prompt: String,
    images: u64,
    tokens: (u64, u64),
}

/// How a batch ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Completed,
    Cancelled,
    Expired,
}

impl FakeApi {
    fn update(&self, id: &str, f: impl FnOnce(&mut BatchState)) {
        if let Some(batch) = lock(&self.inner.batches).get_mut(id) {
            f(batch);
        }
    }

    fn cancel_requested(&self, id: &str) -> bool {
        lock(&self.inner.batches)
            .get(id)
            .is_some_and(|b| b.status == Status::Cancelling)
    }

    /// A batch's life, from `validating` to its end.
    pub(super) async fn run_batch(self, job: Job) {
        // Validating: until its time is up and no hold keeps it, unless cancelled or out of time.
        loop {
            if self.cancel_requested(&job.id) {
                return self
                    .finish(&job, Vec::new(), VecDeque::new(), End::Cancelled)
                    .await;
            }
            let now_i = Instant::now();
            if now_i >= job.deadline {
                return self
                    .finish(&job, Vec::new(), VecDeque::new(), End::Expired)
                    .await;
            }
            let held = self.inner.batch_control.hold.load(Ordering::Acquire);
            if !held && now_i >= job.validating_until {
                break;
            }
            let wait = if held {
                TICK
            } else {
                TICK.min(job.validating_until - now_i)
            };
            tokio::time::sleep(wait).await;
        }
        let max_lines = self.batch_options().max_lines;
        let parsed = if job.fail {
            Err(vec![json!({
                "code": "token_limit_exceeded",
                "message": "Enqueued token limit reached for gpt-image-2 in organization \
                            org-fake. Limit: 0 enqueued tokens. Please try submitting an equal or \
                            smaller batch once your ongoing batches have completed.",
                "param": null,
                "line": null,
            })])
        } else {
            parse_input(&job.input, job.endpoint, max_lines)
        };
        let lines = match parsed {
            Ok(lines) => lines,
            Err(errors) => {
                self.update(&job.id, |b| {
                    b.status = Status::Failed;
                    b.failed_at = Some(now());
                    b.errors = errors;
                });
                lock(&self.inner.counters).stats.batch.batches_failed += 1;
                return;
            }
        };
        let total = lines.len();
        let model = lines[0]
            .body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("gpt-image-2")
            .to_owned();
        let mut cancelled_early = false;
        {
            let mut store = lock(&self.inner.batches);
            if let Some(b) = store.get_mut(&job.id) {
                // A cancel may have arrived since the last look.
                if b.status == Status::Cancelling {
                    cancelled_early = true;
                } else {
                    b.status = Status::InProgress;
                }
                b.in_progress_at = Some(now());
                b.total = total as u64;
                b.model = Some(model);
            }
        }
        let mut pending: VecDeque<InputLine> = lines.into();
        if cancelled_early {
            return self.finish(&job, Vec::new(), pending, End::Cancelled).await;
        }

        let expire_at = job.expire_early.then_some(total / 2);
        let mut done: Vec<LineRecord> = Vec::with_capacity(total);
        let end = loop {
            if pending.is_empty() {
                break End::Completed;
            }
            if self.cancel_requested(&job.id) {
                break End::Cancelled;
            }
            if Instant::now() >= job.deadline || expire_at == Some(done.len()) {
                break End::Expired;
            }
            let opts = self.batch_options();
            let mut take = opts.parallel.max(1).min(pending.len());
            if let Some(limit) = expire_at {
                take = take.min(limit - done.len());
            }
            let mut wave = Vec::with_capacity(take);
            let mut extra = Duration::ZERO;
            for line in pending.drain(..take) {
                let (record, bill, hang) = self.run_line(&job, line);
                extra = extra.max(hang);
                wave.push((record, bill));
            }
            // In flight: these lines finish (and are billed) whatever happens meanwhile.
            tokio::time::sleep(opts.per_line + extra).await;
            for (record, bill) in wave {
                self.record_line(&job.id, &record, bill);
                done.push(record);
            }
        };
        self.finish(&job, done, pending, end).await;
    }

    /// Runs one line as the live endpoint would answer it. Returns its record, what it costs if
    /// it succeeded, and how much longer than `per_line` it takes.
    fn run_line(&self, job: &Job, line: InputLine) -> (LineRecord, Option<Bill>, Duration) {
        let InputLine { custom_id, body } = line;
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let request_id = new_hex_id("req_");
        let record = |outcome| LineRecord {
            custom_id: custom_id.clone(),
            id: new_hex_id("batch_req_"),
            outcome,
        };
        let failed = |e: ApiError| Outcome::Failed {
            request_id: request_id.clone(),
            status: e.status.as_u16(),
            body: e.body(),
        };
        let prompt = body.get("prompt").and_then(Value::as_str);
        {
            let mut counters = lock(&self.inner.counters);
            if let Some(p) = prompt {
                counters.per_prompt.entry(p.to_owned()).or_default().0 += 1;
            }
        }
        // An edit's images are checked first, as the live endpoint reads its files first.
        let fields = if job.endpoint == EDITS {
            match self.json_edit(&body) {
                Ok(fields) => fields,
                Err(e) => return (record(failed(e)), None, Duration::ZERO),
            }
        } else {
            body.clone()
        };
        let mut hang = Duration::ZERO;
        let mut not_an_image = false;
        let result = match self.take_fault(prompt) {
            Some(Fault::Reset) => {
                let (code, message) = TIMED_OUT;
                return (record(Outcome::NoResponse { code, message }), None, hang);
            }
            Some(Fault::Hang { secs }) => {
                hang = Duration::try_from_secs_f64(secs).unwrap_or_default();
                validate(&fields)
            }
            Some(Fault::NotAnImage) => {
                not_an_image = true;
                validate(&fields)
            }
            Some(fault) => Err(ApiError::from_fault(&fault, &body, &request_id)),
            None => validate(&fields),
        };
        let req: GenRequest = match result {
            Ok(req) => req,
            Err(e) => return (record(failed(e)), None, hang),
        };
        let bill = Bill {
            prompt: req.prompt.clone(),
            images: req.n,
            tokens: req.usage_tokens(),
        };
        let outcome = if not_an_image || req.response_format.as_deref() == Some("url") {
            Outcome::Literal {
                body: self.success_body(&req, seq, job.host.as_deref(), not_an_image),
                request_id,
            }
        } else {
            Outcome::Images {
                meta: answer_meta(&req),
                prompt_head: req.prompt.chars().take(PROMPT_KEPT).collect(),
                n: req.n,
                seq,
                request_id,
            }
        };
        (record(outcome), Some(bill), hang)
    }

    /// A line's result is in: its batch's counts and, if it succeeded, its bill.
    fn record_line(&self, id: &str, record: &LineRecord, bill: Option<Bill>) {
        let succeeded = record.succeeded();
        {
            let mut counters = lock(&self.inner.counters);
            match &bill {
                Some(bill) => {
                    counters.stats.batch.lines_billed += 1;
                    counters.stats.batch.images += bill.images;
                    let prompt = bill.prompt.clone();
                    counters.per_prompt.entry(prompt).or_default().1 += 1;
                }
                None => counters.stats.batch.lines_failed += 1,
            }
        }
        self.update(id, |b| {
            if succeeded {
                b.completed += 1;
            } else {
                b.failed += 1;
            }
            if let Some(bill) = &bill {
                b.input_tokens += bill.tokens.0;
                b.output_tokens += bill.tokens.1;
            }
        });
    }

    /// Ends a batch: the lines that did not run are written as such, the output and error files
    /// are made (those that have lines), and the batch takes its final status.
    async fn finish(
        &self,
        job: &Job,
        mut done: Vec<LineRecord>,
        pending: VecDeque<InputLine>,
        end: End,
    ) {
        let opts = self.batch_options();
        match end {
            End::Completed => {
                self.update(&job.id, |b| {
                    b.status = Status::Finalizing;
                    b.finalizing_at = Some(now());
                });
                tokio::time::sleep(opts.finalizing).await;
            }
            End::Cancelled => tokio::time::sleep(opts.cancelling).await,
            End::Expired => {}
        }
        let (code, message) = if end == End::Cancelled {
            CANCELLED
        } else {
            EXPIRED
        };
        let not_run = pending.len() as u64;
        done.extend(pending.into_iter().map(|line| LineRecord {
            custom_id: line.custom_id,
            id: new_hex_id("batch_req_"),
            outcome: Outcome::NoResponse { code, message },
        }));
        let lines = Arc::new(done);
        let succeeded = lines.iter().filter(|l| l.succeeded()).count() as u64;
        let failed = lines.len() as u64 - succeeded;
        let created_at = now();
        let make_file = |errors: bool, count: u64| {
            if count == 0 {
                return None;
            }
            let output = OutputFile {
                lines: lines.clone(),
                errors,
            };
            let kind = if errors { "error" } else { "output" };
            let file = StoredFile {
                id: files::new_file_id(),
                filename: format!("{}_{kind}.jsonl", job.id),
                purpose: "batch_output".into(),
                created_at,
                expires_at: Some(created_at + job.output_ttl),
                bytes: output.len(&self.inner.png),
                content: Content::Batch(Arc::new(output)),
            };
            let id = file.id.clone();
            lock(&self.inner.uploads).insert(file);
            Some(id)
        };
        let output_file_id = make_file(false, succeeded);
        let error_file_id = make_file(true, failed);
        self.update(&job.id, |b| {
            let at = Some(now());
            match end {
                End::Completed => {
                    b.status = Status::Completed;
                    b.completed_at = at;
                }
                End::Cancelled => {
                    b.status = Status::Cancelled;
                    b.cancelled_at = at;
                }
                End::Expired => {
                    b.status = Status::Expired;
                    b.expired_at = at;
                }
            }
            b.output_file_id = output_file_id;
            b.error_file_id = error_file_id;
            b.completed = succeeded;
            b.failed = failed;
        });
        let mut counters = lock(&self.inner.counters);
        let stats = &mut counters.stats.batch;
        stats.lines_not_run += not_run;
        match end {
            End::Completed => stats.batches_completed += 1,
            End::Cancelled => stats.batches_cancelled += 1,
            End::Expired => stats.batches_expired += 1,
        }
    }
}
