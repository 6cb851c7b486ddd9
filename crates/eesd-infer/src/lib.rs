//! EESD inference: plain decoding (this crate's baseline), statistics, prompt input and the
//! decode benchmark. The CLI in `main.rs` only parses flags and calls into here.
pub mod bench;
pub mod bench_spec;
pub mod controller;
pub mod cost;
pub mod graphs;
pub mod plain;
pub mod prompts;
pub mod speculative;
pub mod stats;
pub mod verify;
