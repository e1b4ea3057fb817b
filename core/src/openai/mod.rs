//! What the OpenAI Images API answers (and Azure OpenAI, which shares its shapes): the images of
//! a 200 answer ([`answer`]), and its error bodies and rate-limit headers ([`errors`]).

pub mod answer;
pub mod batch;
pub mod errors;
pub mod stream;
