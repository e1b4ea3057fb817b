//! The domain: what a job is, what its outcome is, how failures are classified, what a purchase
//! costs, and where a job's objects live. Plain data and rules: nothing here talks to a broker,
//! a provider or a store, and nothing here imports the rest of the crate.

pub mod cost;
pub mod error;
pub mod event;
pub mod job;
pub mod json;
pub mod keys;
pub mod limits;
