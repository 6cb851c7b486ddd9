//! What the engine needs from the kernels that run the model, as one trait.
//!
//! A backend is chosen once (native CPU kernels or torch, see [`crate::backends`]); the states
//! it hands out are its own associated types, so giving one backend's hidden states to another
//! does not compile. Every call takes the rows of several sequences at once (one slice entry
//! per sequence, each with its own cache), so a backend may run them through the weight
//! products together; a row must get the same bits alone or batched, which is what keeps
//! batched greedy output equal to each sequence's output alone.

use crate::verify::Verdict;
use eesd_core::sampling::SamplingParams;
use eesd_core::Result;

/// The positions (rows) of one sequence's hidden states, `[T, H]`.
pub trait Rows: Sized {
    fn rows(&self) -> usize;
    /// Row `i` alone.
    fn row(&self, i: usize) -> Self;
    /// The rows of `parts` in turn (at least one part).
    fn cat(parts: &[&Self]) -> Self;
    /// Another handle on the same rows (a view on torch, a copy of a few KB natively).
    fn share(&self) -> Self;
}

/// One sequence's KV cache (the base's, or the head's own): a length per layer, rolled back
/// by truncation.
pub trait Cache {
    /// Positions held by the first layer (the lower layers run ahead while drafting).
    fn positions(&self) -> usize;
    /// The positions every layer holds, or `None` while layers differ.
    fn uniform_positions(&self) -> Option<usize>;
    /// Shortens every layer to at most `len` positions (O(1): nothing is copied).
    fn roll_back(&mut self, len: usize);
}

/// What the engine needs to know about the model a backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// Positions the model can attend over (`max_position_embeddings`).
    pub context: usize,
    pub vocab: usize,
    /// Whether a head is loaded: without one every round is a plain step.
    pub has_head: bool,
    /// Whether the head also reads the base's final state of the previous position.
    pub head_reads_finals: bool,
}

/// A draft token chosen from the head's logits.
pub struct Drafted<B: Backend + ?Sized> {
    pub token: B::Token,
    /// The draft's top-1 probability, when asked for (a host read per draft step).
    pub confidence: Option<f32>,
    /// The processed draft distribution over the full vocabulary, when sampling.
    pub q: Option<B::Probs>,
}

/// The model split at the exit layer N, its head, and the kernels that run them.
pub trait Backend {
    /// Hidden states of some positions of one sequence: layer-N states or final states.
    type Hidden: Rows;
    /// A token where the backend keeps it (a device tensor on torch, so drafting needs no host
    /// read per step).
    type Token;
    /// Logits of some positions of one sequence: the base's `[T, V]`, the head's `[1, V_d]`.
    type Logits;
    /// A draft's processed distribution over the full vocabulary (sampling only).
    type Probs;
    type Cache: Cache;

    /// The model's sizes and the head's kind.
    fn spec(&self) -> ModelSpec;
    /// The most positions one verification may check, where the backend bounds it.
    fn verify_width(&self) -> Option<usize>;
    /// Time every this many rounds for the cost model (a timed round synchronises twice).
    fn timing_interval(&self) -> u64 {
        1
    }

    /// Caches for a prompt of `prompt_len` tokens and `max_new` new ones: the base's and, when
    /// `drafting`, the head's.
    fn new_caches(
        &self,
        prompt_len: usize,
        max_new: usize,
        drafting: bool,
    ) -> (Self::Cache, Option<Self::Cache>);
    /// The prompt through every layer (and the head, given its cache): the logits of the last
    /// position and its final state (what a final-state head reads for the next position).
    fn prefill(
        &self,
        prompt: &[u32],
        cache: &mut Self::Cache,
        head_cache: Option<&mut Self::Cache>,
    ) -> Result<(Self::Logits, Self::Hidden)>;
    /// Rows a prompt may be prefilled in, part after part ([`Self::prefill_part`]), with the
    /// same bits as in one go; `None` when only a whole prompt can be.
    fn prefill_part_rows(&self) -> Option<usize> {
        None
    }
    /// The next `part` of a prompt whose earlier positions the caches already hold: like
    /// [`Self::prefill`] for the whole prompt, given `before`, the final state this call
    /// returned for the previous part (what a final-state head reads before the part's first
    /// row). Backends without [`Self::prefill_part_rows`] take only whole prompts.
    fn prefill_part(
        &self,
        part: &[u32],
        before: Option<&Self::Hidden>,
        cache: &mut Self::Cache,
        head_cache: Option<&mut Self::Cache>,
    ) -> Result<(Self::Logits, Self::Hidden)> {
        if before.is_some() || cache.positions() > 0 {
            return Err(eesd_core::Error::Input(
                "this backend prefills whole prompts only".into(),
            ));
        }
        self.prefill(part, cache, head_cache)
    }

    fn token(&self, id: u32) -> Self::Token;
    /// Tokens to host ids (one host read).
    fn token_ids(&self, tokens: &[Self::Token]) -> Result<Vec<u32>>;

    /// One token per sequence embedded and run through layers `[0, N)`: its layer-N state.
    fn lower(
        &self,
        tokens: &[&Self::Token],
        caches: &mut [&mut Self::Cache],
    ) -> Result<Vec<Self::Hidden>>;
    /// Several tokens per sequence (a copied draft's k+1 positions) through layers `[0, N)`:
    /// per sequence, the layer-N states of its tokens, one row each.
    fn lower_many(
        &self,
        tokens: &[&[&Self::Token]],
        caches: &mut [&mut Self::Cache],
    ) -> Result<Vec<Self::Hidden>>;
    /// Layer-N states through `[N, L)`, the final norm and the LM head: per sequence, logits
    /// `[T, V]` and the final states after the norm.
    fn upper(
        &self,
        states: &[&Self::Hidden],
        caches: &mut [&mut Self::Cache],
    ) -> Result<Vec<(Self::Logits, Self::Hidden)>>;
    /// Layer-N states through the head (filling its cache): per sequence, the draft logits of
    /// the last row `[1, V_d]` and that row's normed head state. `prev`: the base's final
    /// states of the positions before those rows, for a head that reads them (`None`: zeros).
    fn draft(
        &self,
        states: &[&Self::Hidden],
        prev: &[Option<&Self::Hidden>],
        head_caches: &mut [&mut Self::Cache],
    ) -> Result<Vec<(Self::Logits, Self::Hidden)>>;

    /// The prefill's token: argmax, or a draw from the processed distribution.
    fn first_token(&self, logits: &Self::Logits, sampling: &SamplingParams) -> Result<u32>;
    /// A draft token from the head's logits: argmax when greedy, else a draw from the
    /// processed draft distribution, which is returned for the verification.
    fn choose_draft(
        &self,
        logits: &Self::Logits,
        sampling: &SamplingParams,
        want_confidence: bool,
    ) -> Result<Drafted<Self>>;
    /// The distribution that proposes `token` with certainty: the `q` of a draft that was
    /// copied, not sampled (sampling only), which rejection sampling needs to stay lossless.
    fn point_mass(&self, token: &Self::Token) -> Self::Probs;
    /// The verdict on `drafts` from the base's logits over their k+1 positions (greedy
    /// matching or rejection sampling against `q`, see [`crate::verify`]).
    fn judge(
        &self,
        logits: &Self::Logits,
        drafts: &[Self::Token],
        q: &[Self::Probs],
        sampling: &SamplingParams,
    ) -> Result<Verdict>;

    /// Waits for queued device work (before a clock is read).
    fn synchronize(&self) {}
    /// Settings a decode loop runs under until the guard drops (see the native backend).
    fn decode_threads(&self) -> DecodeGuard {
        DecodeGuard::none()
    }
}

/// Undoes what a backend set for a decode loop when dropped.
pub struct DecodeGuard(Option<Box<dyn FnOnce()>>);

impl DecodeGuard {
    pub fn none() -> Self {
        DecodeGuard(None)
    }

    pub fn restoring(undo: impl FnOnce() + 'static) -> Self {
        DecodeGuard(Some(Box::new(undo)))
    }
}

impl Drop for DecodeGuard {
    fn drop(&mut self) {
        if let Some(undo) = self.0.take() {
            undo();
        }
    }
}
