//! Drafts copied from the text so far (issue 21): the prompt and the tokens generated after it.
//!
//! Users ask models to edit, reformat, translate or quote text they give, and the answers copy
//! long runs of it. When the last few tokens occurred before, the tokens that followed them
//! then are a cheap and often right guess of what follows now; the base verifies them like any
//! draft, so the output stays exactly that of plain decoding (prompt lookup decoding, Saxena
//! 2023; llama.cpp's n-gram drafts; vLLM's `ngram`).
//!
//! [`Lookup`] keeps, for every n-gram of 1 to [`MAX_NGRAM`] tokens, where it last ended
//! (O([`MAX_NGRAM`]) per token); [`Lookup::propose`] takes the longest suffix of the text that
//! occurred before and proposes what followed its latest occurrence. [`LookupPolicy`] decides
//! each round how many of those tokens to verify: Thompson sampling over one Beta posterior of
//! per-token acceptance for each match length, priced by the measured verify costs.

use crate::controller::{best_k, BetaPosterior, Costs};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashMap;

/// The longest suffix looked up. Longer matches are rarer and barely more reliable.
pub const MAX_NGRAM: usize = 4;

/// Where each n-gram of the text last ended, and the text.
pub struct Lookup {
    tokens: Vec<u32>,
    /// (n, the n tokens left-aligned, zero-padded) -> index of the n-gram's last token. Holds
    /// the n-grams ending before the last token only, so a lookup of the text's own suffix
    /// finds an earlier occurrence, never itself.
    last_end: HashMap<(u8, [u32; MAX_NGRAM]), usize>,
}

/// Tokens that followed an earlier occurrence of the text's suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub tokens: Vec<u32>,
    /// Length of the suffix that matched (1 to [`MAX_NGRAM`]).
    pub ngram: usize,
}

impl Lookup {
    /// The index of `text` (a prompt).
    pub fn new(text: &[u32]) -> Self {
        let mut l = Lookup {
            tokens: Vec::with_capacity(text.len() + 256),
            last_end: HashMap::with_capacity(text.len() * MAX_NGRAM),
        };
        for &t in text {
            l.push(t);
        }
        l
    }

    /// Tokens of the text so far.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Appends a token; the n-grams that ended at the previous token become findable.
    pub fn push(&mut self, token: u32) {
        if let Some(end) = self.tokens.len().checked_sub(1) {
            for n in 1..=MAX_NGRAM.min(end + 1) {
                let key = self.key(end + 1 - n, n);
                self.last_end.insert(key, end);
            }
        }
        self.tokens.push(token);
    }

    fn key(&self, start: usize, n: usize) -> (u8, [u32; MAX_NGRAM]) {
        let mut k = [0u32; MAX_NGRAM];
        k[..n].copy_from_slice(&self.tokens[start..start + n]);
        (n as u8, k)
    }

    /// Up to `max` tokens that followed the latest earlier occurrence of the longest suffix of
    /// the text (at least `min_ngram` tokens long) that occurred before.
    pub fn propose(&self, max: usize, min_ngram: usize) -> Option<Proposal> {
        let len = self.tokens.len();
        if max == 0 || len == 0 {
            return None;
        }
        for n in (min_ngram.max(1)..=MAX_NGRAM.min(len)).rev() {
            if let Some(&end) = self.last_end.get(&self.key(len - n, n)) {
                // end < len - 1, so at least one token follows the occurrence.
                let from = end + 1;
                let to = (from + max).min(len);
                return Some(Proposal {
                    tokens: self.tokens[from..to].to_vec(),
                    ngram: n,
                });
            }
        }
        None
    }
}

/// How long a lookup draft to verify each round: Thompson sampling over per-token acceptance,
/// one Beta posterior per match length (a 4-token match is more often right than a 1-token
/// one), each round's length the one with the most expected tokens per unit of measured
/// verify cost (copied drafts cost no draft steps).
pub struct LookupPolicy {
    posteriors: Vec<BetaPosterior>,
    rng: StdRng,
    /// Shortest match worth a draft.
    pub min_ngram: usize,
}

impl LookupPolicy {
    pub fn new(seed: u64) -> Self {
        LookupPolicy {
            // Optimistic at first (a copied run is usually right), and forgetting slowly: the
            // answer moves in and out of copied passages.
            posteriors: (0..MAX_NGRAM)
                .map(|_| BetaPosterior::new((2.0, 1.0), 0.98))
                .collect(),
            rng: StdRng::seed_from_u64(seed ^ 0x6c6f_6f6b),
            min_ngram: 2,
        }
    }

    /// The draft for this round: the first k tokens of `lookup`'s proposal, k chosen for its
    /// match length, or `None` (no match, or no length pays).
    pub fn plan(&mut self, lookup: &Lookup, costs: &Costs, max: usize) -> Option<Proposal> {
        let mut p = lookup.propose(max.min(costs.k_max()), self.min_ngram)?;
        let theta = self.posteriors[p.ngram - 1].sample(&mut self.rng);
        let lookup_costs = Costs {
            draft_step: 0.0,
            verify: costs.verify[..=p.tokens.len().min(costs.k_max())].to_vec(),
        };
        let k = best_k(theta, &lookup_costs, 0);
        if k == 0 {
            // Only the discount applies, so a length given up on is tried again later.
            self.posteriors[p.ngram - 1].update(0, false);
            return None;
        }
        p.tokens.truncate(k);
        Some(p)
    }

    /// A lookup round's outcome: `accepted` of `drafted` tokens proposed from a match of
    /// `ngram` tokens.
    pub fn observe(&mut self, ngram: usize, drafted: usize, accepted: usize) {
        self.posteriors[ngram - 1].update(accepted, accepted < drafted);
    }

    /// The posterior mean of per-token acceptance for each match length (statistics).
    pub fn acceptance(&self) -> Vec<f64> {
        self.posteriors.iter().map(|p| p.mean()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_what_followed_the_latest_longest_match() {
        // "a b c d x ... a b c" -> "d x"; the 3-gram "a b c" beats the 1-gram "c".
        let l = Lookup::new(&[1, 2, 3, 4, 9, 7, 3, 5, 1, 2, 3]);
        let p = l.propose(2, 1).unwrap();
        assert_eq!(
            p,
            Proposal {
                tokens: vec![4, 9],
                ngram: 3
            }
        );
        // Only "3" matches as a 1-gram: its latest earlier occurrence is followed by 5.
        let l = Lookup::new(&[3, 4, 3, 5, 8, 3]);
        assert_eq!(
            l.propose(3, 1).unwrap(),
            Proposal {
                tokens: vec![5, 8, 3],
                ngram: 1
            }
        );
        assert_eq!(
            l.propose(3, 2),
            None,
            "no 2-gram ending in 3 occurred before"
        );
    }

    #[test]
    fn never_matches_the_suffix_itself() {
        let l = Lookup::new(&[1, 2, 3]);
        assert_eq!(l.propose(4, 1), None);
        let mut l = Lookup::new(&[]);
        assert_eq!(l.propose(4, 1), None);
        l.push(7);
        assert_eq!(l.propose(4, 1), None);
        l.push(7);
        assert_eq!(
            l.propose(4, 1).unwrap(),
            Proposal {
                tokens: vec![7],
                ngram: 1
            }
        );
    }

    #[test]
    fn generated_tokens_are_found_as_they_come() {
        let mut l = Lookup::new(&[10, 11, 12, 13]);
        for t in [20, 10, 11] {
            l.push(t);
        }
        assert_eq!(
            l.propose(8, 2).unwrap(),
            Proposal {
                tokens: vec![12, 13, 20, 10, 11],
                ngram: 2
            }
        );
        // A repeat inside the answer: the latest occurrence wins.
        for t in [30, 31, 10, 11] {
            l.push(t);
        }
        assert_eq!(l.propose(2, 2).unwrap().tokens, vec![30, 31]);
    }

    /// The index gives what a brute-force search of the text gives, on random texts.
    #[test]
    fn equals_a_brute_force_search() {
        let mut s = 7u32;
        for _ in 0..200 {
            let len = 1 + (s % 40) as usize;
            let text: Vec<u32> = (0..len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 17;
                    s ^= s << 5;
                    s % 5
                })
                .collect();
            let l = Lookup::new(&text);
            let want = (1..=MAX_NGRAM.min(len)).rev().find_map(|n| {
                let suffix = &text[len - n..];
                (0..len - n)
                    .rev()
                    .find(|&st| &text[st..st + n] == suffix)
                    .map(|st| Proposal {
                        tokens: text[st + n..(st + n + 3).min(len)].to_vec(),
                        ngram: n,
                    })
            });
            assert_eq!(l.propose(3, 1), want, "{text:?}");
        }
    }

    #[test]
    fn the_policy_drafts_long_runs_once_they_pay_and_stops_when_they_fail() {
        let costs = Costs::linear(0.1, 0.05, 8);
        let text: Vec<u32> = (0..40).chain(0..4).collect();
        let l = Lookup::new(&text);
        let mut pol = LookupPolicy::new(1);
        for _ in 0..30 {
            let p = pol.plan(&l, &costs, 8).unwrap();
            pol.observe(p.ngram, p.tokens.len(), p.tokens.len());
        }
        assert_eq!(
            pol.plan(&l, &costs, 8).unwrap().tokens.len(),
            8,
            "always accepted"
        );
        // Never accepted: after a few rounds the drafts are short and the waste small (each
        // drafted token costs 5% of a step here and brings nothing).
        let mut pol = LookupPolicy::new(2);
        let mut wasted = 0;
        for round in 0..120 {
            if let Some(p) = pol.plan(&l, &costs, 8) {
                assert!(
                    round < 20 || p.tokens.len() <= 2,
                    "short drafts once they fail"
                );
                wasted += if round >= 60 { p.tokens.len() } else { 0 };
                pol.observe(p.ngram, p.tokens.len(), 0);
            }
        }
        assert!(
            wasted <= 45,
            "{wasted} tokens drafted in the last 60 rounds, none accepted"
        );
    }
}
