//! Memory-mapped safetensors checkpoints, single file or sharded
//! (`model.safetensors.index.json`), read into tch tensors of the requested dtype and device.
//!
//! Tensors are looked up by their HF names (`model.layers.{i}.self_attn.q_proj.weight`), so
//! checkpoints load without conversion. Every lookup is recorded: what the model never asked
//! for is reported as unused, which catches a checkpoint of another architecture early.

use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// One mapped file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// All tensors of a checkpoint, by name, not yet copied anywhere.
pub struct Weights {
    shards: Vec<Shard>,
    /// name -> index into `shards`
    index: HashMap<String, usize>,
    used: Mutex<BTreeSet<String>>,
    pub kind: Kind,
    pub device: Device,
}

fn st_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

impl Weights {
    /// Maps the checkpoint in `dir`: `model.safetensors`, or the shards listed by
    /// `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| st_err(&index_path, e))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| st_err(&index_path, "no `weight_map` object"))?;
            let set: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            set.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(st_err(
                    &single,
                    "not found (nor model.safetensors.index.json)",
                ));
            }
            vec![single]
        };
        Self::open_files(&files, kind, device)
    }

    /// Maps the given files; validates each header so a truncated or corrupt file fails here.
    pub fn open_files(files: &[PathBuf], kind: Kind, device: Device) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is only read; a concurrent writer would be a user error that
            // safetensors' own bounds checks still keep memory-safe for reads within the map.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| st_err(path, e))?;
            for name in st.names() {
                index.insert(name.to_string(), shards.len());
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
            });
        }
        Ok(Weights {
            shards,
            index,
            used: Mutex::new(BTreeSet::new()),
            kind,
            device,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Tensor names and shapes, sorted: the base-model fingerprint is built from this.
    pub fn shapes(&self) -> Result<Vec<(String, Vec<i64>)>> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let st = SafeTensors::deserialize(&shard.mmap).map_err(|e| st_err(&shard.path, e))?;
            for (name, view) in st.tensors() {
                out.push((name, view.shape().iter().map(|&d| d as i64).collect()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Loads `name`, checks its shape, converts it to the store's dtype and device.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.read(name, shape, |d| match d {
            Dtype::F32 => Some(Kind::Float),
            Dtype::F16 => Some(Kind::Half),
            Dtype::BF16 => Some(Kind::BFloat16),
            _ => None,
        })?;
        Ok(t.f_to_device(self.device)?.f_to_kind(self.kind)?)
    }

    /// Loads an integer tensor `name` (such as an index map) as i64 on the store's device.
    pub fn get_exact(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.read(name, shape, |d| match d {
            Dtype::I64 => Some(Kind::Int64),
            Dtype::I32 => Some(Kind::Int),
            _ => None,
        })?;
        Ok(t.f_to_kind(Kind::Int64)?.f_to_device(self.device)?)
    }

    /// Looks `name` up, checks its shape and that `kind_of` accepts its dtype, copies it into
    /// a CPU tensor of that dtype and records it as used.
    fn read(
        &self,
        name: &str,
        shape: &[i64],
        kind_of: fn(Dtype) -> Option<Kind>,
    ) -> Result<Tensor> {
        let shard = self.shard_of(name, shape)?;
        let st = SafeTensors::deserialize(&shard.mmap).map_err(|e| st_err(&shard.path, e))?;
        let view = st.tensor(name).map_err(|e| st_err(&shard.path, e))?;
        let found: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if found != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        let kind = kind_of(view.dtype()).ok_or_else(|| Error::Dtype {
            name: name.to_string(),
            found: format!("{:?}", view.dtype()),
        })?;
        let t = Tensor::f_from_data_size(view.data(), &found, kind)?;
        self.used
            .lock()
            .expect("weights lock")
            .insert(name.to_string());
        Ok(t)
    }

    fn shard_of(&self, name: &str, shape: &[i64]) -> Result<&Shard> {
        let i = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            expected: shape.to_vec(),
        })?;
        Ok(&self.shards[*i])
    }

    /// Names present in the checkpoint that no `get` asked for.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().expect("weights lock");
        let mut v: Vec<String> = self
            .index
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        v.sort();
        v
    }
}
