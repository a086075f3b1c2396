//! Lab prototype: a "rows in lanes" batch-1 GEMV for MLX affine 4-bit g64 weights with
//! int8 activations, against the library's kernel on the same shapes.
//!
//! The library kernel (gemv/x86.rs) keeps 64 weights of ONE row in a 256-bit vector and
//! pays, per row and 64-weight chunk, an int→float convert, an activation-scale multiply
//! and an FMA, then horizontal sums. Here weights of 8 rows are repacked so that the 8
//! int32 lanes of an accumulator are 8 rows: the activation's 4-byte groups are
//! broadcast, one `vpdpbusd` does 4 weights × 8 rows, and the float work per chunk is
//! shared by the 8 rows (their scales and biases are one vector each). Same bytes moved;
//! ~1.4× fewer vector ops per weight by count. This measures whether that shows.
//!
//! Kept as the lab record: the library's version is `rooftop_cpu::lanes` (packed layout,
//! registry) and `gemv/lanes_x86.rs` (kernels); `examples/gemv_lab` runs both layouts.
//! Compare with `examples/gemv_lab` run right after it (this host's memory speed drifts).
//! `cargo run --release -p rooftop-cpu --example rows_in_lanes [rows cols]`
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::time::Instant;

const R: usize = 8; // rows per block (lanes)

/// Weights repacked for the kernel: block b, chunk c, dword k (0..8): for each of the
/// 8 rows, bytes [4k, 4k+4) of the row's 32-byte chunk c. Scales/biases `[b][c][8]`.
struct Packed {
    cols: usize,
    w: Vec<u8>,
    s: Vec<f32>,
    b: Vec<f32>,
}

fn repack(w: &[u8], s: &[f32], bi: &[f32], rows: usize, cols: usize) -> Packed {
    let (nch, rb) = (cols / 64, cols / 2);
    let mut out = vec![0u8; rows * rb];
    let (mut so, mut bo) = (vec![0f32; rows * nch], vec![0f32; rows * nch]);
    for blk in 0..rows / R {
        for c in 0..nch {
            for k in 0..8 {
                for r in 0..R {
                    let src = (blk * R + r) * rb + c * 32 + 4 * k;
                    let dst = ((blk * nch + c) * 8 + k) * 32 + 4 * r;
                    out[dst..dst + 4].copy_from_slice(&w[src..src + 4]);
                }
            }
            for r in 0..R {
                so[(blk * nch + c) * R + r] = s[(blk * R + r) * nch + c];
                bo[(blk * nch + c) * R + r] = bi[(blk * R + r) * nch + c];
            }
        }
    }
    Packed {
        cols,
        w: out,
        s: so,
        b: bo,
    }
}

/// Activations: per 64-chunk the 32 even elements (int8) then the 32 odd ones; block
/// scales per 32 consecutive elements (dx[2c], dx[2c+1]); exact Σx per 64 (bias term).
struct Acts {
    q: Vec<i8>,
    dx: Vec<f32>,
    gsum: Vec<f32>,
}

fn quantize(x: &[f32]) -> Acts {
    let n = x.len();
    let mut dx = vec![0f32; n / 32];
    for (b, d) in dx.iter_mut().enumerate() {
        let amax = x[b * 32..b * 32 + 32]
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        *d = amax / 127.0;
    }
    let mut q = vec![0i8; n];
    for c in 0..n / 64 {
        for j in 0..32 {
            for (half, e) in [(0, 2 * j), (1, 2 * j + 1)] {
                let i = c * 64 + e;
                let d = dx[i / 32];
                q[c * 64 + half * 32 + j] = if d > 0.0 { (x[i] / d).round() as i8 } else { 0 };
            }
        }
    }
    let gsum = (0..n / 64)
        .map(|c| x[c * 64..c * 64 + 64].iter().sum())
        .collect();
    Acts { q, dx, gsum }
}

/// y = W x for the rows of `p` (scalar reference on the same quantized activations).
fn reference(w: &[u8], s: &[f32], bi: &[f32], cols: usize, a: &Acts, row: usize) -> f32 {
    let nch = cols / 64;
    let mut y = 0f64;
    for c in 0..nch {
        let mut acc = 0f64;
        for j in 0..32 {
            let byte = w[row * cols / 2 + c * 32 + j];
            let (lo, hi) = ((byte & 15) as f64, (byte >> 4) as f64);
            let (e0, e1) = (2 * j, 2 * j + 1);
            acc += lo * a.q[c * 64 + j] as f64 * a.dx[(c * 64 + e0) / 32] as f64;
            acc += hi * a.q[c * 64 + 32 + j] as f64 * a.dx[(c * 64 + e1) / 32] as f64;
        }
        y += s[row * nch + c] as f64 * acc + bi[row * nch + c] as f64 * a.gsum[c] as f64;
    }
    y as f32
}

/// Row blocks [b0, b1) of `p` into y (blocks of 8 rows).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn gemv(p: &Packed, a: &Acts, y: &mut [f32], b0: usize, b1: usize) {
    let nch = p.cols / 64;
    let mask = _mm256_set1_epi8(0x0F);
    let xq = a.q.as_ptr() as *const i32;
    let blk_bytes = nch * 256;
    for blk in b0..b1 {
        let wb = p.w.as_ptr().add(blk * blk_bytes);
        let mut acc = _mm256_setzero_ps();
        for c in 0..nch {
            _mm_prefetch::<_MM_HINT_T0>(wb.add(c * 256 + 4096) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wb.add(c * 256 + 4096 + 64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wb.add(c * 256 + 4096 + 128) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wb.add(c * 256 + 4096 + 192) as *const i8);
            // Four independent accumulators: (first / second block of 32) × (lo / hi).
            let (mut a0l, mut a0h, mut a1l, mut a1h) = (
                _mm256_setzero_si256(),
                _mm256_setzero_si256(),
                _mm256_setzero_si256(),
                _mm256_setzero_si256(),
            );
            let xl = xq.add(c * 16);
            let xh = xq.add(c * 16 + 8);
            for k in 0..8 {
                let v = _mm256_loadu_si256(wb.add(c * 256 + k * 32) as *const __m256i);
                let lo = _mm256_and_si256(v, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                let bl = _mm256_set1_epi32(*xl.add(k));
                let bh = _mm256_set1_epi32(*xh.add(k));
                if k < 4 {
                    a0l = _mm256_dpbusd_epi32(a0l, lo, bl);
                    a0h = _mm256_dpbusd_epi32(a0h, hi, bh);
                } else {
                    a1l = _mm256_dpbusd_epi32(a1l, lo, bl);
                    a1h = _mm256_dpbusd_epi32(a1h, hi, bh);
                }
            }
            let d0 = _mm256_set1_ps(a.dx[2 * c]);
            let d1 = _mm256_set1_ps(a.dx[2 * c + 1]);
            let t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0l, a0h)), d0);
            let t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a1l, a1h)), d1, t);
            let sv = _mm256_loadu_ps(p.s.as_ptr().add((blk * nch + c) * R));
            let bv = _mm256_loadu_ps(p.b.as_ptr().add((blk * nch + c) * R));
            acc = _mm256_fmadd_ps(t, sv, acc);
            acc = _mm256_fmadd_ps(bv, _mm256_set1_ps(a.gsum[c]), acc);
        }
        _mm256_storeu_ps(y.as_mut_ptr().add((blk - b0) * R), acc);
    }
}

fn time_gb_s(bytes: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")) {
            eprintln!("needs AVX-512 VNNI");
            return;
        }
        let args: Vec<usize> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        let (big_rows, cols) = match args[..] {
            [r, c] => (r, c),
            _ => (151936, 2048),
        };
        let mut rng = 0x1234_5678u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for (name, rows, reps) in [("in L2", 256usize, 2000usize), ("DRAM", big_rows, 10)] {
            let nch = cols / 64;
            let w: Vec<u8> = (0..rows * cols / 2).map(|_| next() as u8).collect();
            let s: Vec<f32> = (0..rows * nch)
                .map(|i| 0.01 + (i % 7) as f32 * 1e-3)
                .collect();
            let b: Vec<f32> = (0..rows * nch)
                .map(|i| -0.05 + (i % 5) as f32 * 0.02)
                .collect();
            let x: Vec<f32> = (0..cols)
                .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let a = quantize(&x);
            let p = repack(&w, &s, &b, rows, cols);
            let mut y = vec![0f32; rows];
            // Bytes actually read: codes + f32 scales and biases (the prototype's copy).
            let bytes = rows * cols / 2 + 2 * rows * nch * 4;
            let nb = rows / R;
            // SAFETY (both closures): features checked above; blocks in range.
            let gbs = time_gb_s(bytes, reps, || unsafe { gemv(&p, &a, &mut y, 0, nb) });
            let (ya, yb) = y.split_at_mut(nb / 2 * R);
            // (Two threads spawned per repetition: meaningful from DRAM only.)
            let gbs2 = time_gb_s(bytes, reps.min(10), || {
                std::thread::scope(|sc| {
                    sc.spawn(|| unsafe { gemv(&p, &a, ya, 0, nb / 2) });
                    unsafe { gemv(&p, &a, yb, nb / 2, nb) };
                })
            });
            let mut err = 0f32;
            for row in (0..rows).step_by(rows / 64 + 1) {
                let r = reference(&w, &s, &b, cols, &a, row);
                err = err.max((y[row] - r).abs() / r.abs().max(1e-3));
            }
            let two = if name == "DRAM" {
                format!(", 2 threads {gbs2:5.1} GB/s")
            } else {
                String::new()
            };
            println!(
                "rows-in-lanes affine4g64 {name:6} {rows}x{cols}: 1 thread {gbs:5.1} GB/s{two} (max rel err vs scalar {err:.1e})"
            );
        }
    }
}
