//! A persistent thread pool for decode: every parallel region runs the same closure
//! on all threads (`tid` 0 is the caller), with a spinning barrier inside.
//!
//! Why not rayon: a decode token is ~10 parallel regions per layer, each a few
//! microseconds of work; rayon's work-stealing `join` costs wake-ups and task
//! allocation per region, and cannot give a barrier inside one region (the fused MoE
//! step needs two). Workers here spin briefly on an epoch counter (regions come
//! back-to-back during decode) and then sleep on a condvar, so an idle pool costs no CPU.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What a region's closure sees.
pub struct Ctx<'a> {
    pub tid: usize,
    pub nth: usize,
    barrier: Option<&'a SpinBarrier>,
}

impl Ctx<'_> {
    /// Wait until every thread of this region gets here.
    pub fn barrier(&self) {
        if let Some(b) = self.barrier {
            b.wait(self.nth);
        }
    }
    /// This thread's share `[start, end)` of `n` items, in multiples of `align`.
    pub fn split(&self, n: usize, align: usize) -> (usize, usize) {
        split(n, self.tid, self.nth, align)
    }
}

/// Even split of `n` items among `nth` threads, boundaries multiples of `align`.
pub fn split(n: usize, tid: usize, nth: usize, align: usize) -> (usize, usize) {
    let units = n.div_ceil(align);
    let per = units / nth;
    let extra = units % nth;
    let s = tid * per + tid.min(extra);
    let e = s + per + usize::from(tid < extra);
    ((s * align).min(n), (e * align).min(n))
}

struct SpinBarrier {
    count: AtomicUsize,
    generation: AtomicUsize,
}

impl SpinBarrier {
    fn wait(&self, nth: usize) {
        let gen = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == nth {
            self.count.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
        } else {
            spin_until(|| self.generation.load(Ordering::Acquire) != gen);
        }
    }
}

/// Spin, then yield: on a machine shared with other processes a descheduled peer
/// must get the core back.
fn spin_until(mut done: impl FnMut() -> bool) {
    let mut i = 0u32;
    while !done() {
        if i < 2000 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
        i = i.saturating_add(1);
    }
}

type Job = dyn Fn(&Ctx) + Sync;

struct Shared {
    /// The current region's closure; valid while `remaining > 0`.
    job: UnsafeCell<Option<&'static Job>>,
    epoch: AtomicUsize,
    remaining: AtomicUsize,
    barrier: SpinBarrier,
    sleep: Mutex<()>,
    wake: Condvar,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
}

// SAFETY: `job` is written only by the region owner while no worker reads it (between
// regions), and read by workers only after observing the new epoch (Acquire).
unsafe impl Sync for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    nth: usize,
    /// Serializes regions from different caller threads.
    region: Mutex<()>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

thread_local! {
    static IN_REGION: Cell<bool> = const { Cell::new(false) };
}

/// How long a worker spins for the next region before sleeping.
const SPIN: Duration = Duration::from_micros(200);

impl Pool {
    /// A pool of `nth` threads in all (the caller is one of them).
    pub fn new(nth: usize) -> Pool {
        let nth = nth.max(1);
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            epoch: AtomicUsize::new(0),
            remaining: AtomicUsize::new(0),
            barrier: SpinBarrier {
                count: AtomicUsize::new(0),
                generation: AtomicUsize::new(0),
            },
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
        });
        let handles = (1..nth)
            .map(|tid| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("rooftop-{tid}"))
                    .spawn(move || worker(s, tid, nth))
                    .expect("spawn pool thread")
            })
            .collect();
        Pool {
            shared,
            nth,
            region: Mutex::new(()),
            handles,
        }
    }

    /// The process-wide pool: `ROOFTOP_THREADS` or all available cores.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(default_threads()))
    }

    pub fn threads(&self) -> usize {
        self.nth
    }

    /// Run `f` on every thread and return when all are done. Called from inside a
    /// region (nested), it runs `f` once on the calling thread with `nth = 1`.
    pub fn run(&self, f: &(dyn Fn(&Ctx) + Sync)) {
        if self.nth == 1 || IN_REGION.with(|c| c.get()) {
            f(&Ctx {
                tid: 0,
                nth: 1,
                barrier: None,
            });
            return;
        }
        let _guard = self.region.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the reference outlives the region: we wait for `remaining == 0`
        // below before returning, and workers drop it before decrementing.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<&(dyn Fn(&Ctx) + Sync), &'static Job>(
                f,
            ));
        }
        s.remaining.store(self.nth - 1, Ordering::Relaxed);
        // SeqCst pairs with the worker's `sleepers` increment (store→load on both sides).
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        IN_REGION.with(|c| c.set(true));
        let ctx = Ctx {
            tid: 0,
            nth: self.nth,
            barrier: Some(&s.barrier),
        };
        // A panic in `f` must not leave workers holding a dangling closure.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&ctx)));
        IN_REGION.with(|c| c.set(false));
        spin_until(|| s.remaining.load(Ordering::Acquire) == 0);
        unsafe {
            *s.job.get() = None;
        }
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::Release);
        {
            let _l = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(s: Arc<Shared>, tid: usize, nth: usize) {
    IN_REGION.with(|c| c.set(true));
    let mut seen = 0usize;
    loop {
        let t0 = Instant::now();
        let mut i = 0u32;
        loop {
            if s.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            i += 1;
            if i.is_multiple_of(64) && t0.elapsed() > SPIN {
                let mut l = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen {
                    l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::AcqRel);
                break;
            }
            std::hint::spin_loop();
        }
        seen = s.epoch.load(Ordering::Acquire);
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: see `Shared`; the owner keeps the closure alive until we decrement.
        let job = unsafe { (*s.job.get()).expect("job set before epoch") };
        let ctx = Ctx {
            tid,
            nth,
            barrier: Some(&s.barrier),
        };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&ctx)));
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}

fn default_threads() -> usize {
    std::env::var("ROOFTOP_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_and_barrier_orders_phases() {
        let pool = Pool::new(3);
        let hits = AtomicUsize::new(0);
        let after = AtomicUsize::new(0);
        for _ in 0..200 {
            hits.store(0, Ordering::SeqCst);
            after.store(0, Ordering::SeqCst);
            pool.run(&|c: &Ctx| {
                hits.fetch_add(1, Ordering::SeqCst);
                c.barrier();
                // Every thread saw all increments before the barrier.
                assert_eq!(hits.load(Ordering::SeqCst), 3);
                after.fetch_add(1, Ordering::SeqCst);
            });
            assert_eq!(after.load(Ordering::SeqCst), 3);
        }
    }

    #[test]
    fn split_covers_everything_once() {
        for n in [0, 1, 7, 64, 100, 1000] {
            for nth in 1..5 {
                let mut next = 0;
                for t in 0..nth {
                    let (s, e) = split(n, t, nth, 8);
                    assert_eq!(s, next);
                    next = e;
                }
                assert_eq!(next, n);
            }
        }
    }
}
