//! The engine's two backends, chosen once per run: [`native::NativeBackend`] (our CPU kernels:
//! a row gets the same bits alone, with a sequence's other rows or with other sequences) and
//! [`torch::TorchBackend`] (libtorch ops: CUDA, and CPU for comparison). Both keep the model
//! as torch tensors, prefill in torch, and pick tokens with torch's sampling ops; what they
//! share lives here.

pub mod graphs;
pub mod native;
pub mod torch;

use crate::verify::{accept_greedy, accept_sampled, Verdict};
use eesd_core::head::EarlyExitHead;
use eesd_core::model::Llama;
use eesd_core::sampling::SamplingParams;
use eesd_core::{Error, Result};
use tch::{Device, Kind, Tensor};

pub use native::NativeBackend;
pub use torch::TorchBackend;

/// Which kernels run the decode steps (prefill always runs in torch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Our CPU kernels (`eesd_core::native`): a row gets the same bits alone or with others,
    /// so verification equals plain decoding by construction; CPU only.
    Native,
    /// libtorch ops: CUDA, and CPU for comparison.
    Torch,
}

impl Kernels {
    /// `native` or `torch`; `None` picks native on CPU and torch on CUDA.
    pub fn parse(spec: Option<&str>, device: Device) -> Result<Self> {
        let native = eesd_core::device::native_kernels(spec, device == Device::Cpu)?;
        Ok(if native {
            Kernels::Native
        } else {
            Kernels::Torch
        })
    }
}

/// Runs `$body` with `$engine` bound to an [`crate::engine::Engine`] on the backend `$kernels`
/// names (the one place a run picks its kernels; `$body` is compiled for each backend).
/// `$head`: `Option<&EarlyExitHead>`; the torch backend's verify width is `$max_draft + 1`.
#[macro_export]
macro_rules! with_engine {
    ($kernels:expr, $base:expr, $head:expr, $max_draft:expr, |$engine:ident| $body:expr) => {
        match $kernels {
            $crate::backends::Kernels::Native => {
                let backend = $crate::backends::NativeBackend::new($base, $head)?;
                #[allow(unused_mut)]
                let mut $engine = $crate::engine::Engine::new(backend, $max_draft);
                $body
            }
            $crate::backends::Kernels::Torch => {
                let backend = $crate::backends::TorchBackend::new($base, $head, $max_draft + 1);
                #[allow(unused_mut)]
                let mut $engine = $crate::engine::Engine::new(backend, $max_draft);
                $body
            }
        }
    };
}

/// The model and head as torch tensors: prefill and token choice for both backends.
#[derive(Clone, Copy)]
pub(crate) struct TorchModel<'a> {
    pub base: &'a Llama,
    pub head: Option<&'a EarlyExitHead>,
    pub exit_layer: usize,
}

impl<'a> TorchModel<'a> {
    pub fn new(base: &'a Llama, head: Option<&'a EarlyExitHead>) -> Self {
        TorchModel {
            base,
            head,
            exit_layer: head.map(|h| h.spec.exit_layer).unwrap_or(0),
        }
    }

    pub fn reads_finals(&self) -> bool {
        self.head.is_some_and(|h| h.final_state.is_some())
    }

    pub fn spec(&self) -> crate::engine::ModelSpec {
        crate::engine::ModelSpec {
            context: self.base.cfg.max_position_embeddings,
            vocab: self.base.cfg.vocab_size,
            has_head: self.head.is_some(),
            head_reads_finals: self.reads_finals(),
        }
    }

    /// The prompt through every layer and, given its cache, the head, in torch (its GEMMs
    /// suit long prompts; decode steps then run on the backend's kernels, so every position
    /// is computed the same way by plain and speculative decoding): the logits of the last
    /// position `[1, V]` and its final state after the norm `[1, 1, H]`.
    pub fn prefill(
        &self,
        prompt: &[u32],
        cache: &mut eesd_core::cache::KvCache,
        head_cache: Option<&mut eesd_core::cache::KvCache>,
    ) -> (Tensor, Tensor) {
        let _g = tch::no_grad_guard();
        let b = self.base;
        let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let ids = Tensor::from_slice(&ids).to_device(b.device).unsqueeze(0);
        let h_n = b.forward_layers(&b.embed(&ids), 0..self.exit_layer, cache);
        let h = b.forward_layers(&h_n, self.exit_layer..b.num_layers(), cache);
        if let (Some(head), Some(hc)) = (self.head, head_cache) {
            let prev = head
                .final_state
                .as_ref()
                .map(|_| eesd_core::head::previous_positions(&b.final_norm(&h)));
            let _ = head.forward_hidden(b, &h_n, prev.as_ref(), hc);
        }
        // The last row is normed alone, as before the final-state input existed: the first
        // token keeps its bits (a norm over all rows need not give a row the same ones).
        let last = b.final_norm(&h.select(1, -1).unsqueeze(1));
        let logits = b.logits(&last).squeeze_dim(1);
        (logits, last)
    }

    /// The prefill's token (host id).
    pub fn first_token(&self, logits: &Tensor, sampling: &SamplingParams) -> Result<u32> {
        let _g = tch::no_grad_guard();
        let token = if sampling.is_greedy() {
            logits.argmax(-1, false)
        } else {
            draw(
                &sampling.probs(logits),
                "the model's next-token distribution",
            )?
        };
        Ok(token.int64_value(&[0]) as u32)
    }

    /// A draft token `[1]` i64 from the head's logits `[1, V_d]`, its top-1 probability when
    /// asked for, and its processed distribution over the full vocabulary when sampling.
    pub fn choose_draft(
        &self,
        logits: &Tensor,
        sampling: &SamplingParams,
        want_confidence: bool,
    ) -> Result<(Tensor, Option<f32>, Option<Tensor>)> {
        let _g = tch::no_grad_guard();
        let head = self
            .head
            .ok_or_else(|| Error::Input("drafting needs a head".into()))?;
        let greedy = sampling.is_greedy();
        let q = (!greedy || want_confidence).then(|| sampling.probs(logits));
        let idx = match (&q, greedy) {
            (Some(q), false) => draw(q, "the head's draft distribution")?,
            _ => logits.argmax(-1, false),
        };
        let confidence =
            want_confidence.then(|| q.as_ref().map_or(1.0, |q| q.max().double_value(&[]) as f32));
        let vocab = self.base.cfg.vocab_size as i64;
        let q = q.filter(|_| !greedy).map(|q| head.to_full_vocab(&q, vocab));
        Ok((head.token_ids(&idx), confidence, q))
    }

    /// `[1, V]`: all the probability on `token` (a copied draft's `q`).
    pub fn point_mass(&self, token: i64) -> Tensor {
        let (v, device) = (self.base.cfg.vocab_size as i64, self.base.device);
        let q = Tensor::zeros([1, v], (Kind::Float, device));
        let _ = q.narrow(1, token, 1).fill_(1.0);
        q
    }

    /// The verdict on `drafts` `[K]` from the base's logits `[K+1, V]`.
    pub fn judge(
        &self,
        logits: &Tensor,
        drafts: &Tensor,
        q: &[Tensor],
        sampling: &SamplingParams,
    ) -> Result<Verdict> {
        let _g = tch::no_grad_guard();
        if sampling.is_greedy() {
            return Ok(accept_greedy(logits, drafts));
        }
        let (device, vocab) = (logits.device(), self.base.cfg.vocab_size as i64);
        let k = drafts.size()[0];
        let p = sampling.probs(logits);
        let q = if k > 0 {
            Tensor::cat(q, 0)
        } else {
            Tensor::zeros([0, vocab], (Kind::Float, device))
        };
        let u = Tensor::rand([k], (Kind::Float, device));
        accept_sampled(&p, &q, drafts, &u)
            .map_err(|_| broken("the model's or the head's distribution"))
    }
}

/// One draw `[1]` from each row of `probs` `[B, V]`, or an error naming `what` when a row is
/// not a distribution (NaN, inf or negative mass: broken weights), instead of torch's panic.
fn draw(probs: &Tensor, what: &str) -> Result<Tensor> {
    probs
        .f_multinomial(1, false)
        .map(|t| t.squeeze_dim(1))
        .map_err(|_| broken(what))
}

fn broken(what: &str) -> Error {
    Error::Input(format!(
        "{what} is not a probability distribution (it holds NaN, inf or negative values): the weights are broken"
    ))
}

/// The base's KV cache as the engine sees it.
impl crate::engine::Cache for eesd_core::cache::KvCache {
    fn positions(&self) -> usize {
        self.len(0) as usize
    }

    fn uniform_positions(&self) -> Option<usize> {
        let first = self.layers.first()?.len;
        self.layers
            .iter()
            .all(|l| l.len == first)
            .then_some(first as usize)
    }

    fn roll_back(&mut self, len: usize) {
        self.truncate(len as i64)
    }
}
