//! Integration tests: one binary, real RabbitMQ (127.0.0.1:5672), real Garage (127.0.0.1:3900),
//! and the in-project fake image API. `make test` starts the services.
//!
//! Each test gets its own queues, exchange and storage prefix, so tests run in parallel without
//! seeing each other's messages.

mod automatic1111;
mod azure;
mod batch;
mod bfl;
mod brokers;
mod budget;
mod cli;
mod comfyui;
mod contract;
mod dlq;
mod fal;
mod fallback;
mod gallery;
mod gemini;
mod helpers;
mod hostile_frames;
mod lane;
mod lane_crash;
mod ops;
mod outputs;
mod pipeline;
mod proxy;
mod references;
mod reliability;
mod replicate;
mod serial;
mod stability;
mod storage;
mod throughput;
mod topology;
