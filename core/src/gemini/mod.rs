//! What the Gemini API answers to `models/MODEL:generateContent` with image output: the images
//! (and refusals) of a 200 answer ([`answer`]), and its error bodies ([`errors`]).
//!
//! Two traps shape these readers. A refusal arrives as HTTP 200 (a `finishReason` or a
//! `promptFeedback.blockReason`, and no image), so a 200 is not a success until an image is in
//! it. And `RESOURCE_EXHAUSTED` means two different things: a per-minute limit (retry after the
//! delay it names) or a per-day quota (nothing works until the quota resets).

pub mod answer;
pub mod errors;
