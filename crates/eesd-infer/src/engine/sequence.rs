//! Everything that belongs to one generation: its caches, the head's backlog, the pending
//! token, its controller and its statistics.

use super::backend::{Backend, Cache, Rows};
use crate::controller::Controller;
use crate::stats::DecodeStats;
pub use eesd_core::generate::{GenerateOptions, StopReason};
use std::time::Instant;

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, EOS included when it ended the generation.
    pub ids: Vec<u32>,
    pub stop: StopReason,
    pub stats: DecodeStats,
}

impl Generation {
    /// Nothing generated: zero new tokens were asked for.
    pub fn empty(prompt_tokens: usize) -> Self {
        Generation {
            ids: Vec::new(),
            stop: StopReason::MaxNewTokens,
            stats: DecodeStats {
                prompt_tokens,
                ..Default::default()
            },
        }
    }
}

/// One sequence being decoded.
///
/// Cache invariant (EESD.md section 2): every committed token passes once through `[0, N)`,
/// once through the head and once through `[N, L)`. Between rounds all base layers hold every
/// committed token but the last, `pending` (the next round's first input); the head cache plus
/// `backlog` (layer-N states not yet run through the head, fed to it with the next draft step)
/// hold the same tokens.
pub struct Sequence<'c, B: Backend> {
    pub(super) prompt_len: usize,
    pub(super) context_len: usize,
    pub(super) opts: GenerateOptions,
    pub(super) ids: Vec<u32>,
    pub(super) pending: u32,
    pub(super) cache: B::Cache,
    /// `None` when the controller never drafts (or there is no head).
    pub(super) head_cache: Option<B::Cache>,
    /// Layer-N states not yet through the head, each with the base's final state of the
    /// position before it (for a head that reads final states).
    pub(super) backlog: Vec<(B::Hidden, Option<B::Hidden>)>,
    /// The base's final state of the position before `pending` (the one whose logits chose it).
    pub(super) prev_final: B::Hidden,
    pub(super) controller: Box<dyn Controller + 'c>,
    pub(super) stats: DecodeStats,
    pub(super) stop: Option<StopReason>,
    pub(super) decode_start: Instant,
    /// Copied drafts, when the engine's sources include the lookup.
    pub(super) lookup: Option<LookupDrafts>,
}

/// A sequence before its first token: its prompt going into the caches part by part
/// ([`super::Engine::prefill_some`]).
pub struct Prefilling<'c, B: Backend> {
    pub(super) prompt: Vec<u32>,
    pub(super) opts: GenerateOptions,
    pub(super) controller: Box<dyn Controller + 'c>,
    pub(super) sources: super::DraftSources,
    pub(super) cache: B::Cache,
    pub(super) head_cache: Option<B::Cache>,
    /// Prompt positions in the caches.
    pub(super) done: usize,
    /// The last part's logits and final state (the next part's `before`).
    pub(super) last: Option<(B::Logits, B::Hidden)>,
    /// Prefill time so far.
    pub(super) seconds: f64,
}

impl<B: Backend> Prefilling<'_, B> {
    /// Prompt positions still to prefill.
    pub fn remaining(&self) -> usize {
        self.prompt.len() - self.done
    }
}

/// The text so far, indexed for copied drafts, and how long a copied draft to verify.
pub(super) struct LookupDrafts {
    pub index: crate::lookup::Lookup,
    pub policy: crate::lookup::LookupPolicy,
}

impl<'c, B: Backend> Sequence<'c, B> {
    /// The generated ids so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Why the sequence ended, once it has.
    pub fn stopped(&self) -> Option<StopReason> {
        self.stop
    }

    pub fn stats(&self) -> &DecodeStats {
        &self.stats
    }

    /// The statistics as they stand, for a sequence ended early (cancelled): the decode time
    /// up to now and the tokens so far.
    pub fn stats_so_far(&self) -> DecodeStats {
        let mut s = self.stats.clone();
        if self.stop.is_none() {
            s.decode_seconds = self.decode_start.elapsed().as_secs_f64();
        }
        s.new_tokens = self.ids.len();
        s
    }

    /// Appends a committed token; it ends the sequence at EOS, at the token limit or when the
    /// context is full (like HF's max_length: prompt plus output never exceed it).
    pub(super) fn push(&mut self, token: u32) {
        self.ids.push(token);
        if let Some(l) = self.lookup.as_mut() {
            l.index.push(token);
        }
        self.pending = token;
        self.stop = if self.opts.eos_ids.contains(&token) {
            Some(StopReason::Eos)
        } else if self.ids.len() >= self.opts.max_new_tokens {
            Some(StopReason::MaxNewTokens)
        } else if self.prompt_len + self.ids.len() >= self.context_len {
            Some(StopReason::ContextFull)
        } else {
            None
        };
        if self.stop.is_some() {
            self.stats.decode_seconds = self.decode_start.elapsed().as_secs_f64();
        }
    }

    /// Tokens a round may still add after `pending` (drafts never run past the token limit or
    /// the context).
    pub(super) fn room(&self) -> usize {
        let left = self.opts.max_new_tokens - self.ids.len();
        left.min(self.context_len - self.prompt_len - self.ids.len()) - 1
    }

    /// Checks the cache invariant (in tests and debug builds): `want` committed tokens but the
    /// pending one in every base layer, and in the head cache plus the backlog.
    pub(super) fn check_invariant(&self, want: usize) {
        assert_eq!(
            self.cache.uniform_positions(),
            Some(want),
            "every base layer must hold the committed tokens but the pending one"
        );
        if let Some(hc) = &self.head_cache {
            let backlog: usize = self.backlog.iter().map(|(h, _)| h.rows()).sum();
            assert_eq!(hc.positions() + backlog, want, "head cache + backlog");
        }
    }

    /// The generation, once stopped (its statistics complete).
    pub fn finish(self) -> Generation {
        let mut stats = self.stats;
        stats.new_tokens = self.ids.len();
        Generation {
            stop: self.stop.unwrap_or(StopReason::MaxNewTokens),
            ids: self.ids,
            stats,
        }
    }
}
