//! The scheduler: one thread owns the engine and runs continuous batching. Each iteration
//! admits waiting requests into free batch slots, prefills one part of the first new prompt
//! (so a long prompt does not stall the running streams for its whole prefill), then advances
//! every running sequence by one round in one pass of the weights ([`Engine::step`]), and
//! hands each request the tokens its round committed. A request whose receiver is gone (the
//! client disconnected, or a stop string ended it) is dropped between rounds, which frees its
//! caches.
//!
//! A sequence's greedy text does not depend on its neighbours: the engine's rows get the same
//! bits alone or batched, and every sequence keeps its own controller state.

use super::metrics::Metrics;
use crate::controller::Controller;
use crate::engine::{
    Backend, DraftSources, Engine, GenerateOptions, Prefilling, Sequence, StopReason,
};
use crate::stats::DecodeStats;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// One admitted-or-waiting request, as the HTTP side hands it over.
pub struct Job {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    /// The request's own controller, built when the request was checked (its Thompson draws
    /// seeded by the request's `seed`; sampled tokens use the shared generator).
    pub controller: Box<dyn Controller>,
    pub sources: DraftSources,
    pub events: UnboundedSender<Event>,
    /// Set by the HTTP side when the answer is over early (a stop string, or the client went
    /// away): the sequence leaves the batch after its current round.
    pub cancel: Arc<AtomicBool>,
    /// When the request arrived (time to first token counts from here).
    pub arrived: Instant,
}

/// What the scheduler tells a request, in order: tokens as rounds commit them, then one
/// `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// The ids one round committed (the prefill's token first, alone).
    Tokens(Vec<u32>),
    /// The sequence ended (`stop`), or was cancelled (`None`); its statistics either way.
    Done {
        stop: Option<StopReason>,
        stats: Box<DecodeStats>,
    },
    Failed(String),
}

/// The batch limit, and what requests' controllers are built from (on the HTTP side).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch: usize,
    pub max_draft: usize,
    pub has_head: bool,
    /// The head's held-out agreement (the Thompson prior's warm start).
    pub agreement: Option<f64>,
}

/// Counters the HTTP side reads to refuse work early.
#[derive(Default)]
pub struct Shared {
    /// Requests sent to the scheduler and not yet admitted.
    pub waiting: AtomicUsize,
}

struct Running<'c, B: Backend> {
    seq: Sequence<'c, B>,
    /// Ids already sent to the request.
    sent: usize,
    events: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    last_token: Instant,
}

/// Prompt rows prefilled between two rounds while sequences are running: a long prompt joins
/// in parts of about this many rows, so the running streams wait one part's time (a few
/// tenths of a second on 2 cores) per round, not the whole prompt's.
pub const PREFILL_ROWS_PER_ROUND: usize = 128;

/// A request whose prompt is going in.
struct Joining<'c, B: Backend> {
    prefill: Prefilling<'c, B>,
    events: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    arrived: Instant,
    prompt_tokens: usize,
}

/// Runs until every sender of `jobs` is gone and the last sequence has finished.
pub fn run<B: Backend>(
    engine: &mut Engine<B>,
    limits: Limits,
    jobs: mpsc::Receiver<Job>,
    shared: &Shared,
    metrics: &Metrics,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut joining: VecDeque<Joining<'static, B>> = VecDeque::new();
    let mut running: Vec<Running<'static, B>> = Vec::new();
    let mut open = true;
    while open || !waiting.is_empty() || !joining.is_empty() || !running.is_empty() {
        let idle = running.is_empty() && joining.is_empty();
        if open && idle && waiting.is_empty() {
            match jobs.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => open = false,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(j) => waiting.push_back(j),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        while running.len() + joining.len() < limits.max_batch.max(1) {
            let Some(job) = waiting.pop_front() else {
                break;
            };
            shared.waiting.fetch_sub(1, Ordering::SeqCst);
            metrics.queue_depth.dec();
            if let Some(j) = admit(engine, job, metrics) {
                joining.push_back(j);
            }
        }
        // One part of the first joining prompt (all of it when nothing else runs), then one
        // round of everything running.
        if let Some(j) = joining.front_mut() {
            let rows = if running.is_empty() {
                usize::MAX
            } else {
                PREFILL_ROWS_PER_ROUND
            };
            let gone = j.events.is_closed() || j.cancel.load(Ordering::SeqCst);
            let step = if gone {
                Ok(None)
            } else {
                engine.prefill_some(&mut j.prefill, rows).map(Some)
            };
            match step {
                Ok(Some(false)) => {}
                Ok(Some(true)) => {
                    let j = joining.pop_front().expect("the front is there");
                    if let Some(r) = join(engine, j, metrics) {
                        running.push(r);
                    }
                }
                Ok(None) => {
                    metrics.cancelled.inc();
                    joining.pop_front();
                }
                Err(e) => {
                    let j = joining.pop_front().expect("the front is there");
                    let _ = j.events.send(Event::Failed(e.to_string()));
                }
            }
        }
        if running.is_empty() {
            continue;
        }
        let stepped = {
            let _threads = engine.backend.decode_threads();
            let mut seqs: Vec<&mut Sequence<B>> = running.iter_mut().map(|r| &mut r.seq).collect();
            engine.step(&mut seqs)
        };
        if let Err(e) = stepped {
            for r in running.drain(..) {
                metrics.running.dec();
                let _ = r
                    .events
                    .send(Event::Failed(format!("decoding failed: {e}")));
            }
            continue;
        }
        running.retain_mut(|r| deliver(r, metrics));
    }
    metrics.running.set(0);
}

/// Sets up a request's prefill; `None` when it is already over
/// (nothing to generate, an error, or nobody listening any more).
fn admit<B: Backend>(
    engine: &mut Engine<B>,
    job: Job,
    metrics: &Metrics,
) -> Option<Joining<'static, B>> {
    metrics
        .queue_wait
        .observe(job.arrived.elapsed().as_secs_f64());
    if job.events.is_closed() || job.cancel.load(Ordering::SeqCst) {
        metrics.cancelled.inc();
        return None;
    }
    match engine.begin(&job.prompt, &job.opts, job.controller, job.sources) {
        Ok(Some(prefill)) => Some(Joining {
            prefill,
            events: job.events,
            cancel: job.cancel,
            arrived: job.arrived,
            prompt_tokens: job.prompt.len(),
        }),
        Ok(None) => {
            let _ = job.events.send(Event::Done {
                stop: Some(StopReason::MaxNewTokens),
                stats: Box::default(),
            });
            None
        }
        Err(e) => {
            let _ = job.events.send(Event::Failed(e.to_string()));
            None
        }
    }
}

/// A prefilled request joins the running batch with its first token sent.
fn join<B: Backend>(
    engine: &Engine<B>,
    j: Joining<'static, B>,
    metrics: &Metrics,
) -> Option<Running<'static, B>> {
    let seq = match engine.finish_prefill(j.prefill) {
        Ok(seq) => seq,
        Err(e) => {
            let _ = j.events.send(Event::Failed(e.to_string()));
            return None;
        }
    };
    metrics.prompt_tokens.inc_by(j.prompt_tokens as u64);
    metrics
        .time_to_first_token
        .observe(j.arrived.elapsed().as_secs_f64());
    let mut r = Running {
        seq,
        sent: 0,
        events: j.events,
        cancel: j.cancel,
        last_token: Instant::now(),
    };
    metrics.running.inc();
    deliver(&mut r, metrics).then_some(r)
}

/// Sends the sequence's new tokens, and its end once it has stopped; false when it leaves the
/// batch (stopped, or its request went away: cancelled, its caches dropped with it).
fn deliver<B: Backend>(r: &mut Running<'_, B>, metrics: &Metrics) -> bool {
    let ids = r.seq.ids();
    if ids.len() > r.sent {
        let new = ids[r.sent..].to_vec();
        let now = Instant::now();
        if r.sent > 0 {
            // A round's tokens arrive together; each is priced at its share of the round.
            let per = now.duration_since(r.last_token).as_secs_f64() / new.len() as f64;
            for _ in &new {
                metrics.inter_token_latency.observe(per);
            }
        }
        r.last_token = now;
        r.sent = ids.len();
        metrics.generation_tokens.inc_by(new.len() as u64);
        if r.events.send(Event::Tokens(new)).is_err() {
            metrics
                .cancelled
                .inc_by(u64::from(r.seq.stopped().is_none()));
            metrics.running.dec();
            return false;
        }
    }
    let stop = r.seq.stopped();
    if r.events.is_closed() {
        metrics.cancelled.inc_by(u64::from(stop.is_none()));
        metrics.running.dec();
        return false;
    }
    let cancelled = r.cancel.load(Ordering::SeqCst);
    if stop.is_none() && !cancelled {
        return true;
    }
    metrics.cancelled.inc_by(u64::from(stop.is_none()));
    let stats = Box::new(r.seq.stats_so_far());
    metrics.record_sequence(&stats);
    // The gauge is right before the request ends (a client reading /metrics next sees it).
    metrics.running.dec();
    let _ = r.events.send(Event::Done { stop, stats });
    false
}
