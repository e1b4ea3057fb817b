//! What the fake keeps of each batch: its state (the Batch object), and its results line by line
//! with what writes each line of its output and error files again.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use futures_util::Stream;
use serde_json::{Map, Value, json};

use crate::openai::generate::image_text;
use crate::openai::{FakeApi, lock};
use crate::png::PngTemplate;

/// The head of a prompt a line keeps: more than an image's text keeps of it.
pub(super) const PROMPT_KEPT: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }
}

/// Batches in creation order.
#[derive(Default)]
pub(in crate::openai) struct BatchStore {
    pub(super) batches: Vec<BatchState>,
}

impl BatchStore {
    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut BatchState> {
        self.batches.iter_mut().find(|b| b.id == id)
    }

    pub(super) fn get(&self, id: &str) -> Option<&BatchState> {
        self.batches.iter().find(|b| b.id == id)
    }
}

pub(super) struct BatchState {
    pub(super) id: String,
    pub(super) endpoint: &'static str,
    pub(super) input_file_id: String,
    pub(super) metadata: Option<Map<String, Value>>,
    pub(super) model: Option<String>,
    pub(super) status: Status,
    pub(super) errors: Vec<Value>,
    pub(super) output_file_id: Option<String>,
    pub(super) error_file_id: Option<String>,
    pub(super) created_at: u64,
    pub(super) expires_at: u64,
    pub(super) in_progress_at: Option<u64>,
    pub(super) finalizing_at: Option<u64>,
    pub(super) completed_at: Option<u64>,
    pub(super) failed_at: Option<u64>,
    pub(super) expired_at: Option<u64>,
    pub(super) cancelling_at: Option<u64>,
    pub(super) cancelled_at: Option<u64>,
    pub(super) total: u64,
    pub(super) completed: u64,
    pub(super) failed: u64,
    pub(super) input_tokens: u64,
    pub(super) output_tokens: u64,
}

impl BatchState {
    /// The Batch object.
    pub(super) fn object(&self) -> Value {
        let errors = if self.errors.is_empty() {
            Value::Null
        } else {
            json!({"object": "list", "data": self.errors})
        };
        let usage = self.in_progress_at.map(|_| {
            json!({
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            })
        });
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status.as_str(),
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": usage,
            "metadata": self.metadata,
        })
    }
}

/// One line of a batch's results: enough to write it again, not the images.
pub(super) struct LineRecord {
    pub(super) custom_id: String,
    /// `batch_req_...`.
    pub(super) id: String,
    pub(super) outcome: Outcome,
}

pub(super) enum Outcome {
    /// 200 with base64 images, made again at each download from the call's sequence number and
    /// prompt.
    Images {
        request_id: String,
        seq: u64,
        n: u64,
        prompt_head: String,
        /// The answer's fields but `data` ([`answer_meta`](crate::openai::generate::answer_meta)).
        meta: String,
    },
    /// 200 with a small body kept as it is (images by URL, or not an image).
    Literal { request_id: String, body: String },
    /// The live endpoint's error answer.
    Failed {
        request_id: String,
        status: u16,
        body: Value,
    },
    /// No answer: `response: null` and an `error`.
    NoResponse {
        code: &'static str,
        message: &'static str,
    },
}

const SUCCESS_TAIL: &str = "},\"error\":null}\n";
const DATA_OPEN: &str = "{\"data\":[";
const IMAGE_OPEN: &str = "{\"b64_json\":\"";
const IMAGE_CLOSE: &str = "\"}";
const DATA_CLOSE: &str = "],";

impl LineRecord {
    pub(super) fn succeeded(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Images { .. } | Outcome::Literal { .. }
        )
    }

    fn success_head(&self, request_id: &str) -> String {
        format!(
            "{{\"id\":\"{}\",\"custom_id\":{},\"response\":{{\"status_code\":200,\"request_id\":\"{request_id}\",\"body\":",
            self.id,
            Value::from(self.custom_id.as_str())
        )
    }

    /// The line as the output or error file has it, newline included.
    fn render(&self, png: &PngTemplate) -> String {
        match &self.outcome {
            Outcome::Images {
                request_id,
                seq,
                n,
                prompt_head,
                meta,
            } => {
                let head = self.success_head(request_id);
                let mut out = String::with_capacity(self.rendered_len(png));
                out.push_str(&head);
                out.push_str(DATA_OPEN);
                for i in 0..*n {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(IMAGE_OPEN);
                    png.write_b64(&image_text(*seq, i, prompt_head), &mut out);
                    out.push_str(IMAGE_CLOSE);
                }
                out.push_str(DATA_CLOSE);
                out.push_str(&meta[1..]);
                out.push_str(SUCCESS_TAIL);
                out
            }
            Outcome::Literal { request_id, body } => {
                format!("{}{body}{SUCCESS_TAIL}", self.success_head(request_id))
            }
            Outcome::Failed {
                request_id,
                status,
                body,
            } => format!(
                "{{\"id\":\"{}\",\"custom_id\":{},\"response\":{{\"status_code\":{status},\"request_id\":\"{request_id}\",\"body\":{body}}},\"error\":null}}\n",
                self.id,
                Value::from(self.custom_id.as_str())
            ),
            Outcome::NoResponse { code, message } => format!(
                "{{\"id\":\"{}\",\"custom_id\":{},\"response\":null,\"error\":{}}}\n",
                self.id,
                Value::from(self.custom_id.as_str()),
                json!({"code": code, "message": message})
            ),
        }
    }

    /// The length of [`Self::render`], without making the images.
    fn rendered_len(&self, png: &PngTemplate) -> usize {
        match &self.outcome {
            Outcome::Images {
                request_id,
                seq,
                n,
                prompt_head,
                meta,
            } => {
                let images: usize = (0..*n)
                    .map(|i| {
                        IMAGE_OPEN.len()
                            + png.b64_len(&image_text(*seq, i, prompt_head))
                            + IMAGE_CLOSE.len()
                    })
                    .sum();
                self.success_head(request_id).len()
                    + DATA_OPEN.len()
                    + images
                    + (*n as usize).saturating_sub(1)
                    + DATA_CLOSE.len()
                    + meta.len()
                    - 1
                    + SUCCESS_TAIL.len()
            }
            _ => self.render(png).len(),
        }
    }
}

/// A batch's output file (its successful lines) or error file (the others), made when read.
pub(in crate::openai) struct OutputFile {
    pub(super) lines: Arc<Vec<LineRecord>>,
    pub(super) errors: bool,
}

impl OutputFile {
    fn includes(&self, line: &LineRecord) -> bool {
        line.succeeded() != self.errors
    }

    pub(super) fn len(&self, png: &PngTemplate) -> u64 {
        self.lines
            .iter()
            .filter(|l| self.includes(l))
            .map(|l| l.rendered_len(png) as u64)
            .sum()
    }

    /// The file's lines, each made when the client is ready for it (and after the wait
    /// [`FakeApi::slow_content`] sets, if any).
    pub(in crate::openai) fn stream(
        self: Arc<Self>,
        api: FakeApi,
    ) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures_util::stream::unfold((self, api, 0usize), |(file, api, mut next)| async move {
            while let Some(line) = file.lines.get(next) {
                next += 1;
                if file.includes(line) {
                    let wait = api.inner.batch_control.content_wait();
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let text = line.render(&api.inner.png);
                    lock(&api.inner.counters).stats.batch.output_bytes_served += text.len() as u64;
                    return Some((Ok(Bytes::from(text)), (file, api, next)));
                }
            }
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::batch::new_hex_id;
    use crate::openai::generate::answer_meta;
    use crate::openai::validate::GenRequest;

    #[test]
    fn rendered_lengths_are_exact() {
        let png = PngTemplate::sized(3000, 8);
        let req = |prompt: &str, n| GenRequest {
            model: "gpt-image-2".into(),
            prompt: prompt.into(),
            n,
            size: None,
            quality: Some("low".into()),
            output_format: None,
            background: None,
            response_format: None,
        };
        let long = format!("caf\u{e9} \"quoted\" {}", "x".repeat(600));
        for (prompt, n) in [("a fox", 1), ("two \"owls\"", 3), (long.as_str(), 2)] {
            let r = req(prompt, n);
            let line = LineRecord {
                custom_id: format!("id \"{prompt}\""),
                id: new_hex_id("batch_req_"),
                outcome: Outcome::Images {
                    request_id: new_hex_id("req_"),
                    seq: 12,
                    n,
                    prompt_head: r.prompt.chars().take(PROMPT_KEPT).collect(),
                    meta: answer_meta(&r),
                },
            };
            let text = line.render(&png);
            assert_eq!(text.len(), line.rendered_len(&png));
            assert!(text.ends_with('\n'));
            let parsed: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(parsed["custom_id"], json!(format!("id \"{prompt}\"")));
            assert_eq!(parsed["response"]["status_code"], 200);
            let data = parsed["response"]["body"]["data"].as_array().unwrap();
            assert_eq!(data.len(), n as usize);
            assert_eq!(parsed["response"]["body"]["quality"], "low");
            assert_eq!(parsed["error"], Value::Null);
        }
    }
}
