//! The library's error type: each variant says what was expected and what was found.

use std::path::PathBuf;

/// Errors of model loading, configuration and generation input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model folder not found: {0} (give a local folder holding config.json, or a hub id org/name)")]
    ModelNotFound(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unsupported config: field `{field}` is {found}; {expected}")]
    Unsupported {
        field: String,
        found: String,
        expected: String,
    },
    #[error("invalid safetensors file {path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("tensor `{name}` is missing from the checkpoint (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<i64> },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("unsupported dtype {found} for tensor `{name}` (expected F32, F16 or BF16)")]
    Dtype { name: String, found: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("hub: {0}")]
    Hub(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Whether an error chain holds a write to a closed pipe (a reader such as `head` went away):
/// the binaries then end quietly, as Unix tools do.
pub fn is_closed_pipe<'a>(
    mut chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> bool {
    chain.any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
