//! The native backend: decode steps on our CPU kernels (`eesd_core::native`), the rows of every
//! sequence of a round through each weight product together. A row's bits do not depend on
//! how many rows, or which sequences, share its pass, so verification equals plain decoding and
//! a batched sequence equals itself alone, by construction.

use super::TorchModel;
use crate::engine::{Backend, DecodeGuard, Drafted, ModelSpec, Rows};
use crate::verify::Verdict;
use eesd_core::cache::KvCache;
use eesd_core::head::EarlyExitHead;
use eesd_core::model::Llama;
use eesd_core::native::{NativeHead, NativeModel, Segment};
use eesd_core::sampling::SamplingParams;
use eesd_core::{Error, Result};
use tch::{Device, Kind, Tensor};

/// Hidden states of one sequence: `rows` rows of `hidden` f32 values.
#[derive(Debug, Clone)]
pub struct NativeRows {
    pub data: Vec<f32>,
    pub rows: usize,
}

impl NativeRows {
    fn width(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }
}

impl Rows for NativeRows {
    fn rows(&self) -> usize {
        self.rows
    }

    fn row(&self, i: usize) -> Self {
        let h = self.width();
        NativeRows {
            data: self.data[i * h..(i + 1) * h].to_vec(),
            rows: 1,
        }
    }

    fn cat(parts: &[&Self]) -> Self {
        NativeRows {
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
            rows: parts.iter().map(|p| p.rows).sum(),
        }
    }

    fn share(&self) -> Self {
        self.clone()
    }
}

/// The base model split at the exit layer, and its head, on the native kernels.
pub struct NativeBackend<'a> {
    torch: TorchModel<'a>,
    model: NativeModel,
    head: Option<NativeHead>,
}

impl<'a> NativeBackend<'a> {
    /// Views over `base`'s (and `head`'s) tensors; fails for CUDA models or other dtypes.
    pub fn new(base: &'a Llama, head: Option<&'a EarlyExitHead>) -> Result<Self> {
        Ok(NativeBackend {
            torch: TorchModel::new(base, head),
            model: NativeModel::new(base)?,
            head: head.map(|h| NativeHead::new(h, base)).transpose()?,
        })
    }

    pub fn base(&self) -> &'a Llama {
        self.torch.base
    }

    /// The rows of `states` in one buffer, and one segment per sequence over `caches`.
    fn gather<'c>(
        states: impl Iterator<Item = &'c NativeRows>,
        caches: &'c mut [&mut KvCache],
    ) -> (Vec<f32>, Vec<Segment<'c>>) {
        let mut x = Vec::new();
        let mut segs = Vec::new();
        for (s, cache) in states.zip(caches.iter_mut()) {
            x.extend_from_slice(&s.data);
            segs.push(Segment {
                cache,
                rows: s.rows,
            });
        }
        (x, segs)
    }
}

impl Backend for NativeBackend<'_> {
    type Hidden = NativeRows;
    type Token = u32;
    type Logits = Tensor;
    type Probs = Tensor;
    type Cache = KvCache;

    fn spec(&self) -> ModelSpec {
        self.torch.spec()
    }

    fn verify_width(&self) -> Option<usize> {
        None
    }

    fn new_caches(
        &self,
        prompt_len: usize,
        max_new: usize,
        drafting: bool,
    ) -> (KvCache, Option<KvCache>) {
        let b = self.base();
        let capacity = (b
            .cfg
            .max_position_embeddings
            .min(prompt_len + max_new.max(1))
            + 1) as i64;
        let head_cache = match (self.torch.head, drafting) {
            (Some(h), true) => Some(h.new_cache(b, 1, capacity)),
            _ => None,
        };
        (b.new_cache(1, capacity), head_cache)
    }

    fn prefill(
        &self,
        prompt: &[u32],
        cache: &mut KvCache,
        head_cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, NativeRows)> {
        let (logits, last) = self.torch.prefill(prompt, cache, head_cache);
        let flat = last
            .to_kind(Kind::Float)
            .reshape([-1])
            .to_device(Device::Cpu);
        let data = Vec::<f32>::try_from(flat)?;
        Ok((logits, NativeRows { data, rows: 1 }))
    }

    fn token(&self, id: u32) -> u32 {
        id
    }

    fn token_ids(&self, tokens: &[u32]) -> Result<Vec<u32>> {
        Ok(tokens.to_vec())
    }

    fn lower(&self, tokens: &[&u32], caches: &mut [&mut KvCache]) -> Result<Vec<NativeRows>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<u32> = tokens.iter().map(|&&t| t).collect();
        let mut x = self.model.embed(&ids);
        let mut segs: Vec<Segment> = caches
            .iter_mut()
            .map(|c| Segment { cache: c, rows: 1 })
            .collect();
        self.model
            .forward_layers_batch(&mut x, &mut segs, 0..self.torch.exit_layer)?;
        let h = self.model.hidden();
        Ok(x.chunks(h)
            .map(|r| NativeRows {
                data: r.to_vec(),
                rows: 1,
            })
            .collect())
    }

    fn upper(
        &self,
        states: &[&NativeRows],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<(Tensor, NativeRows)>> {
        let range = self.torch.exit_layer..self.base().num_layers();
        let (mut x, mut segs) = Self::gather(states.iter().copied(), caches);
        self.model.forward_layers_batch(&mut x, &mut segs, range)?;
        let t: usize = states.iter().map(|s| s.rows).sum();
        let (logits, normed) = self.model.logits_and_normed(&x, t);
        let h = self.model.hidden();
        let mut first = 0;
        Ok(states
            .iter()
            .map(|s| {
                let n = s.rows;
                let out = (
                    logits.narrow(0, first as i64, n as i64),
                    NativeRows {
                        data: normed[first * h..(first + n) * h].to_vec(),
                        rows: n,
                    },
                );
                first += n;
                out
            })
            .collect())
    }

    fn draft(
        &self,
        states: &[&NativeRows],
        prev: &[Option<&NativeRows>],
        head_caches: &mut [&mut KvCache],
    ) -> Result<Vec<(Tensor, NativeRows)>> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| Error::Input("drafting needs a head".into()))?;
        let reads = self.torch.reads_finals();
        let prev: Vec<Option<&[f32]>> = prev
            .iter()
            .map(|p| p.filter(|_| reads).map(|p| p.data.as_slice()))
            .collect();
        let (mut x, mut segs) = Self::gather(states.iter().copied(), head_caches);
        let outs = head.forward_last_batch(&self.model, &mut x, &mut segs, &prev)?;
        Ok(outs
            .into_iter()
            .map(|(logits, normed)| {
                (
                    logits,
                    NativeRows {
                        data: normed,
                        rows: 1,
                    },
                )
            })
            .collect())
    }

    fn first_token(&self, logits: &Tensor, sampling: &SamplingParams) -> Result<u32> {
        self.torch.first_token(logits, sampling)
    }

    fn choose_draft(
        &self,
        logits: &Tensor,
        sampling: &SamplingParams,
        want_confidence: bool,
    ) -> Result<Drafted<Self>> {
        let (token, confidence, q) = self.torch.choose_draft(logits, sampling, want_confidence)?;
        Ok(Drafted {
            token: token.int64_value(&[0]) as u32,
            confidence,
            q,
        })
    }

    fn judge(
        &self,
        logits: &Tensor,
        drafts: &[u32],
        q: &[Tensor],
        sampling: &SamplingParams,
    ) -> Result<Verdict> {
        let ids: Vec<i64> = drafts.iter().map(|&t| t as i64).collect();
        self.torch
            .judge(logits, &Tensor::from_slice(&ids), q, sampling)
    }

    /// Torch runs single-threaded until the guard drops: the loop's few torch ops (argmax,
    /// sampling) would otherwise wake torch's OpenMP threads, which then spin on the cores
    /// our kernels' threads need.
    fn decode_threads(&self) -> DecodeGuard {
        let before = tch::get_num_threads();
        tch::set_num_threads(1);
        DecodeGuard::restoring(move || tch::set_num_threads(before))
    }
}
