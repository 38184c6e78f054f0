//! Black-box tests: each starts the real `reflex` binary on a free port with a temporary
//! data directory and talks to it over gRPC with the generated client.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod batch;
mod bench;
mod console;
mod content;
mod demo;
mod disk;
mod ingest;
#[cfg(feature = "kafka")]
mod kafka;
mod models;
mod operations;
mod quality;
mod recommend;
mod replicas;
mod restart;
mod transport;
