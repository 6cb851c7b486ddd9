//! `eesd-infer serve`: an OpenAI-compatible HTTP server (axum on tokio) over one engine.
//!
//! One scheduler thread owns the model and the engine and runs continuous batching
//! ([`scheduler`]); the HTTP side (tokio's threads) parses and checks each request
//! ([`api`]), tokenizes it, queues it, and turns the ids the scheduler sends back into text
//! ([`text`]), as one JSON response or as server-sent events. The engine is not shared between
//! threads: a request reaches it only through the queue, so the HTTP side never waits on a
//! forward pass and the engine never waits on a client.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (stream or not),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus, [`metrics`]).

pub mod api;
pub mod metrics;
pub mod scheduler;
pub mod text;

use crate::backends::Kernels;
use crate::controller;
use crate::engine::{DraftSources, GenerateOptions, StopReason};
use crate::stats::DecodeStats;
use anyhow::{anyhow, Context};
use api::{ApiError, ApiResult, Endpoint, Parsed, PromptInput};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use eesd_core::head::EarlyExitHead;
use eesd_core::pretrained::Pretrained;
use eesd_core::sampling::SamplingParams;
use eesd_core::tokenizer::{Message, Tokenizer};
use metrics::Metrics;
use scheduler::{Event, Job, Limits, Shared};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// How the server runs (the `serve` flags other than the model's).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub kernels: Kernels,
    /// Most draft tokens per round.
    pub max_draft: usize,
    /// Sequences decoded together; more requests wait in the queue.
    pub max_batch: usize,
    /// Requests waiting for a batch slot before new ones get 429.
    pub max_queue: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// The controller of requests that name none (`None`: thompson when drafts can come
    /// from somewhere, else off, as `generate`).
    pub controller: Option<String>,
    pub sources: DraftSources,
    /// The model id `/v1/models` lists and responses carry.
    pub model_name: String,
    /// Measure draft and verify costs before serving (with a head).
    pub calibrate: bool,
}

/// What the HTTP side knows about the model, sent by the scheduler thread once it is loaded.
struct Loaded {
    tokenizer: Tokenizer,
    context: usize,
    eos_ids: Vec<u32>,
    limits: Limits,
}

/// Everything the handlers share.
pub struct AppState {
    cfg: ServeConfig,
    tokenizer: Tokenizer,
    context: usize,
    eos_ids: Vec<u32>,
    limits: Limits,
    /// The scheduler's queue; `None` once the server stops admitting.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    shared: Arc<Shared>,
    pub metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
}

/// A running scheduler and the state the router serves from.
pub struct Server {
    pub state: Arc<AppState>,
    thread: Option<JoinHandle<()>>,
}

/// Loads the model (and head) on the scheduler thread, measures the cost model, and starts
/// the scheduler; returns once it is ready, or with the load's error.
pub fn start<F>(cfg: ServeConfig, load: F) -> anyhow::Result<Server>
where
    F: FnOnce() -> anyhow::Result<(Pretrained, Option<EarlyExitHead>)> + Send + 'static,
{
    let (ready_tx, ready_rx) = mpsc::sync_channel::<anyhow::Result<Loaded>>(1);
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    let shared = Arc::new(Shared::default());
    let metrics = Arc::new(Metrics::new());
    let (thread_shared, thread_metrics, thread_cfg) =
        (shared.clone(), metrics.clone(), cfg.clone());
    let thread = std::thread::Builder::new()
        .name("eesd-scheduler".into())
        .spawn(move || {
            let ready = ready_tx.clone();
            let run = move || -> anyhow::Result<()> {
                let (p, head) = load()?;
                let tokenizer = Tokenizer::from_dir(&p.dir, &p.model.cfg)?;
                let limits = Limits {
                    max_batch: thread_cfg.max_batch,
                    max_draft: thread_cfg.max_draft,
                    has_head: head.is_some(),
                    agreement: controller::agreement(head.as_ref()),
                };
                let context = p.model.cfg.max_position_embeddings;
                crate::with_engine!(
                    thread_cfg.kernels,
                    &p.model,
                    head.as_ref(),
                    thread_cfg.max_draft,
                    |engine| {
                        if head.is_some() && thread_cfg.calibrate {
                            engine.calibrate(64, 3)?;
                        }
                        let loaded = Loaded {
                            tokenizer,
                            context,
                            eos_ids: p.tokenizer.eos_ids.clone(),
                            limits,
                        };
                        if ready.send(Ok(loaded)).is_err() {
                            return Ok(());
                        }
                        scheduler::run(
                            &mut engine,
                            limits,
                            jobs_rx,
                            &thread_shared,
                            &thread_metrics,
                        );
                    }
                );
                Ok(())
            };
            if let Err(e) = run() {
                let _ = ready_tx.send(Err(e));
            }
        })
        .context("starting the scheduler thread")?;
    let loaded = match ready_rx.recv() {
        Ok(r) => r?,
        Err(_) => {
            let _ = thread.join();
            return Err(anyhow!(
                "the scheduler thread ended before the model loaded"
            ));
        }
    };
    Ok(Server {
        state: Arc::new(AppState {
            cfg,
            tokenizer: loaded.tokenizer,
            context: loaded.context,
            eos_ids: loaded.eos_ids,
            limits: loaded.limits,
            jobs: Mutex::new(Some(jobs_tx)),
            shared,
            metrics,
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
        }),
        thread: Some(thread),
    })
}

impl Server {
    /// The HTTP routes over this server's state.
    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Stops admitting (new requests get 503), lets the scheduler finish what it runs, and
    /// waits for it.
    pub fn stop(mut self) {
        self.state.shutting_down.store(true, Ordering::SeqCst);
        self.state.jobs.lock().expect("jobs lock").take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Serves on `listener` until SIGTERM or Ctrl-C, then stops admitting, lets in-flight
    /// requests finish (each stream ends with its final event) and returns.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        let state = self.state.clone();
        axum::serve(listener, self.router())
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("shutting down: no new requests; finishing the running ones");
                state.shutting_down.store(true, Ordering::SeqCst);
            })
            .await
            .context("serving")?;
        tokio::task::spawn_blocking(move || self.stop())
            .await
            .context("stopping the scheduler")?;
        Ok(())
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The routes. Bodies are read as bytes (up to the limit plus one, so an oversized body is
/// told apart) and parsed by [`api::parse`].
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            ApiError::status(StatusCode::NOT_FOUND, "no such endpoint").into_response()
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.shutting_down.load(Ordering::SeqCst) {
        return ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.cfg.model_name,
            "object": "model",
            "created": unix_now(),
            "owned_by": "eesd",
            "max_model_len": s.context,
        }],
    }))
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    respond(s, Endpoint::Completions, body).await
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    respond(s, Endpoint::Chat, body).await
}

async fn respond(
    s: Arc<AppState>,
    endpoint: Endpoint,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let r = match body {
        Ok(b) => generate(s.clone(), endpoint, &b).await,
        Err(e) => Err(ApiError::invalid(
            None,
            format!(
                "the request body could not be read ({e}); the limit is {} bytes",
                s.cfg.max_body_bytes
            ),
        )),
    };
    let r = r.unwrap_or_else(IntoResponse::into_response);
    let status = r.status().as_u16().to_string();
    s.metrics
        .requests
        .with_label_values(&[endpoint.name(), &status])
        .inc();
    r
}

/// A checked request, ready for the queue.
struct Prepared {
    parsed: Parsed,
    prompt: Vec<u32>,
    opts: GenerateOptions,
    controller_name: String,
    controller: Box<dyn controller::Controller>,
    sources: DraftSources,
}

impl AppState {
    /// Tokenizes the prompt and checks everything that depends on the model or the server's
    /// flags: the context, the controller and the draft sources.
    fn prepare(&self, parsed: Parsed) -> ApiResult<Prepared> {
        let prompt = match &parsed.prompt {
            PromptInput::Text(t) => self.tokenizer.encode(t, true),
            PromptInput::Messages(m) => {
                let msgs: Vec<Message> = m
                    .iter()
                    .map(|m| Message {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect();
                self.tokenizer
                    .apply_chat_template(&msgs)
                    .and_then(|text| self.tokenizer.encode(&text, false))
            }
        }
        .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
        let param = Some(match parsed.prompt {
            PromptInput::Text(_) => "prompt",
            PromptInput::Messages(_) => "messages",
        });
        if prompt.is_empty() {
            return Err(ApiError::invalid(param, "the prompt has no tokens"));
        }
        if prompt.len() >= self.context {
            return Err(ApiError::invalid(
                param,
                format!(
                    "the prompt is {} tokens; the model's context is {} (room for at least one \
                     new token is needed)",
                    prompt.len(),
                    self.context
                ),
            ));
        }
        let room = self.context - prompt.len();
        let max_new_tokens = match parsed.max_tokens {
            None => room,
            Some(m) if m > room => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    format!(
                        "max_tokens {m} with a {}-token prompt is over the model's context of {} \
                         (at most {room})",
                        prompt.len(),
                        self.context
                    ),
                ))
            }
            Some(m) => m,
        };
        let sources = match &parsed.draft_sources {
            None => self.cfg.sources,
            Some(d) => {
                DraftSources::parse(d).map_err(|e| ApiError::invalid(Some("draft_sources"), e))?
            }
        };
        if sources.head && !self.limits.has_head && parsed.draft_sources.is_some() {
            return Err(ApiError::invalid(
                Some("draft_sources"),
                "the server has no early-exit head: draft_sources may only be `lookup`",
            ));
        }
        let can_draft = sources.can_draft(self.limits.has_head);
        let controller = parsed
            .controller
            .clone()
            .or_else(|| self.cfg.controller.clone())
            .unwrap_or_else(|| if can_draft { "thompson" } else { "off" }.into());
        // Built here, once: a bad name is a 400 before the request is queued.
        let built = controller::build(
            &controller,
            can_draft,
            self.limits.agreement,
            self.limits.max_draft,
            parsed.seed.unwrap_or(0),
        )
        .map_err(|e| ApiError::invalid(Some("controller"), e.to_string()))?;
        let sampling = SamplingParams::new(parsed.temperature, 0, parsed.top_p)
            .map_err(|e| ApiError::invalid(Some("temperature"), e.to_string()))?;
        let opts = GenerateOptions {
            max_new_tokens,
            sampling,
            eos_ids: if parsed.ignore_eos {
                vec![]
            } else {
                self.eos_ids.clone()
            },
        };
        Ok(Prepared {
            parsed,
            prompt,
            opts,
            controller_name: controller,
            controller: built,
            sources,
        })
    }

    /// Queues a prepared request: 429 when the queue is full, 503 once stopping.
    fn enqueue(&self, p: &mut Prepared) -> ApiResult<(UnboundedReceiver<Event>, Arc<AtomicBool>)> {
        if self.shared.waiting.load(Ordering::SeqCst) >= self.cfg.max_queue {
            let mut e = ApiError::status(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the queue is full ({} requests waiting for a batch slot); retry later",
                    self.cfg.max_queue
                ),
            );
            e.retry_after = Some(1);
            return Err(e);
        }
        let (tx, rx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            prompt: p.prompt.clone(),
            opts: p.opts.clone(),
            controller: std::mem::replace(&mut p.controller, Box::new(controller::Fixed(0))),
            sources: p.sources,
            events: tx,
            cancel: cancel.clone(),
            arrived: Instant::now(),
        };
        let jobs = self.jobs.lock().expect("jobs lock");
        let unavailable = || {
            let mut e = ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping");
            e.retry_after = Some(5);
            e
        };
        let sender = jobs.as_ref().ok_or_else(unavailable)?;
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        self.metrics.queue_depth.inc();
        if sender.send(job).is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queue_depth.dec();
            return Err(unavailable());
        }
        Ok((rx, cancel))
    }
}

/// Sets a request's cancel flag when dropped: a handler dropped mid-request (its client went
/// away) stops its sequence at the next round.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn generate(s: Arc<AppState>, endpoint: Endpoint, body: &[u8]) -> ApiResult<Response> {
    if s.shutting_down.load(Ordering::SeqCst) {
        let mut e = ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping");
        e.retry_after = Some(5);
        return Err(e);
    }
    let parsed = api::parse(endpoint, body)?;
    let mut p = s.prepare(parsed)?;
    let (rx, cancel) = s.enqueue(&mut p)?;
    let id = format!(
        "{}-{}",
        match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        },
        s.next_id.fetch_add(1, Ordering::SeqCst)
    );
    let reply = Reply {
        id,
        created: unix_now(),
        model: s.cfg.model_name.clone(),
        endpoint,
        prompt_tokens: p.prompt.len(),
        controller: p.controller_name.clone(),
        sources: p.sources,
    };
    if p.parsed.stream {
        Ok(stream(s, p, reply, rx, cancel).into_response())
    } else {
        whole(s, p, reply, rx, cancel).await
    }
}

/// What every response of one request carries.
struct Reply {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    prompt_tokens: usize,
    controller: String,
    sources: DraftSources,
}

/// How a request ended, as the client sees it.
struct Ending {
    finish_reason: &'static str,
    stats: Option<DecodeStats>,
    completion_tokens: usize,
}

impl Reply {
    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    /// Per-response speculation statistics (as llama.cpp's `timings` and SGLang's
    /// `meta_info` report them).
    fn speculation(&self, stats: Option<&DecodeStats>) -> Value {
        let Some(st) = stats else { return Value::Null };
        json!({
            "controller": self.controller,
            "draft_sources": self.sources.name(),
            "rounds": st.rounds,
            "drafted": st.drafted,
            "accepted": st.accepted,
            "acceptance_rate": st.acceptance_rate(),
            "mean_accepted_length": st.mean_accepted_length(),
            "copied_drafted": st.copied_drafted,
            "copied_accepted": st.copied_accepted,
            "prefill_seconds": st.prefill_seconds,
            "decode_seconds": st.decode_seconds,
            "decode_tokens_per_s": st.decode_tokens_per_s(),
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    /// A stream chunk carrying `text` (and the finish reason on the last one).
    fn chunk(&self, text: &str, first: bool, finish: Option<&str>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = "assistant".into();
                }
                if !text.is_empty() || finish.is_none() {
                    delta["content"] = text.into();
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice],
        })
    }

    fn whole(&self, text: &str, end: &Ending) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": end.finish_reason,
            }),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": end.finish_reason,
            }),
        };
        json!({
            "id": self.id, "object": self.object(false), "created": self.created,
            "model": self.model, "choices": [choice],
            "usage": self.usage(end.completion_tokens),
            "speculation": self.speculation(end.stats.as_ref()),
        })
    }
}

fn finish_reason(stop: Option<StopReason>, by_stop_string: bool) -> &'static str {
    match (by_stop_string, stop) {
        (true, _) | (false, Some(StopReason::Eos)) => "stop",
        (false, Some(StopReason::MaxNewTokens | StopReason::ContextFull)) => "length",
        (false, None) => "cancelled",
    }
}

/// What one scheduler event means for the client: text to send, the end, or nothing yet.
enum Step {
    Text(String),
    /// The end, and the text not sent before it.
    End(Ending, String),
}

/// Turns one scheduler event into what the client gets; sets `cancel` when a stop string
/// ends the answer before the sequence does (the scheduler then ends it at the next round
/// and still reports its statistics).
fn on_event(
    s: &AppState,
    text: &mut text::TextStream,
    cancel: &AtomicBool,
    ev: Option<Event>,
) -> ApiResult<Step> {
    match ev {
        None => Err(ApiError::status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the scheduler stopped before the request finished",
        )),
        Some(Event::Tokens(ids)) => {
            let delta = text.push(&s.tokenizer, &ids).map_err(internal)?;
            if text.stopped() {
                cancel.store(true, Ordering::SeqCst);
            }
            Ok(Step::Text(delta))
        }
        Some(Event::Done { stop, stats }) => {
            let delta = text.finish(&s.tokenizer).map_err(internal)?;
            let end = Ending {
                finish_reason: finish_reason(stop, text.stopped()),
                completion_tokens: text.ids().len(),
                stats: Some(*stats),
            };
            Ok(Step::End(end, delta))
        }
        Some(Event::Failed(msg)) => Err(internal(msg)),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn whole(
    s: Arc<AppState>,
    p: Prepared,
    reply: Reply,
    mut rx: UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
) -> ApiResult<Response> {
    let _guard = CancelOnDrop(cancel.clone());
    let mut text = text::TextStream::new(p.parsed.stop.clone());
    let end = loop {
        let ev = rx.recv().await;
        if let Step::End(end, _) = on_event(&s, &mut text, &cancel, ev)? {
            break end;
        }
    };
    Ok(Json(reply.whole(text.text(), &end)).into_response())
}

fn stream(
    s: Arc<AppState>,
    p: Prepared,
    reply: Reply,
    mut rx: UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
) -> impl IntoResponse {
    // The events go through a small channel; when the client goes away the response body
    // (the channel's receiver) is dropped, the next send fails, and dropping this task's
    // receiver cancels the sequence.
    let (tx, out) = tokio::sync::mpsc::channel::<SseEvent>(64);
    let include_usage = p.parsed.include_usage;
    tokio::spawn(async move {
        let _guard = CancelOnDrop(cancel.clone());
        let data = |v: &Value| SseEvent::default().data(v.to_string());
        let mut text = text::TextStream::new(p.parsed.stop.clone());
        let mut first = true;
        let mut last = Vec::new();
        let end = loop {
            let ev = rx.recv().await;
            match on_event(&s, &mut text, &cancel, ev) {
                Ok(Step::Text(delta)) if delta.is_empty() => {}
                Ok(Step::Text(delta)) => {
                    if tx
                        .send(data(&reply.chunk(&delta, first, None)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    first = false;
                }
                Ok(Step::End(end, delta)) => {
                    if !delta.is_empty() {
                        last.push(data(&reply.chunk(&delta, first, None)));
                        first = false;
                    }
                    break Ok(end);
                }
                Err(e) => break Err(e),
            }
        };
        match end {
            Ok(end) => {
                let mut c = reply.chunk("", first, Some(end.finish_reason));
                c["speculation"] = reply.speculation(end.stats.as_ref());
                last.push(data(&c));
                if include_usage {
                    let mut u = reply.chunk("", false, None);
                    u["choices"] = json!([]);
                    u["usage"] = reply.usage(end.completion_tokens);
                    last.push(data(&u));
                }
            }
            Err(e) => last.push(data(&e.body())),
        }
        last.push(SseEvent::default().data("[DONE]"));
        for ev in last {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    let body = futures_util::stream::unfold(out, |mut out| async move {
        out.recv()
            .await
            .map(|ev| (Ok::<_, std::convert::Infallible>(ev), out))
    });
    Sse::new(body).keep_alive(KeepAlive::default())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
