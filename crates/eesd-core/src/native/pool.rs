//! A small persistent thread pool whose workers spin between jobs.
//!
//! Batch-1 decoding of a small model is a chain of a few hundred short parallel regions per
//! token (four weight products and one attention per layer), each 10-100 us long. Waking a
//! sleeping thread costs 5-20 us, so workers spin on an epoch counter between jobs and only
//! park after [`SPIN_BEFORE_PARK`] without work (llama.cpp's CPU backend does the same).
//!
//! The job is a borrowed closure: [`Pool::run`] does not return before every worker has left
//! it, which is what makes handing a non-`'static` reference to other threads sound.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN_BEFORE_PARK: Duration = Duration::from_millis(2);
/// How long any wait spins hard before it starts yielding the core: on a machine with more
/// runnable threads than cores, a thread that only spins keeps the one it waits for off the
/// CPU, and a decode step then takes milliseconds instead of microseconds.
const SPIN_BEFORE_YIELD: Duration = Duration::from_micros(50);

type Job = dyn Fn(usize) + Sync;

/// An output buffer the pool's tasks write disjoint parts of: a raw pointer that may cross
/// threads (each job documents which part each task owns).
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut f32);
// SAFETY: tasks only write the disjoint ranges their job gives them, and `Pool::run` returns
// after every task has finished.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method, so closures capture the wrapper (Send + Sync), not the raw field.
    pub fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer the pointer came from.
        unsafe { self.0.add(i) }
    }
}

struct Shared {
    /// Bumped once per job; workers run the job when they see a new value.
    epoch: AtomicU64,
    /// The current job, as a fat pointer whose lifetime [`Pool::run`] guarantees.
    job: Mutex<Option<&'static Job>>,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// Per worker: parked (or about to park) and needs an unpark.
    sleeping: Vec<AtomicBool>,
    stop: AtomicBool,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One caller at a time: the job slot and counters are per pool.
    busy: Mutex<()>,
}

impl Pool {
    /// A pool of `threads` threads in all: the caller plus `threads - 1` workers.
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            sleeping: (1..threads).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
        });
        let workers = (1..threads)
            .map(|tid| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("eesd-native-{tid}"))
                    .spawn(move || worker(s, tid))
                    .expect("spawn a pool thread")
            })
            .collect();
        Pool {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// Threads that run each job (the caller included).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(tid)` once on every thread, `tid` in `0..threads()` (0 is the caller), and
    /// returns when all have finished.
    pub fn run<'a>(&self, f: &'a (dyn Fn(usize) + Sync + 'a)) {
        if self.workers.is_empty() {
            f(0);
            return;
        }
        let _one_caller = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the reference is only used by workers between the epoch bump below and
        // their decrement of `pending`; we wait for `pending == 0` before returning, and we
        // clear the slot afterwards, so the closure outlives every use.
        let job: &'static Job =
            unsafe { std::mem::transmute::<&'a (dyn Fn(usize) + Sync + 'a), &'static Job>(f) };
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
        self.shared
            .pending
            .store(self.workers.len(), Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for (i, s) in self.shared.sleeping.iter().enumerate() {
            if s.load(Ordering::SeqCst) {
                self.workers[i].thread().unpark();
            }
        }
        f(0);
        let t0 = Instant::now();
        let mut spins = 0u32;
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && t0.elapsed() > SPIN_BEFORE_YIELD {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn worker(s: Arc<Shared>, tid: usize) {
    let mut seen = 0u64;
    loop {
        // Spin for a new epoch, then park.
        let t0 = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen || s.stop.load(Ordering::Relaxed) {
                break e;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            let idle = t0.elapsed();
            if idle > SPIN_BEFORE_PARK {
                s.sleeping[tid - 1].store(true, Ordering::SeqCst);
                if s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                    std::thread::park_timeout(Duration::from_millis(50));
                }
                s.sleeping[tid - 1].store(false, Ordering::SeqCst);
            } else if idle > SPIN_BEFORE_YIELD {
                std::thread::yield_now();
            }
        };
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        seen = epoch;
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            job(tid);
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// The process-wide pool: `EESD_THREADS` threads, else one per available core.
pub fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::env::var("EESD_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        Pool::new(n)
    })
}

/// Splits `0..n` into `parts` contiguous ranges whose starts are multiples of `align`.
pub fn split(n: usize, parts: usize, align: usize, part: usize) -> std::ops::Range<usize> {
    let blocks = n.div_ceil(align);
    let per = blocks.div_ceil(parts.max(1));
    let start = (part * per * align).min(n);
    let end = ((part + 1) * per * align).min(n);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_thread_runs_every_job_once() {
        let pool = Pool::new(3);
        for round in 0..2000 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|tid| {
                hits[tid].fetch_add(round + 1, Ordering::Relaxed);
            });
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), round + 1);
            }
        }
    }

    #[test]
    fn workers_wake_after_parking() {
        let pool = Pool::new(2);
        std::thread::sleep(SPIN_BEFORE_PARK * 3);
        let n = AtomicUsize::new(0);
        pool.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn split_covers_the_range_in_aligned_parts() {
        for n in [0, 1, 7, 8, 9, 960, 49152, 1000] {
            for parts in 1..5 {
                let mut next = 0;
                for p in 0..parts {
                    let r = split(n, parts, 8, p);
                    assert_eq!(r.start, next.min(n));
                    assert!(r.start.is_multiple_of(8) || r.start == n);
                    next = r.end.max(next);
                }
                assert_eq!(next, n);
            }
        }
    }
}
