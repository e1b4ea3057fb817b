//! imagegen's pure part: plain data and rules, and the readers of everything that arrives from
//! outside. Nothing here does I/O, starts a runtime or talks to a broker, a provider or a store,
//! so every parser can be fuzzed and property-tested alone (`fuzz/`), and the worker (the
//! `imagegen` crate) builds on it.
//!
//! - [`domain`]: the job contract, the result event, the error taxonomy, costs, reported rate
//!   limits and where objects live.
//! - Readers of what arrives from outside, each of which turns anything, however hostile, into
//!   a value or a classified failure, never a panic:
//!   - [`http`]: the headers and statuses every HTTP provider shares (`retry-after`);
//!   - [`openai`]: the Images API's answers, error bodies and rate-limit headers;
//!   - [`bfl`]: Black Forest Labs' submits, polls (moderation among their statuses) and errors;
//!   - [`gemini`]: the Gemini API's answers (refusals on HTTP 200 among them) and error bodies;
//!   - [`stability`]: Stability AI's images (raw or JSON, a filtered one refused) and errors;
//!   - [`replicate`]: Replicate's predictions (a safety refusal told from a crash) and errors;
//!   - [`fal`]: fal's queue (its submits, statuses and results, a flagged image refused) and errors;
//!   - [`comfyui`]: a ComfyUI server's queue, history and jobs (a graph error named by its node),
//!     and the workflows jobs are put into;
//!   - [`automatic1111`]: AUTOMATIC1111's (and Forge's) `txt2img` answers and errors;
//!   - [`entra`]: the Microsoft Entra ID token endpoint's grants and refusals (Azure OpenAI);
//!   - [`amqp`]: the headers of a message (the sealed count of failed attempts, the failure the
//!     worker recorded, the broker's death records).
//! - [`buffers`]: the image-sized buffers answers are read and decoded into.

pub mod amqp;
pub mod automatic1111;
pub mod bfl;
pub mod buffers;
pub mod comfyui;
pub mod domain;
pub mod entra;
pub mod fal;
pub mod gemini;
pub mod http;
pub mod openai;
pub mod replicate;
pub mod stability;
