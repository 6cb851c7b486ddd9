//! Everything EESD training and inference share: the HF config, the LLaMA model split into
//! layer ranges, the KV cache, checkpoint loading, tokenizer and chat template, sampling.
pub mod args;
pub mod cache;
pub mod config;
pub mod corpus;
pub mod cuda_graph;
pub mod device;
pub mod error;
pub mod fingerprint;
pub mod generate;
pub mod head;
pub mod model;
pub mod native;
pub mod pretrained;
pub mod rope;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
