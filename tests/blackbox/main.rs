//! Black-box tests: each starts the real `reflex` binary on a free port with a temporary
//! data directory and talks to it over gRPC with the generated client.

mod support;

mod ingest;
mod recommend;
mod restart;
