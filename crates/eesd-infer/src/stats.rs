//! Per-generation statistics, with the names scripts depend on (`--json` output).

use serde::Serialize;

/// The middle value of `v` (the upper one of an even count); `v` must not be empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn ratio_f(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Timing and counts of one generation.
///
/// Decode excludes prefill: the first new token comes out of the prefill pass, so
/// `decode_tokens_per_s` = (new_tokens - 1) / decode_seconds, the rate of the steady
/// token-by-token phase (the vLLM / mistral.rs convention).
///
/// Speculative counters follow vLLM / mistral.rs: acceptance rate = accepted / drafted; mean
/// accepted length = tokens committed per round, the base's own token included; position i of
/// `accepted_by_position` = rounds whose i-th draft was accepted / rounds that drafted an i-th.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DecodeStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Generations summed into these stats (1 for one prompt).
    #[serde(skip)]
    pub generations: usize,
    pub rounds: usize,
    pub drafted: usize,
    pub accepted: usize,
    /// Rounds, drafts and accepted drafts copied from the text ([`crate::lookup`]); also
    /// counted in `rounds`, `drafted` and `accepted`.
    pub copied_rounds: usize,
    pub copied_drafted: usize,
    pub copied_accepted: usize,
    #[serde(skip)]
    pub drafted_at: Vec<usize>,
    #[serde(skip)]
    pub accepted_at: Vec<usize>,
}

impl DecodeStats {
    /// Tokens produced after the prefill's: one generation's `new_tokens - 1`; summed over
    /// generations by [`Self::merge`].
    pub fn decode_tokens(&self) -> usize {
        self.new_tokens.saturating_sub(self.generations.max(1))
    }

    /// Prompt tokens per second of prefill (the first token's wait is `prefill_seconds`).
    pub fn prefill_tokens_per_s(&self) -> f64 {
        ratio_f(self.prompt_tokens as f64, self.prefill_seconds)
    }

    /// New tokens per second from the start of prefill to the last token: what a user waits
    /// for the whole answer, prompt included.
    pub fn end_to_end_tokens_per_s(&self) -> f64 {
        ratio_f(
            self.new_tokens as f64,
            self.prefill_seconds + self.decode_seconds,
        )
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_seconds > 0.0 {
            self.decode_tokens() as f64 / self.decode_seconds
        } else {
            0.0
        }
    }

    /// Counts one verification round that proposed `drafted` tokens and accepted `accepted`.
    pub fn record_round(&mut self, drafted: usize, accepted: usize) {
        self.rounds += 1;
        self.drafted += drafted;
        self.accepted += accepted;
        if self.drafted_at.len() < drafted {
            self.drafted_at.resize(drafted, 0);
            self.accepted_at.resize(drafted, 0);
        }
        for i in 0..drafted {
            self.drafted_at[i] += 1;
            self.accepted_at[i] += usize::from(i < accepted);
        }
    }

    /// A round whose drafts were copied from the text (after [`Self::record_round`]).
    pub fn record_copied(&mut self, drafted: usize, accepted: usize) {
        self.copied_rounds += 1;
        self.copied_drafted += drafted;
        self.copied_accepted += accepted;
    }

    /// Adds another generation's counts (for totals over prompts).
    pub fn merge(&mut self, o: &DecodeStats) {
        self.generations += o.generations.max(1);
        self.prompt_tokens += o.prompt_tokens;
        self.new_tokens += o.new_tokens;
        self.prefill_seconds += o.prefill_seconds;
        self.decode_seconds += o.decode_seconds;
        self.rounds += o.rounds;
        self.drafted += o.drafted;
        self.accepted += o.accepted;
        self.copied_rounds += o.copied_rounds;
        self.copied_drafted += o.copied_drafted;
        self.copied_accepted += o.copied_accepted;
        let n = self.drafted_at.len().max(o.drafted_at.len());
        self.drafted_at.resize(n, 0);
        self.accepted_at.resize(n, 0);
        for i in 0..o.drafted_at.len() {
            self.drafted_at[i] += o.drafted_at[i];
            self.accepted_at[i] += o.accepted_at[i];
        }
    }

    pub fn acceptance_rate(&self) -> f64 {
        ratio(self.accepted, self.drafted)
    }

    /// Tokens committed per round: the decode tokens (the prefill's token is not a round's).
    pub fn mean_accepted_length(&self) -> f64 {
        ratio(self.decode_tokens(), self.rounds)
    }

    /// The speedup over plain decoding that the cost model predicts for these rounds:
    /// committed tokens over the modelled cost of every round (k c + v(k), in plain steps;
    /// rounds drafting k tokens are counted from `drafted_at`). Set beside the measured
    /// speedup, it says whether the controller's cost model matches the clock (issue 7).
    pub fn predicted_speedup(&self, costs: &crate::controller::Costs) -> f64 {
        let mut rounds_with = vec![0usize; self.drafted_at.len() + 1]; // rounds drafting exactly k
        let mut at_least_prev = self.rounds;
        for (i, &n) in self.drafted_at.iter().enumerate() {
            rounds_with[i] = at_least_prev - n;
            at_least_prev = n;
        }
        rounds_with[self.drafted_at.len()] = at_least_prev;
        let cost: f64 = rounds_with
            .iter()
            .enumerate()
            .map(|(k, &n)| n as f64 * costs.round(k))
            .sum();
        self.decode_tokens() as f64 / cost.max(1e-12)
    }

    pub fn mean_draft_length(&self) -> f64 {
        ratio(self.drafted, self.rounds)
    }

    pub fn accepted_by_position(&self) -> Vec<f64> {
        self.drafted_at
            .iter()
            .zip(&self.accepted_at)
            .map(|(&d, &a)| ratio(a, d))
            .collect()
    }

    /// The end-of-run summary line (llama.cpp style): prompt, decode rate, acceptance.
    pub fn summary(&self, name: &str) -> String {
        format!(
            "{name}: prompt {} tok in {:.2} s ({:.1} tok/s), {} new tok, decode {:.2} tok/s, end to end {:.2} tok/s | rounds {}, drafted {}, accepted {}, acceptance {:.1}%, mean accepted length {:.2}, mean draft length {:.2}",
            self.prompt_tokens,
            self.prefill_seconds,
            self.prefill_tokens_per_s(),
            self.new_tokens,
            self.decode_tokens_per_s(),
            self.end_to_end_tokens_per_s(),
            self.rounds,
            self.drafted,
            self.accepted,
            100.0 * self.acceptance_rate(),
            self.mean_accepted_length(),
            self.mean_draft_length()
        )
    }

    /// The JSON object of `--json`: the fields plus the derived rates.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("stats serialise");
        v["decode_tokens_per_s"] = self.decode_tokens_per_s().into();
        v["prefill_tokens_per_s"] = self.prefill_tokens_per_s().into();
        v["end_to_end_tokens_per_s"] = self.end_to_end_tokens_per_s().into();
        v["acceptance_rate"] = self.acceptance_rate().into();
        v["mean_accepted_length"] = self.mean_accepted_length().into();
        v["mean_draft_length"] = self.mean_draft_length().into();
        v["accepted_by_position"] = self.accepted_by_position().into();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::Costs;

    /// Rounds drafting 0, 0, 1 and 2 tokens cost 1 + 1 + (c + v1) + (2c + v2) plain steps.
    #[test]
    fn predicted_speedup_prices_each_round_by_its_draft_length() {
        let mut s = DecodeStats::default();
        for (k, a) in [(0, 0), (0, 0), (1, 1), (2, 0)] {
            s.record_round(k, a);
        }
        s.new_tokens = 6; // the prefill's token plus 5 committed in the rounds
        let costs = Costs::linear(0.1, 0.1, 4);
        let want = s.decode_tokens() as f64 / (1.0 + 1.0 + 1.2 + 1.4);
        assert!((s.predicted_speedup(&costs) - want).abs() < 1e-12);
    }
}
