//! What `GET /metrics` exports (Prometheus text format): requests by endpoint and status,
//! tokens in and out, the queue and the running batch, time to first token, inter-token
//! latency, and the drafted and accepted tokens by draft position, so an operator sees where
//! speculation pays (or stops paying under load) without reading logs.

use crate::stats::DecodeStats;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The server's metrics, shared by the HTTP handlers and the scheduler.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub queue_depth: IntGauge,
    pub running: IntGauge,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub queue_wait: Histogram,
    pub drafted: IntCounterVec,
    pub accepted: IntCounterVec,
    pub rounds: IntCounter,
    pub cancelled: IntCounter,
}

/// Latency buckets (seconds) from a fast decode step to a long prompt's prefill.
const LATENCY_BUCKETS: &[f64] = &[
    0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("metric");
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
                .expect("metric")
        };
        let by = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label]).expect("metric")
        };
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new("eesd_requests_total", "Finished HTTP requests"),
                &["endpoint", "status"],
            )
            .expect("metric"),
            prompt_tokens: counter("eesd_prompt_tokens_total", "Prompt tokens prefilled"),
            generation_tokens: counter("eesd_generation_tokens_total", "Tokens generated"),
            queue_depth: IntGauge::new("eesd_queue_depth", "Requests waiting for a batch slot")
                .expect("metric"),
            running: IntGauge::new("eesd_running_sequences", "Sequences in the running batch")
                .expect("metric"),
            time_to_first_token: histogram(
                "eesd_time_to_first_token_seconds",
                "From arrival to the first generated token (queue wait and prefill included)",
            ),
            inter_token_latency: histogram(
                "eesd_inter_token_latency_seconds",
                "Time between generated tokens of one stream (a round's tokens share its time)",
            ),
            queue_wait: histogram(
                "eesd_queue_wait_seconds",
                "From arrival to admission into the running batch",
            ),
            drafted: by(
                "eesd_drafted_tokens_total",
                "Draft tokens verified, by draft position (1 = first)",
                "position",
            ),
            accepted: by(
                "eesd_accepted_tokens_total",
                "Draft tokens accepted, by draft position (1 = first)",
                "position",
            ),
            rounds: counter(
                "eesd_rounds_total",
                "Decode rounds of finished sequences (one verification each)",
            ),
            cancelled: counter(
                "eesd_cancelled_total",
                "Sequences ended early: a stop string, or the client went away",
            ),
            registry,
        };
        let r = &m.registry;
        let all: [Box<dyn prometheus::core::Collector>; 12] = [
            Box::new(m.requests.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generation_tokens.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.running.clone()),
            Box::new(m.time_to_first_token.clone()),
            Box::new(m.inter_token_latency.clone()),
            Box::new(m.queue_wait.clone()),
            Box::new(m.drafted.clone()),
            Box::new(m.accepted.clone()),
            Box::new(m.rounds.clone()),
            Box::new(m.cancelled.clone()),
        ];
        for c in all {
            r.register(c).expect("unique metric names");
        }
        m
    }

    /// A finished sequence's speculation statistics, by draft position.
    pub fn record_sequence(&self, s: &DecodeStats) {
        self.rounds.inc_by(s.rounds as u64);
        for (i, (&d, &a)) in s.drafted_at.iter().zip(&s.accepted_at).enumerate() {
            let pos = (i + 1).to_string();
            self.drafted.with_label_values(&[&pos]).inc_by(d as u64);
            self.accepted.with_label_values(&[&pos]).inc_by(a as u64);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
