//! Fakes of the image providers' real HTTP protocols, for imagegen's tests, benchmarks and the
//! compose demo.
//!
//! Each fake is written from its provider's documentation, not from imagegen's code: a fake that
//! shares the code it tests would agree with that code's mistakes. So this crate depends on nothing
//! of imagegen, and the worker never contains a fake.
//!
//! One module per provider ([`openai`], [`azure`], [`gemini`], [`stability`], [`bfl`], [`replicate`], [`fal`],
//! [`comfyui`], [`automatic1111`]). Each runs in-process (tests) or
//! as the `imagegen-fakes` binary (benchmarks, the demo), misbehaves on demand and counts every
//! call, so a test can prove that nothing was paid for twice. Pieces that any provider's fake
//! needs (connections that can be reset, rate limits metered as token buckets, seeded latencies)
//! live at the root.

pub mod automatic1111;
pub mod azure;
pub mod bfl;
mod bucket;
pub mod comfyui;
pub mod fal;
pub mod gemini;
pub mod latency;
mod net;
pub use net::Running;
pub mod openai;
mod png;
pub mod replicate;
pub mod rules;
pub mod stability;

/// A digest of bytes (two FNV-1a variants, 128 bits: the fakes need no crypto), enough for a test
/// to tell which image a client sent.
pub fn digest(data: &[u8]) -> String {
    let mut a: u64 = 0xcbf29ce484222325;
    let mut b: u64 = 0x84222325cbf29ce4;
    for &byte in data {
        a = (a ^ u64::from(byte)).wrapping_mul(0x100000001b3);
        b = (b ^ u64::from(byte))
            .wrapping_mul(0x100000001b3)
            .rotate_left(7);
    }
    format!("{a:016x}{b:016x}")
}

/// The images an input object gives as data URIs (`data:image/png;base64,...`, as Replicate and
/// fal take files inline), by field, in field order; `Err` names a field whose data URI does not
/// decode.
pub(crate) fn data_uri_images(input: &serde_json::Value) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for (field, value) in input.as_object().into_iter().flatten() {
        let Some(uri) = value.as_str().filter(|v| v.starts_with("data:")) else {
            continue;
        };
        let bytes = uri
            .split_once(";base64,")
            .filter(|(meta, _)| meta.starts_with("data:image/"))
            .and_then(|(_, data)| base64_simd::STANDARD.decode_to_vec(data.as_bytes()).ok())
            .ok_or_else(|| field.clone())?;
        out.push((field.clone(), bytes));
    }
    Ok(out)
}
