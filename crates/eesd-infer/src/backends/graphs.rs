//! CUDA graphs of the engine's decode units on the torch path (issue 9).
//!
//! Each unit (a token through `[0, N)`, the head's draft step, the verify-width pass through
//! `[N, L)`) runs on a static-shape cache at a device-side offset, so one recording serves
//! every later step of that shape: the first call of a shape runs eagerly (warm-up: cuBLAS
//! handles, allocator), the second records the unit and replays it, and every later call
//! refills the recorded inputs in place and replays. Graphs are keyed by the input's shape
//! and the cache's pool id: a graph writes the very buffers it was recorded with, so only
//! caches from an engine's pool ([`eesd_core::cache::KvCache::pool_id`]) are graphed, and
//! the pool outlives them. Replays compute what the eager calls compute, with the same
//! kernels at the same shapes; the device tests check it bitwise.

use eesd_core::cuda_graph::{self, CudaGraph};
use eesd_core::Result;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// The graphed units of a decode round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// One token embedded and run through `[0, N)`.
    Lower,
    /// The verify-width pass through `[N, L)`, final norm and LM head.
    Upper,
    /// Layer-N states through the head: draft logits of the last row.
    Head,
}

struct Captured {
    graph: CudaGraph,
    input: Tensor,
    offset: Tensor,
    output: Tensor,
}

enum Entry {
    /// Ran once eagerly; recorded at the next call.
    Warm,
    Ready(Captured),
}

type Key = (Unit, Vec<i64>, u64);

/// The engine's graphs, one per unit and shape.
pub struct Graphs {
    enabled: bool,
    device: Device,
    entries: RefCell<HashMap<Key, Entry>>,
    /// Replays so far (for tests and reports).
    replays: Cell<u64>,
}

impl Graphs {
    /// Graphs on `device` if `want` and graphs can be captured there; else every call runs
    /// eagerly.
    pub fn new(device: Device, want: bool) -> Self {
        Graphs {
            enabled: want && cuda_graph::available(device),
            device,
            entries: RefCell::new(HashMap::new()),
            replays: Cell::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn replays(&self) -> u64 {
        self.replays.get()
    }

    /// Drops every recording (their private memory with them).
    pub fn clear(&self) {
        self.entries.borrow_mut().clear();
    }

    /// `f(input, offset_dev)` for `input` at host offset `offset`, eagerly or through the
    /// unit's graph. `f` must take everything it reads from device tensors (its arguments,
    /// weights, the pooled cache) and return a fresh tensor; the caller sets the cache
    /// lengths afterwards, as a replay does not run `f`. The result is a copy, valid after
    /// later replays.
    pub fn run(
        &self,
        unit: Unit,
        pool_id: Option<u64>,
        input: &Tensor,
        offset: i64,
        f: impl FnOnce(&Tensor, &Tensor) -> Tensor,
    ) -> Result<Tensor> {
        let eager_offset = || Tensor::from_slice(&[offset]).to_device(input.device());
        let pool = match pool_id {
            Some(p) if self.enabled => p,
            _ => return Ok(f(input, &eager_offset())),
        };
        let key: Key = (unit, input.size(), pool);
        let ready = self
            .entries
            .borrow()
            .get(&key)
            .map(|e| matches!(e, Entry::Ready(_)));
        match ready {
            None => {
                self.entries.borrow_mut().insert(key, Entry::Warm);
                Ok(f(input, &eager_offset()))
            }
            Some(false) => {
                let input_buf = input.copy();
                let offset_buf = Tensor::full([1], offset, (Kind::Int64, self.device));
                let (graph, output) =
                    CudaGraph::capture(self.device, || f(&input_buf, &offset_buf))?;
                graph.replay()?;
                self.replays.set(self.replays.get() + 1);
                let result = output.copy();
                self.entries.borrow_mut().insert(
                    key,
                    Entry::Ready(Captured {
                        graph,
                        input: input_buf,
                        offset: offset_buf,
                        output,
                    }),
                );
                Ok(result)
            }
            Some(true) => {
                let entries = self.entries.borrow();
                let Some(Entry::Ready(c)) = entries.get(&key) else {
                    unreachable!("checked above")
                };
                c.input.shallow_clone().copy_(input);
                let _ = c.offset.shallow_clone().fill_(offset);
                c.graph.replay()?;
                self.replays.set(self.replays.get() + 1);
                Ok(c.output.copy())
            }
        }
    }
}
