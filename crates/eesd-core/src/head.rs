//! The early-exit head: the draft model is the base's own layers `[0, N)` plus this head,
//! `E` decoder layers of the base's shape, an RMSNorm and an LM head (EESD.md section 2).
//!
//! On disk a head is a folder with `head.safetensors` (HF-named tensors: `layers.{j}.*`,
//! `norm.weight`, optionally `lm_head.weight` and `draft_vocab`) and `head.json`
//! ([`HeadSpec`]). Trainer and decoder both go through this module, so a head written by one
//! loads in the other by construction.

use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::model::{run_stack, run_stack_at, DecoderLayer, Llama, RmsNorm};
use crate::weights::Weights;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const FORMAT_VERSION: u32 = 1;

/// How the head's layers start before training (also the trainer's `--init` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HeadInit {
    /// A copy of the base's last layer (default): it already maps deep features to the
    /// output space, which is what the head must learn to do from layer N.
    LastLayer,
    /// A copy of base layer N, the layer that would have come next.
    ExitLayer,
    Random,
}

/// Where the head's output projection comes from (also the trainer's `--lm-head` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LmHeadMode {
    /// The base's own frozen LM head (default): no extra memory.
    Shared,
    /// A trainable copy, saved with the head.
    Own,
}

/// `head.json`: the head's shape, what base it belongs to, and how it was trained.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadSpec {
    pub format: u32,
    /// N: the head reads the hidden state after base layer N-1 (layers `[0, N)` run first).
    pub exit_layer: usize,
    /// E: decoder layers in the head.
    pub head_layers: usize,
    pub init: HeadInit,
    pub lm_head: LmHeadMode,
    /// V_d when the draft predicts only the V_d most frequent teacher tokens.
    pub draft_vocab_size: Option<usize>,
    /// The head also reads the verifier's final state (after the model's norm) of the
    /// previous position, through [`FinalStateInput`]. Heads without the field predate it.
    #[serde(default)]
    pub final_state_input: bool,
    pub base_fingerprint: String,
    pub hidden_size: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub step: u64,
    #[serde(default)]
    pub metrics: serde_json::Value,
    #[serde(default)]
    pub training: serde_json::Value,
}

impl HeadSpec {
    /// A spec for `base` with the decided defaults (E = 1, last-layer init, shared LM head).
    pub fn for_base(base: &Llama, fingerprint: &str, exit_layer: usize) -> Self {
        HeadSpec {
            format: FORMAT_VERSION,
            exit_layer,
            head_layers: 1,
            init: HeadInit::LastLayer,
            lm_head: LmHeadMode::Shared,
            draft_vocab_size: None,
            final_state_input: false,
            base_fingerprint: fingerprint.to_string(),
            hidden_size: base.cfg.hidden_size,
            vocab_size: base.cfg.vocab_size,
            step: 0,
            metrics: serde_json::Value::Null,
            training: serde_json::Value::Null,
        }
    }

    /// Refuses a spec that cannot work on `base`, saying what was expected and found.
    pub fn check_against(&self, base: &Llama, fingerprint: &str) -> Result<()> {
        let bad = |msg: String| Err(Error::Input(msg));
        let l = base.num_layers();
        if self.exit_layer == 0 || self.exit_layer >= l {
            return bad(format!(
                "exit layer N = {} is outside [1, {}] for a {l}-layer base",
                self.exit_layer,
                l - 1
            ));
        }
        if self.head_layers == 0 {
            return bad("the head needs at least one layer".into());
        }
        if self.hidden_size != base.cfg.hidden_size {
            return bad(format!(
                "head was trained for hidden size {}, model has {}",
                self.hidden_size, base.cfg.hidden_size
            ));
        }
        if self.vocab_size != base.cfg.vocab_size {
            return bad(format!(
                "head was trained for vocabulary size {}, model has {}",
                self.vocab_size, base.cfg.vocab_size
            ));
        }
        if self.base_fingerprint != fingerprint {
            return bad(format!(
                "head was trained for base model {}, this model is {}",
                self.base_fingerprint, fingerprint
            ));
        }
        Ok(())
    }
}

/// What the head adds to its input at position t when it reads the verifier's final state of
/// position t-1: `proj(norm(f))`, zero-initialised so a new one changes nothing until trained.
///
/// Why: layer N alone knows little of what the deep layers concluded, and the verifier has
/// already computed, for every committed position and for a round's first draft, the state the
/// base's own LM head reads. A draft later in a chain has no verified state for the position
/// before it and reads the head's own normed output there instead (the same space: both feed
/// the same LM head). This is the lever issue 7 names; `scripts/head_levers.py` measured it.
pub struct FinalStateInput {
    pub norm: RmsNorm,
    /// `[H, H]`.
    pub proj: Tensor,
}

impl FinalStateInput {
    /// `[B, T, H]` previous-position final states -> the `[B, T, H]` addition to the head input.
    pub fn forward(&self, prev_final: &Tensor) -> Tensor {
        self.norm
            .forward(&prev_final.to_kind(self.proj.kind()))
            .linear::<&Tensor>(&self.proj, None)
    }
}

/// `[B, T, H]` final states of positions 0..T -> those of positions -1..T-1 (zeros first): what
/// each position's head input reads.
pub fn previous_positions(finals: &Tensor) -> Tensor {
    let t = finals.size()[1];
    let zero = finals.narrow(1, 0, 1).zeros_like();
    Tensor::cat(&[&zero, &finals.narrow(1, 0, t - 1)], 1)
}

pub struct EarlyExitHead {
    pub spec: HeadSpec,
    pub layers: Vec<DecoderLayer>,
    /// Present when `spec.final_state_input`.
    pub final_state: Option<FinalStateInput>,
    pub norm: RmsNorm,
    /// `[V_d, H]`: the own LM head, or the base's rows for the draft vocabulary.
    lm_head: Option<Tensor>,
    /// `[V_d]` i64: draft index -> token id (reduced vocabulary only).
    pub vocab_map: Option<Tensor>,
}

fn random_layer(base: &Llama, std: f64) -> DecoderLayer {
    let mut l = base.layers[0].deep_copy();
    for t in l.tensors_mut() {
        let fresh = if t.dim() == 1 {
            t.ones_like()
        } else {
            t.randn_like() * std
        };
        *t = fresh;
    }
    l
}

impl EarlyExitHead {
    /// A new, untrained head for `base`. `draft_vocab` lists the token ids the draft predicts
    /// (most frequent first) when the vocabulary is reduced.
    pub fn init(base: &Llama, mut spec: HeadSpec, draft_vocab: Option<&[u32]>) -> Result<Self> {
        let fp = spec.base_fingerprint.clone();
        spec.draft_vocab_size = draft_vocab.map(|v| v.len());
        spec.check_against(base, &fp)?;
        let l = base.num_layers();
        let layers = (0..spec.head_layers)
            .map(|_| match spec.init {
                HeadInit::LastLayer => base.layers[l - 1].deep_copy(),
                HeadInit::ExitLayer => base.layers[spec.exit_layer].deep_copy(),
                HeadInit::Random => random_layer(base, 0.02),
            })
            .collect();
        let norm = RmsNorm {
            weight: base.norm.weight.detach().copy(),
            eps: base.norm.eps,
        };
        let vocab_map = draft_vocab.map(|v| {
            let ids: Vec<i64> = v.iter().map(|&t| t as i64).collect();
            Tensor::from_slice(&ids).to_device(base.device)
        });
        let own = match spec.lm_head {
            LmHeadMode::Own => Some(Self::base_rows(base, vocab_map.as_ref()).copy()),
            LmHeadMode::Shared => None,
        };
        let final_state = spec.final_state_input.then(|| {
            let w = &base.norm.weight;
            let h = base.cfg.hidden_size as i64;
            FinalStateInput {
                norm: RmsNorm {
                    weight: w.ones_like(),
                    eps: base.norm.eps,
                },
                proj: Tensor::zeros([h, h], (w.kind(), w.device())),
            }
        });
        let mut head = EarlyExitHead {
            spec,
            layers,
            final_state,
            norm,
            lm_head: own,
            vocab_map,
        };
        head.bind_shared(base);
        Ok(head)
    }

    fn base_rows(base: &Llama, vocab_map: Option<&Tensor>) -> Tensor {
        match vocab_map {
            Some(m) => base.lm_head.index_select(0, m),
            None => base.lm_head.shallow_clone(),
        }
    }

    /// A shared LM head is the base's (restricted to the draft vocabulary): nothing is saved.
    fn bind_shared(&mut self, base: &Llama) {
        if self.spec.lm_head == LmHeadMode::Shared {
            self.lm_head = Some(Self::base_rows(base, self.vocab_map.as_ref()).detach());
        }
    }

    /// Loads a head folder and checks it belongs to `base` (identified by `fingerprint`); the
    /// weights take the base's dtype.
    pub fn load(dir: &Path, base: &Llama, fingerprint: &str) -> Result<Self> {
        Self::load_as(dir, base, fingerprint, base.kind)
    }

    /// [`Self::load`] with the weights in `kind`: the trainer keeps the head in f32 whatever
    /// the base dtype (a bf16 base would otherwise round a resumed head).
    pub fn load_as(dir: &Path, base: &Llama, fingerprint: &str, kind: Kind) -> Result<Self> {
        let json = dir.join("head.json");
        let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
        let spec: HeadSpec = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: json.clone(),
            msg: e.to_string(),
        })?;
        if spec.format != FORMAT_VERSION {
            return Err(Error::Input(format!(
                "{}: head format {} is not supported (expected {FORMAT_VERSION})",
                json.display(),
                spec.format
            )));
        }
        spec.check_against(base, fingerprint)?;
        let w = Weights::open_files(&[dir.join("head.safetensors")], kind, base.device)?;
        let layers = (0..spec.head_layers)
            .map(|j| DecoderLayer::load(&w, &format!("layers.{j}"), &base.cfg))
            .collect::<Result<Vec<_>>>()?;
        let h = base.cfg.hidden_size;
        let norm = RmsNorm::load(&w, "norm", h, base.cfg.rms_norm_eps)?;
        let vocab_map = match spec.draft_vocab_size {
            Some(vd) => {
                let t = w.get_exact("draft_vocab", &[vd as i64])?;
                let max = t.max().int64_value(&[]);
                if max as usize >= base.cfg.vocab_size {
                    return Err(Error::Input(format!(
                        "draft_vocab holds token id {max}, beyond the vocabulary"
                    )));
                }
                Some(t)
            }
            None => None,
        };
        let vd = spec.draft_vocab_size.unwrap_or(base.cfg.vocab_size) as i64;
        let own = match spec.lm_head {
            LmHeadMode::Own => Some(w.get("lm_head.weight", &[vd, h as i64])?),
            LmHeadMode::Shared => None,
        };
        let final_state = if spec.final_state_input {
            Some(FinalStateInput {
                norm: RmsNorm::load(&w, "final_state.norm", h, base.cfg.rms_norm_eps)?,
                proj: w.get("final_state.proj.weight", &[h as i64, h as i64])?,
            })
        } else {
            None
        };
        // The weights record the exit layer they were trained at (heads saved before that
        // carry no record): an edited head.json must not run them on another layer.
        if w.contains("exit_layer") {
            let trained = w.get_exact("exit_layer", &[1])?.int64_value(&[0]);
            if trained != spec.exit_layer as i64 {
                return Err(Error::Input(format!(
                    "{}: head.json says exit layer N = {}, but head.safetensors was trained at N = {trained}",
                    dir.display(),
                    spec.exit_layer
                )));
            }
        }
        // Tensors the spec does not account for (an edited layer count, a dropped final-state
        // input) mean head.json and the weights disagree.
        let unused = w.unused();
        if !unused.is_empty() {
            return Err(Error::Input(format!(
                "{}: head.safetensors holds tensors head.json does not describe ({}): the head \
                 has {} layer(s){} by its head.json",
                dir.display(),
                unused
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                spec.head_layers,
                if spec.final_state_input {
                    " and a final-state input"
                } else {
                    ""
                }
            )));
        }
        let mut head = EarlyExitHead {
            spec,
            layers,
            final_state,
            norm,
            lm_head: own,
            vocab_map,
        };
        head.bind_shared(base);
        Ok(head)
    }

    /// Every tensor that `save` writes, by HF-style name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        for (j, l) in self.layers.iter().enumerate() {
            out.extend(l.named_tensors(&format!("layers.{j}")));
        }
        out.push(("norm.weight".into(), self.norm.weight.shallow_clone()));
        if let Some(f) = &self.final_state {
            out.push((
                "final_state.norm.weight".into(),
                f.norm.weight.shallow_clone(),
            ));
            out.push(("final_state.proj.weight".into(), f.proj.shallow_clone()));
        }
        if self.spec.lm_head == LmHeadMode::Own {
            if let Some(w) = &self.lm_head {
                out.push(("lm_head.weight".into(), w.shallow_clone()));
            }
        }
        if let Some(m) = &self.vocab_map {
            out.push(("draft_vocab".into(), m.shallow_clone()));
        }
        // What the weights were trained for, checked against head.json at load.
        let n = Tensor::from_slice(&[self.spec.exit_layer as i64]);
        out.push(("exit_layer".into(), n));
        out
    }

    /// Writes `dir` atomically: a sibling temporary folder is filled, then renamed over `dir`,
    /// so a crash leaves either the old head or the new one, never a mix.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tmp = sibling(dir, "tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let tensors: Vec<(String, Tensor)> = self
            .named_tensors()
            .into_iter()
            .map(|(n, t)| {
                let t = t.detach().to_device(tch::Device::Cpu).contiguous();
                (n, t)
            })
            .collect();
        Tensor::write_safetensors(&tensors, tmp.join("head.safetensors"))?;
        let json =
            serde_json::to_string_pretty(&self.spec).map_err(|e| Error::Input(e.to_string()))?;
        std::fs::write(tmp.join("head.json"), json)
            .map_err(|e| Error::io(tmp.join("head.json"), e))?;
        let old = sibling(dir, "old");
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Converts the LM head (shared rows or own) to `kind`: training keeps the whole head in
    /// f32 whatever the base dtype.
    pub fn cast_lm_head(&mut self, kind: Kind) {
        if let Some(w) = &self.lm_head {
            let requires_grad = w.requires_grad();
            self.lm_head = Some(w.detach().to_kind(kind).set_requires_grad(requires_grad));
        }
    }

    /// Converts every head weight to `kind` (e.g. f16 to ship a small file; loading converts
    /// back to the base dtype).
    pub fn cast_to(&mut self, kind: Kind) {
        for t in self.trainable_mut() {
            *t = t.detach().to_kind(kind);
        }
        self.cast_lm_head(kind);
    }

    /// The draft LM head `[V_d, H]` (own, or the base's rows for the draft vocabulary).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().expect("lm head bound at load")
    }

    pub fn draft_vocab_size(&self) -> i64 {
        self.lm_head.as_ref().map(|w| w.size()[0]).unwrap_or(0)
    }

    /// A cache for the head's own layers.
    pub fn new_cache(&self, base: &Llama, batch: i64, capacity: i64) -> KvCache {
        // f32 while training, the base dtype otherwise.
        KvCache::with_layers(
            &base.cfg,
            self.layers.len(),
            batch,
            capacity,
            self.norm.weight.kind(),
            base.device,
        )
    }

    /// The head's input: layer-N states `[B, T, H]`, plus, for a head that reads them, the
    /// base's final states of the previous positions `[B, T, H]` (`None`: zeros).
    pub fn input(&self, hidden: &Tensor, prev_final: Option<&Tensor>) -> Tensor {
        match (&self.final_state, prev_final) {
            (Some(f), Some(prev)) => hidden + f.forward(prev).to_kind(hidden.kind()),
            _ => hidden.shallow_clone(),
        }
    }

    /// Layer-N hidden states `[B, T, H]` (and the previous positions' final states, see
    /// [`Self::input`]) -> head hidden states `[B, T, H]` (before the norm).
    pub fn forward_hidden(
        &self,
        base: &Llama,
        hidden: &Tensor,
        prev_final: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Tensor {
        run_stack(
            &self.layers,
            0..self.layers.len(),
            &base.rope,
            &self.input(hidden, prev_final),
            cache,
        )
    }

    /// The head's layers and norm over a static-shape head cache at a device offset (see
    /// [`crate::model::run_stack_at`]): what a CUDA graph of the draft step records. Returns
    /// the normed states `[B, T, H]` ([`Self::normed_logits`] makes logits of them).
    pub fn forward_normed_at(
        &self,
        base: &Llama,
        input: &Tensor,
        cache: &mut KvCache,
        offset: i64,
        offset_dev: &Tensor,
    ) -> Tensor {
        self.norm.forward(&run_stack_at(
            &self.layers,
            0..self.layers.len(),
            &base.rope,
            input,
            cache,
            offset,
            offset_dev,
        ))
    }

    /// Head hidden states -> draft logits `[B, T, V_d]` in f32.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        self.normed_logits(&self.norm.forward(hidden))
    }

    /// The head's normed states -> draft logits `[B, T, V_d]` in f32.
    pub fn normed_logits(&self, normed: &Tensor) -> Tensor {
        let w = self.lm_head.as_ref().expect("lm head bound at load");
        normed.linear::<&Tensor>(w, None).to_kind(Kind::Float)
    }

    /// Layer-N hidden states `[B, T, H]` -> draft logits `[B, T, V_d]`; the head cache grows by T.
    pub fn forward(
        &self,
        base: &Llama,
        hidden: &Tensor,
        prev_final: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Tensor {
        self.logits(&self.forward_hidden(base, hidden, prev_final, cache))
    }

    /// Draft-vocabulary probabilities `[B, V_d]` -> full-vocabulary `[B, V]` (zero elsewhere).
    pub fn to_full_vocab(&self, probs: &Tensor, vocab: i64) -> Tensor {
        match &self.vocab_map {
            None => probs.shallow_clone(),
            Some(m) => {
                let b = probs.size()[0];
                let idx = m.unsqueeze(0).expand([b, -1], false);
                Tensor::zeros([b, vocab], (probs.kind(), probs.device())).scatter(1, &idx, probs)
            }
        }
    }

    /// Draft indices `[B]` -> token ids `[B]`.
    pub fn token_ids(&self, idx: &Tensor) -> Tensor {
        match &self.vocab_map {
            None => idx.shallow_clone(),
            Some(m) => m.index_select(0, idx),
        }
    }

    /// The trainable tensors (layers, norm, own LM head): what the trainer optimises.
    pub fn trainable_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v: Vec<&mut Tensor> = Vec::new();
        for l in &mut self.layers {
            v.extend(l.tensors_mut());
        }
        v.push(&mut self.norm.weight);
        if let Some(f) = &mut self.final_state {
            v.push(&mut f.norm.weight);
            v.push(&mut f.proj);
        }
        if self.spec.lm_head == LmHeadMode::Own {
            if let Some(w) = &mut self.lm_head {
                v.push(w);
            }
        }
        v
    }
}

fn sibling(dir: &Path, tag: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.{tag}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LlamaConfig;

    /// A saved head whose head.json is then edited away from its weights is refused at load:
    /// another exit layer, fewer layers, a dropped final-state input.
    #[test]
    fn a_head_json_edited_away_from_its_weights_is_refused() {
        let mut cfg = LlamaConfig::named_shape("smollm2-135m").unwrap();
        (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) = (64, 128, 6);
        (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.vocab_size,
        ) = (4, 2, 16, 96);
        let base = Llama::random(cfg, Kind::Float, tch::Device::Cpu);
        let mut spec = HeadSpec::for_base(&base, "fp", 2);
        spec.head_layers = 2;
        spec.final_state_input = true;
        let head = EarlyExitHead::init(&base, spec, None).unwrap();
        let dir = std::env::temp_dir().join(format!("eesd-head-edit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        head.save(&dir).unwrap();
        EarlyExitHead::load(&dir, &base, "fp").expect("the head as saved loads");
        let json = dir.join("head.json");
        let saved = std::fs::read_to_string(&json).unwrap();
        for (field, value, needle) in [
            ("exit_layer", serde_json::json!(4), "was trained at N = 2"),
            (
                "head_layers",
                serde_json::json!(1),
                "does not describe (layers.1.",
            ),
            (
                "final_state_input",
                serde_json::json!(false),
                "final_state.",
            ),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(&saved).unwrap();
            v[field] = value;
            std::fs::write(&json, v.to_string()).unwrap();
            let err = EarlyExitHead::load(&dir, &base, "fp")
                .err()
                .expect(field)
                .to_string();
            assert!(err.contains(needle), "{field}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
