//! Streaming-read bandwidth: the decode roofline's denominator, measured on this
//! machine in the same run as the benchmark it judges (the machine is shared).

use crate::pool::Pool;
use std::time::Instant;

/// Result of [`measure`].
#[derive(Clone, Copy, Debug)]
pub struct Bandwidth {
    /// GB/s (10⁹ bytes) read by one thread.
    pub one_thread: f64,
    /// GB/s read by all of the pool's threads together.
    pub all_threads: f64,
    pub threads: usize,
}

/// Read a `bytes`-sized buffer (much larger than the caches) `reps` times with 1 and
/// with all threads; best of the repetitions.
pub fn measure(pool: &Pool, bytes: usize, reps: usize) -> Bandwidth {
    let words = bytes / 8;
    let buf = vec![0u64; words];
    // Touch every page (and make the contents non-trivial) before timing.
    let chunk = 1 << 17; // 1 MiB of u64 per item
    let items = words.div_ceil(chunk);
    let p = crate::gemv::SyncPtr(buf.as_ptr() as *mut f32);
    pool.run(items, &|it| {
        let p = { p }.0 as *mut u64;
        for i in it * chunk..((it + 1) * chunk).min(words) {
            // SAFETY: disjoint ranges per item.
            unsafe { *p.add(i) = i as u64 };
        }
    });
    let one = best(reps, || {
        std::hint::black_box(read_sum(&buf));
        bytes
    });
    let all = best(reps, || {
        pool.run(items, &|it| {
            std::hint::black_box(read_sum(&buf[it * chunk..((it + 1) * chunk).min(words)]));
        });
        bytes
    });
    Bandwidth {
        one_thread: one,
        all_threads: all,
        threads: pool.threads(),
    }
}

fn best(reps: usize, mut f: impl FnMut() -> usize) -> f64 {
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let b = f();
        best = best.max(b as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Sum of all words with 8 independent accumulators: the loads, not the adds, limit it.
fn read_sum(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in v.chunks_exact(8) {
        for k in 0..8 {
            acc[k] = acc[k].wrapping_add(c[k]);
        }
    }
    acc.iter().fold(0, |a, b| a.wrapping_add(*b))
}
