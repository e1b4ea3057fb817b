//! Reading a 200 answer as it arrives: the base64 of each `"b64_json"` is decoded straight from
//! the arriving bytes into the image buffer, while they are still in the CPU's cache, and only
//! the rest of the answer (a few hundred bytes of JSON) is kept, to be parsed at the end.
//!
//! Compared with reading the whole answer and then decoding it ([`super::answer::decode_answer`]),
//! the megabytes of base64 are never copied, scanned or read again from memory, and the buffer
//! holds the images alone (3/4 of the answer). An answer that this cannot read exactly (a
//! `"b64_json"` with a JSON escape in it, or a key where the parser finds no image) is rebuilt
//! as it arrived and read by `decode_answer`, which parses all of it: the same result, slower.

use std::ops::Range;

use base64_simd::STANDARD as BASE64;

use super::answer::{Answer, answer_of, decode_answer, decode_located};
use crate::buffers::PooledBuf;
use crate::domain::error::Failure;

const KEY: &[u8] = b"\"b64_json\"";

/// Reads an answer chunk by chunk: [`push`](Self::push) each chunk, then
/// [`finish`](Self::finish).
pub struct AnswerReader {
    /// The images, decoded, back to back; or the raw answer once [`Mode::Raw`].
    out: PooledBuf,
    /// The answer without its base64 text (each value's quotes kept, empty between them).
    skeleton: Vec<u8>,
    /// Where each base64 text was cut out of the skeleton (just after its opening quote), and
    /// where its image is in `out`.
    cuts: Vec<(usize, Range<usize>)>,
    /// Where the key search resumes in the skeleton.
    scan_from: usize,
    mode: Mode,
    /// Base64 characters of an unfinished quad.
    carry: Vec<u8>,
    /// The current base64 text ended with padding: nothing may follow it.
    padded: bool,
    /// Bytes pushed so far.
    taken: usize,
}

enum Mode {
    /// Outside any base64 text.
    Json,
    /// Inside the base64 text of an image that starts at this offset of `out`.
    Base64 { start: usize },
    /// `out` holds the raw answer: it is read whole at the end.
    Raw,
}

impl AnswerReader {
    /// A reader that decodes into `out` (empty; it should have room for 3/4 of the answer).
    pub fn new(out: PooledBuf) -> Self {
        Self {
            out,
            skeleton: Vec::with_capacity(1024),
            cuts: Vec::new(),
            scan_from: 0,
            mode: Mode::Json,
            carry: Vec::with_capacity(4),
            padded: false,
            taken: 0,
        }
    }

    /// The next bytes of the answer.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), Failure> {
        self.taken += chunk.len();
        while !chunk.is_empty() {
            chunk = match self.mode {
                Mode::Raw => {
                    self.out.extend_from_slice(chunk);
                    &[]
                }
                Mode::Json => self.json(chunk),
                Mode::Base64 { start } => self.base64(chunk, start),
            };
        }
        Ok(())
    }

    /// Takes JSON text up to the start of the next base64 value (or all of `chunk`); returns
    /// what is left of `chunk`.
    fn json<'c>(&mut self, chunk: &'c [u8]) -> &'c [u8] {
        let before = self.skeleton.len();
        self.skeleton.extend_from_slice(chunk);
        loop {
            let from = self.scan_from;
            let Some(found) = memchr::memmem::find(&self.skeleton[from..], KEY) else {
                // A key cut by the chunk's end is found again next time.
                self.scan_from = self.skeleton.len().saturating_sub(KEY.len() - 1).max(from);
                return &[];
            };
            let key = from + found;
            let colon = skip_space(&self.skeleton, key + KEY.len());
            let quote = skip_space(&self.skeleton, colon + 1);
            match (self.skeleton.get(colon), self.skeleton.get(quote)) {
                (None, _) | (Some(b':'), None) => {
                    // Cut by the chunk's end: look again when more has arrived.
                    self.scan_from = key;
                    return &[];
                }
                (Some(b':'), Some(b'"')) => {
                    // The value starts: what followed the quote in this chunk is base64.
                    let text = quote + 1;
                    let rest = &chunk[text - before..];
                    self.skeleton.truncate(text);
                    self.scan_from = text;
                    self.mode = Mode::Base64 {
                        start: self.out.len(),
                    };
                    self.padded = false;
                    return rest;
                }
                // `null`, or `"b64_json"` that is no key: the parser decides.
                _ => self.scan_from = key + 1,
            }
        }
    }

    /// Decodes base64 up to the closing quote (or all of `chunk`); returns what is left of
    /// `chunk` after the quote. Whatever this cannot decode exactly (an escape, a character
    /// outside base64, a length that is no multiple of 4, text after the padding) turns the
    /// reader raw: the whole-body reader decides, as it would have without streaming (the value
    /// may be no image at all).
    fn base64<'c>(&mut self, chunk: &'c [u8], start: usize) -> &'c [u8] {
        let (text, rest) = match memchr::memchr2(b'"', b'\\', chunk) {
            Some(end) if chunk[end] == b'"' => (&chunk[..end], Some(&chunk[end + 1..])),
            Some(_) => return self.raw_from(start, chunk),
            None => (chunk, None),
        };
        let (len, carry, padded) = (self.out.len(), self.carry.clone(), self.padded);
        let decoded = self.decode(text);
        let ends_whole = rest.is_none() || self.carry.is_empty();
        if decoded.is_err() || !ends_whole {
            self.out.truncate(len);
            (self.carry, self.padded) = (carry, padded);
            return self.raw_from(start, chunk);
        }
        let Some(rest) = rest else { return &[] };
        self.cuts.push((self.skeleton.len(), start..self.out.len()));
        self.skeleton.push(b'"');
        self.scan_from = self.skeleton.len();
        self.mode = Mode::Json;
        rest
    }

    /// Turns the reader raw; `chunk` is the raw text that follows what was read so far.
    fn raw_from<'c>(&mut self, start: usize, chunk: &[u8]) -> &'c [u8] {
        self.go_raw(start);
        self.out.extend_from_slice(chunk);
        &[]
    }

    /// Decodes whole quads of `text` (with the carry of the last call), keeping the rest.
    fn decode(&mut self, mut text: &[u8]) -> Result<(), NotBase64> {
        if text.is_empty() {
            return Ok(());
        }
        if !self.carry.is_empty() {
            let take = (4 - self.carry.len()).min(text.len());
            self.carry.extend_from_slice(&text[..take]);
            text = &text[take..];
            if self.carry.len() < 4 {
                return Ok(());
            }
            let quad = std::mem::take(&mut self.carry);
            self.decode_quads(&quad)?;
            self.carry = quad;
            self.carry.clear();
        }
        let whole = text.len() / 4 * 4;
        self.decode_quads(&text[..whole])?;
        self.carry.extend_from_slice(&text[whole..]);
        Ok(())
    }

    fn decode_quads(&mut self, quads: &[u8]) -> Result<(), NotBase64> {
        if quads.is_empty() {
            return Ok(());
        }
        if self.padded {
            // Text after the padding.
            return Err(NotBase64);
        }
        BASE64
            .decode_append(quads, &mut *self.out)
            .map_err(|_| NotBase64)?;
        self.padded = quads.last() == Some(&b'=');
        Ok(())
    }

    /// Turns what was read so far back into the raw answer, in `out`, to be read whole.
    fn go_raw(&mut self, current: usize) {
        let mut raw = Vec::with_capacity(self.skeleton.len() + self.out.len() / 3 * 4 + 8);
        let mut from = 0;
        for (at, image) in &self.cuts {
            raw.extend_from_slice(&self.skeleton[from..*at]);
            BASE64.encode_append(&self.out[image.clone()], &mut raw);
            from = *at;
        }
        raw.extend_from_slice(&self.skeleton[from..]);
        if matches!(self.mode, Mode::Base64 { .. }) {
            BASE64.encode_append(&self.out[current..], &mut raw);
            raw.extend_from_slice(&self.carry);
        }
        self.out.clear();
        self.out.extend_from_slice(&raw);
        self.cuts.clear();
        self.carry.clear();
        self.mode = Mode::Raw;
    }

    /// Bytes of the answer pushed so far.
    pub fn taken(&self) -> usize {
        self.taken
    }

    /// The answer, once every chunk was pushed.
    pub fn finish(mut self) -> Result<Answer, Failure> {
        match self.mode {
            Mode::Raw => return decode_answer(self.out),
            Mode::Base64 { start } => {
                // It ends inside a value: the whole-body reader says why.
                self.go_raw(start);
                return decode_answer(self.out);
            }
            Mode::Json => {}
        }
        let images: Vec<Range<usize>> = self.cuts.iter().map(|(_, r)| r.clone()).collect();
        match decode_located(&self.skeleton, &images) {
            Some(sources) => answer_of(sources, self.out.freeze()),
            None => {
                // The skeleton does not pair each value with an image: read it all.
                self.go_raw(0);
                decode_answer(self.out)
            }
        }
    }
}

/// Text that does not decode as base64 where it stands.
struct NotBase64;

fn skip_space(text: &[u8], mut i: usize) -> usize {
    while text.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

impl crate::http::BodySink for AnswerReader {
    fn push(&mut self, chunk: &[u8]) -> Result<(), Failure> {
        AnswerReader::push(self, chunk)
    }
    fn taken(&self) -> usize {
        self.taken
    }
}

#[cfg(test)]
mod tests;
