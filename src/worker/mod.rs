//! The worker: it consumes jobs, runs each through the [`pipeline`] (which knows nothing of AMQP)
//! and settles its message after the broker confirmed the job's event.
//!
//! - [`build`]: the one place a worker is wired together from its settings;
//! - [`consumer`]: the consumer loop (reconnects, pauses, probes, jobs waiting at providers);
//! - [`settle`]: what becomes of one message (ack, dead-letter, delay, hold, return);
//! - [`pipeline`]: one job's trip, in parts;
//! - [`lane`]: the batch lane (jobs bought through a provider's batch API), and its collector;
//! - [`providers`]: each provider's throttle, retries, prices and pause state;
//! - [`throttle`], [`retry`], [`budget`], [`spool`]: the machinery those use;
//! - [`health`] and [`metrics`]: what the worker tells its operators.

pub mod budget;
pub mod build;
pub mod consumer;
pub mod health;
pub mod lane;
pub mod metrics;
pub mod pipeline;
pub mod providers;
pub mod retry;
pub mod settle;
pub mod spool;
pub mod throttle;

pub use consumer::{Worker, WorkerExit};
