//! The speculative engine: a [`Backend`] chosen once, per-sequence state as one
//! [`Sequence`], and [`Engine::step`], which advances a set of sequences by one round each
//! ([`round`]: draft, verify, commit). Plain decoding is the same code with no drafts
//! (controller `off`, or no head), so the two are compared through one path.

pub mod backend;
pub mod calibrate;
pub mod round;
pub mod sequence;

pub use backend::{Backend, Cache, DecodeGuard, Drafted, ModelSpec, Rows};
pub use sequence::{GenerateOptions, Generation, Prefilling, Sequence, StopReason};

use crate::controller::Controller;
use crate::cost::CostTracker;
use eesd_core::Result;
use std::time::Instant;

/// Where a round's drafts may come from (`--draft-sources`): the early-exit head's chain,
/// tokens copied from the prompt and the text so far ([`crate::lookup`]), or both. With both,
/// a round takes the copied tokens when their match and its acceptance posterior say a
/// draft pays, and the head's chain otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftSources {
    pub head: bool,
    pub lookup: bool,
}

impl DraftSources {
    pub const HEAD: DraftSources = DraftSources {
        head: true,
        lookup: false,
    };

    /// `head`, `lookup` or both (`head,lookup` or `head+lookup`, in any order).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        if s.trim().is_empty() {
            return Err("--draft-sources is empty: give head, lookup or head,lookup".into());
        }
        let mut out = DraftSources {
            head: false,
            lookup: false,
        };
        for part in s.split([',', '+']).map(str::trim) {
            match part {
                "head" => out.head = true,
                "lookup" => out.lookup = true,
                _ => {
                    return Err(format!(
                    "unknown draft source `{part}` in `{s}` (head, lookup, or both: head,lookup)"
                ))
                }
            }
        }
        Ok(out)
    }

    /// Whether a round can draft at all: the head source with a head loaded, or the lookup.
    pub fn can_draft(&self, has_head: bool) -> bool {
        (self.head && has_head) || self.lookup
    }

    pub fn name(&self) -> &'static str {
        match (self.head, self.lookup) {
            (true, true) => "head,lookup",
            (false, true) => "lookup",
            _ => "head",
        }
    }
}

/// A backend, the cost model it measured, and the rounds that use both.
pub struct Engine<B: Backend> {
    pub backend: B,
    /// The draft sources every sequence started from now on uses ([`DraftSources::HEAD`]).
    pub sources: DraftSources,
    /// Draft step and verify costs, measured on this machine ([`Engine::calibrate`], then
    /// every timed round).
    pub costs: CostTracker,
    /// Check the cache invariant after every round (on in debug builds and in tests).
    pub check_invariants: bool,
}

/// One sequence of a batch: its prompt, options and controller.
pub struct Request<'p, 'c> {
    pub prompt: &'p [u32],
    pub opts: GenerateOptions,
    pub controller: Box<dyn Controller + 'c>,
}

impl<B: Backend> Engine<B> {
    /// An engine whose rounds draft at most `max_draft` tokens, with an unmeasured cost model.
    pub fn new(backend: B, max_draft: usize) -> Self {
        Engine {
            backend,
            sources: DraftSources::HEAD,
            costs: CostTracker::new(max_draft),
            check_invariants: cfg!(debug_assertions),
        }
    }

    /// Checks a prompt before any work: not empty, inside the vocabulary, room for one token.
    pub fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        let b = &self.backend;
        eesd_core::generate::check_prompt_fits(prompt, b.spec().context, b.spec().vocab)
    }

    /// A sequence with its prompt prefilled (through the head too when it may draft) and its
    /// first token chosen; `None` when no token is asked for.
    pub fn start<'c>(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        controller: Box<dyn Controller + 'c>,
    ) -> Result<Option<Sequence<'c, B>>> {
        self.start_with(prompt, opts, controller, self.sources)
    }

    /// [`Self::start`] with draft sources of its own (a server's request may choose them).
    pub fn start_with<'c>(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        controller: Box<dyn Controller + 'c>,
        sources: DraftSources,
    ) -> Result<Option<Sequence<'c, B>>> {
        let Some(mut p) = self.begin(prompt, opts, controller, sources)? else {
            return Ok(None);
        };
        while !self.prefill_some(&mut p, usize::MAX)? {}
        self.finish_prefill(p).map(Some)
    }

    /// A sequence whose prompt is still to be prefilled, part by part ([`Self::prefill_some`])
    /// so a server can run other sequences' rounds between the parts; `None` when no token is
    /// asked for.
    pub fn begin<'c>(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        controller: Box<dyn Controller + 'c>,
        sources: DraftSources,
    ) -> Result<Option<Prefilling<'c, B>>> {
        self.check_prompt(prompt)?;
        if opts.max_new_tokens == 0 {
            return Ok(None);
        }
        let b = &self.backend;
        let drafting = sources.head && b.spec().has_head && controller.drafts();
        let (cache, head_cache) = b.new_caches(prompt.len(), opts.max_new_tokens, drafting);
        Ok(Some(Prefilling {
            prompt: prompt.to_vec(),
            opts: opts.clone(),
            controller,
            sources,
            cache,
            head_cache,
            done: 0,
            last: None,
            seconds: 0.0,
        }))
    }

    /// Prefills at least `rows` more prompt positions of `p` (whole chunks of the backend's
    /// part size; the rest of the prompt where it takes only whole prompts). True once the
    /// whole prompt is in.
    pub fn prefill_some(&self, p: &mut Prefilling<'_, B>, rows: usize) -> Result<bool> {
        let b = &self.backend;
        let left = p.prompt.len() - p.done;
        let n = match b.prefill_part_rows() {
            Some(part) => left.min(rows.max(1).div_ceil(part).saturating_mul(part)),
            None => left,
        };
        if n > 0 {
            b.synchronize();
            let t0 = Instant::now();
            let before = p.last.as_ref().map(|(_, h)| h);
            let part = &p.prompt[p.done..p.done + n];
            let out = b.prefill_part(part, before, &mut p.cache, p.head_cache.as_mut())?;
            p.last = Some(out);
            p.done += n;
            b.synchronize();
            p.seconds += t0.elapsed().as_secs_f64();
        }
        Ok(p.done == p.prompt.len())
    }

    /// The sequence of a fully prefilled prompt, its first token chosen.
    pub fn finish_prefill<'c>(&self, p: Prefilling<'c, B>) -> Result<Sequence<'c, B>> {
        let b = &self.backend;
        let Some((logits, last_final)) = p.last.filter(|_| p.done == p.prompt.len()) else {
            return Err(eesd_core::Error::Input(
                "the prompt is not prefilled yet".into(),
            ));
        };
        let first = b.first_token(&logits, &p.opts.sampling)?;
        let prompt = &p.prompt;
        let controller_drafts = p.controller.drafts();
        let mut seq = Sequence {
            prompt_len: prompt.len(),
            context_len: b.spec().context,
            opts: p.opts,
            ids: Vec::new(),
            pending: first,
            cache: p.cache,
            head_cache: p.head_cache,
            backlog: Vec::new(),
            prev_final: last_final,
            controller: p.controller,
            stats: crate::stats::DecodeStats {
                prompt_tokens: prompt.len(),
                prefill_seconds: p.seconds,
                ..Default::default()
            },
            stop: None,
            decode_start: Instant::now(),
            lookup: (p.sources.lookup && controller_drafts).then(|| sequence::LookupDrafts {
                index: crate::lookup::Lookup::new(prompt),
                policy: crate::lookup::LookupPolicy::new(prompt.len() as u64),
            }),
        };
        seq.ids.reserve(seq.opts.max_new_tokens);
        seq.push(first);
        Ok(seq)
    }

    /// One round for every sequence of `seqs` that has not stopped, their rows through the
    /// backend together.
    pub fn step(&mut self, seqs: &mut [&mut Sequence<B>]) -> Result<()> {
        let mut running: Vec<&mut Sequence<B>> = seqs
            .iter_mut()
            .filter(|s| s.stop.is_none())
            .map(|s| &mut **s)
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        round::run(self, &mut running)
    }

    /// Generates after `prompt`, with `controller` choosing each round's draft length.
    /// `on_token` sees the generated ids so far after each new one (for streaming).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        controller: &mut dyn Controller,
        mut on_token: impl FnMut(&[u32]),
    ) -> Result<Generation> {
        let Some(mut seq) = self.start(prompt, opts, Box::new(controller))? else {
            return Ok(Generation::empty(prompt.len()));
        };
        let _threads = self.backend.decode_threads();
        on_token(&seq.ids);
        while seq.stop.is_none() {
            let before = seq.ids.len();
            self.step(&mut [&mut seq])?;
            for n in before + 1..=seq.ids.len() {
                on_token(&seq.ids[..n]);
            }
        }
        self.backend.synchronize();
        Ok(seq.finish())
    }

    /// Generates for every request together: each round advances every running sequence, all
    /// their rows in one pass of the weights. A sequence's output equals its output alone.
    pub fn generate_batch(&mut self, requests: Vec<Request<'_, '_>>) -> Result<Vec<Generation>> {
        let mut seqs = Vec::with_capacity(requests.len());
        for r in requests {
            let len = r.prompt.len();
            seqs.push(self.start(r.prompt, &r.opts, r.controller)?.ok_or(len));
        }
        let _threads = self.backend.decode_threads();
        while seqs.iter().flatten().any(|s| s.stop.is_none()) {
            let mut all: Vec<&mut Sequence<B>> = seqs.iter_mut().flatten().collect();
            self.step(&mut all)?;
        }
        self.backend.synchronize();
        Ok(seqs
            .into_iter()
            .map(|s| match s {
                Ok(seq) => seq.finish(),
                Err(prompt_len) => Generation::empty(prompt_len),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests;
