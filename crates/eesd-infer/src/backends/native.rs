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
use tch::Tensor;

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

/// Prompt rows per prefill pass by default: long enough that each weight block serves many
/// rows, short enough that a pass's buffers (attention scores of every row over the whole
/// cache among them) stay a few MB, and that a server can put other sequences' decode rows
/// between a long prompt's chunks.
pub const DEFAULT_PREFILL_CHUNK: usize = 128;

/// The base model split at the exit layer, and its head, on the native kernels.
pub struct NativeBackend<'a> {
    torch: TorchModel<'a>,
    model: NativeModel,
    head: Option<NativeHead>,
    /// Prompt rows per prefill pass (the results do not depend on it).
    pub prefill_chunk: usize,
}

impl<'a> NativeBackend<'a> {
    /// Views over `base`'s (and `head`'s) tensors; fails for CUDA models or other dtypes.
    pub fn new(base: &'a Llama, head: Option<&'a EarlyExitHead>) -> Result<Self> {
        Ok(NativeBackend {
            torch: TorchModel::new(base, head),
            model: NativeModel::new(base)?,
            head: head.map(|h| NativeHead::new(h, base)).transpose()?,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
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

    /// The prompt through the native kernels in chunks of at most [`Self::prefill_chunk`]
    /// rows: memory stays flat for long prompts, and every prompt position gets the bits a
    /// decode row at that position would (a row's result does not depend on the rows it shares
    /// a pass with), so the cache and the first token are the same whatever the chunk size.
    fn prefill(
        &self,
        prompt: &[u32],
        cache: &mut KvCache,
        head_cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, NativeRows)> {
        self.prefill_part(prompt, None, cache, head_cache)
    }

    fn prefill_part_rows(&self) -> Option<usize> {
        Some(self.prefill_chunk.max(1))
    }

    /// A prompt's next rows after the ones the caches hold: the chunks of [`Self::prefill`]
    /// continued, the previous part's last final state `before` standing where the previous
    /// chunk's would (a row's bits do not depend on the chunking).
    fn prefill_part(
        &self,
        prompt: &[u32],
        before_part: Option<&NativeRows>,
        cache: &mut KvCache,
        mut head_cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, NativeRows)> {
        if prompt.is_empty() {
            return Err(Error::Input(
                "an empty prompt has nothing to prefill".into(),
            ));
        }
        let h = self.model.hidden();
        let (exit, layers) = (self.torch.exit_layer, self.base().num_layers());
        let drafting = self.head.is_some() && head_cache.is_some();
        let reads_finals = drafting && self.torch.reads_finals();
        // The base's final state before each chunk's first row (zeros before position 0), for
        // a head that reads the previous position's final state.
        let mut before = before_part.map_or_else(|| vec![0f32; h], |b| b.data.clone());
        let mut last = Vec::new();
        for piece in prompt.chunks(self.prefill_chunk.max(1)) {
            let n = piece.len();
            let mut x = self.model.embed(piece);
            self.model.forward_layers(&mut x, n, 0..exit, cache)?;
            let mut lower = drafting.then(|| x.clone());
            self.model.forward_layers(&mut x, n, exit..layers, cache)?;
            last = x[(n - 1) * h..].to_vec();
            if let (Some(head), Some(hc), Some(lower)) =
                (&self.head, head_cache.as_deref_mut(), lower.as_mut())
            {
                let prev = reads_finals.then(|| {
                    let finals = self.model.final_norm(&x);
                    let mut prev = std::mem::take(&mut before);
                    prev.extend_from_slice(&finals[..(n - 1) * h]);
                    before = finals[(n - 1) * h..].to_vec();
                    prev
                });
                let mut seg = [Segment { cache: hc, rows: n }];
                head.layers_batch(&self.model, lower, &mut seg, &[prev.as_deref()])?;
            }
        }
        let (logits, normed) = self.model.logits_and_normed(&last, 1);
        Ok((
            logits,
            NativeRows {
                data: normed,
                rows: 1,
            },
        ))
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

    fn lower_many(
        &self,
        tokens: &[&[&u32]],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<NativeRows>> {
        let ids: Vec<u32> = tokens.iter().flat_map(|t| t.iter().map(|&&x| x)).collect();
        if ids.is_empty() {
            return Ok(tokens
                .iter()
                .map(|_| NativeRows {
                    data: Vec::new(),
                    rows: 0,
                })
                .collect());
        }
        let mut x = self.model.embed(&ids);
        let mut segs: Vec<Segment> = caches
            .iter_mut()
            .zip(tokens)
            .map(|(c, t)| Segment {
                cache: c,
                rows: t.len(),
            })
            .collect();
        self.model
            .forward_layers_batch(&mut x, &mut segs, 0..self.torch.exit_layer)?;
        let h = self.model.hidden();
        let mut first = 0;
        Ok(tokens
            .iter()
            .map(|t| {
                let rows = NativeRows {
                    data: x[first * h..(first + t.len()) * h].to_vec(),
                    rows: t.len(),
                };
                first += t.len();
                rows
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

    fn point_mass(&self, token: &u32) -> Tensor {
        self.torch.point_mass(*token as i64)
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
