//! EESD inference: the speculative engine over a backend chosen once, its controllers and cost
//! model, statistics, prompt input and the benchmarks. The CLI in `main.rs` only parses flags
//! and calls into here.
//!
//! - [`engine`]: sequences, the round (draft, verify, commit), calibration.
//! - [`backends`]: the native CPU kernels and torch.
//! - [`controller`]: where the draft length is decided; [`cost`]: what a round costs.
//! - [`lookup`]: drafts copied from the prompt and the text generated so far.
//! - [`verify`]: acceptance of drafts against the base's distributions.
//! - [`serve`]: the OpenAI-compatible server and its continuous-batching scheduler.
pub mod backends;
pub mod bench;
pub mod bench_spec;
pub mod controller;
pub mod cost;
pub mod engine;
pub mod lookup;
pub mod prompts;
pub mod serve;
pub mod stats;
pub mod verify;
