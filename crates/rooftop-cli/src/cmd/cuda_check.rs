//! `rooftop cuda-check`: every CUDA kernel against the CPU reference on fresh random
//! inputs, then benchmarks against the card's measured read bandwidth.

use anyhow::{bail, Result};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rooftop_cuda::reference::{self, MoeRef};
use rooftop_cuda::{
    AttnKernel, AttnShape, CudaDevice, CudaMoe, CudaSlice, CudaWeight, Routing, RoutingKind,
};
use rooftop_quant::{quantize, DType, Float, QuantSpec, QuantizeOptions, Quantized, WeightView};

#[derive(clap::Args)]
#[command(
    about = "Check every CUDA kernel against the CPU reference and benchmark it against the HBM roofline",
    long_about = "Runs each CUDA kernel (GEMV in every weight format and batch 1..8, the fused MoE \
step with Qwen and DeepSeek/GLM routing, RMSNorm, RoPE, KV append, decode attention) on fresh \
random inputs and compares with the CPU reference; then measures the card's streaming read \
bandwidth and benchmarks GEMV and the fused MoE step at qwen3-30b-a3b shapes (CUDA graph, \
event timing, median of many runs). Exits non-zero if any check fails.\n\n\
Example: rooftop cuda-check --device 0"
)]
pub struct Args {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Correctness only, no benchmarks.
    #[arg(long)]
    no_bench: bool,
    /// Benchmarks only, no correctness checks.
    #[arg(long)]
    skip_checks: bool,
    /// Timed repetitions per benchmark (the median is reported).
    #[arg(long, default_value_t = 30)]
    iters: usize,
    /// MoE layers in the benchmark (qwen3-30b-a3b has 48).
    #[arg(long, default_value_t = 48)]
    layers: usize,
    /// Random seed for inputs.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also run whole models on the GPU against mlx-lm: a directory of
    /// `tests/oracle/mlx_lm_model.py` outputs (one subdirectory per architecture).
    #[arg(long)]
    models: Option<std::path::PathBuf>,
    /// Only these kernel check groups (comma list of gemv, moe, ops, int8, router; default
    /// all): quick device iterations.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// A host weight in any format, owning its bytes.
enum HostWeight {
    Dense(DType, usize, usize, Vec<u8>),
    Quant(Quantized),
}

impl HostWeight {
    fn view(&self) -> WeightView<'_> {
        match self {
            HostWeight::Dense(dtype, rows, cols, data) => WeightView::Dense {
                dtype: *dtype,
                rows: *rows,
                cols: *cols,
                data,
            },
            HostWeight::Quant(q) => WeightView::Quant(q.view()),
        }
    }
}

fn typed<T: Float>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn random_weight(
    rng: &mut StdRng,
    spec: Option<QuantSpec>,
    dtype: DType,
    rows: usize,
    cols: usize,
    global: Option<f32>,
) -> Result<HostWeight> {
    let nrm = Normal::new(0.0f32, 0.05).unwrap();
    let v: Vec<f32> = (0..rows * cols).map(|_| nrm.sample(rng)).collect();
    let shape = [rows, cols];
    let opts = QuantizeOptions {
        global_scale: global,
        ..Default::default()
    };
    Ok(match spec {
        None => {
            let data = match dtype {
                DType::F32 => bytemuck::cast_slice(&v).to_vec(),
                DType::F16 => bytemuck::cast_slice(&typed::<f16>(&v)).to_vec(),
                DType::BF16 => bytemuck::cast_slice(&typed::<bf16>(&v)).to_vec(),
            };
            HostWeight::Dense(dtype, rows, cols, data)
        }
        Some(s) => HostWeight::Quant(match dtype {
            DType::F32 => quantize("w", &v, &shape, s, opts)?,
            DType::F16 => quantize("w", &typed::<f16>(&v), &shape, s, opts)?,
            DType::BF16 => quantize("w", &typed::<bf16>(&v), &shape, s, opts)?,
        }),
    })
}

fn randn(rng: &mut StdRng, n: usize, sd: f32) -> Vec<f32> {
    let nrm = Normal::new(0.0f32, sd).unwrap();
    (0..n).map(|_| nrm.sample(rng)).collect()
}

/// ‖a − b‖ / ‖b‖ (infinite when anything is non-finite: unwritten outputs are NaN).
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

struct Checks {
    failed: Vec<String>,
    n: usize,
}

impl Checks {
    fn record(&mut self, name: &str, err: f64, tol: f64) {
        self.n += 1;
        let ok = err <= tol;
        println!(
            "  {:<52} rel err {:>9.2e}  {}",
            name,
            err,
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            self.failed.push(format!("{name}: {err:.2e} > {tol:.0e}"));
        }
    }
}

fn spec_name(spec: Option<QuantSpec>, dtype: DType) -> String {
    match spec {
        None => format!("dense {dtype}"),
        Some(s) => format!("{s} {dtype}"),
    }
}

fn check_gemv(dev: &CudaDevice, rng: &mut StdRng, c: &mut Checks) -> Result<()> {
    println!("GEMV vs rooftop_cpu::matmul_ref (f32 math; tolerance 1e-4)");
    let mut cases: Vec<(Option<QuantSpec>, DType, Option<f32>)> = vec![
        (None, DType::F32, None),
        (None, DType::F16, None),
        (None, DType::BF16, None),
    ];
    for bits in [1, 2, 3, 4, 5, 6, 8] {
        for g in [32, 64, 128] {
            cases.push((Some(QuantSpec::affine(bits, g)?), DType::BF16, None));
        }
    }
    cases.push((Some(QuantSpec::affine(4, 64)?), DType::F16, None));
    cases.push((Some(QuantSpec::affine(4, 64)?), DType::F32, None));
    cases.push((Some(QuantSpec::affine(3, 32)?), DType::F16, None));
    cases.push((Some(QuantSpec::nvfp4()), DType::BF16, None));
    cases.push((Some(QuantSpec::nvfp4()), DType::F32, Some(3.7)));
    cases.push((Some(QuantSpec::mxfp4()), DType::BF16, None));
    cases.push((Some(QuantSpec::mxfp8()), DType::BF16, None));
    // Row lengths exercising every lanes-per-row choice: 768 → 8, 2048 → 32, 1408 → 4, 320 → 2.
    let shapes = [(200, 768), (96, 2048), (130, 1408), (77, 384)];
    for (i, (spec, dtype, global)) in cases.into_iter().enumerate() {
        let (rows, cols) = shapes[i % shapes.len()];
        let cols = if cols % spec.map_or(32, |s| s.group_size) != 0 {
            1536
        } else {
            cols
        };
        let hw = random_weight(rng, spec, dtype, rows, cols, global)?;
        let wd = CudaWeight::upload(dev, &hw.view())?;
        for n in [1usize, 3, 8, 11] {
            let err = gemv_err(dev, rng, &hw, &wd, n)?;
            let name = format!(
                "gemv {} n={n} [{rows}x{cols}]{}",
                spec_name(spec, dtype),
                if global.is_some() { " global" } else { "" }
            );
            c.record(&name, err, 1e-4);
        }
    }
    Ok(())
}

/// Relative error of the device GEMV of `n` random tokens against `matmul_ref` on the
/// host copy `hw` of `wd`.
fn gemv_err(
    dev: &CudaDevice,
    rng: &mut StdRng,
    hw: &HostWeight,
    wd: &CudaWeight,
    n: usize,
) -> Result<f64> {
    let (rows, cols) = (wd.rows, wd.cols);
    let x = randn(rng, n * cols, 1.0);
    let mut want = vec![0f32; n * rows];
    rooftop_cpu::matmul_ref(&hw.view(), &x, n, &mut want);
    let xd = dev.upload(&x)?;
    let mut yd = dev.upload(&vec![f32::NAN; n * rows])?;
    dev.matmul(wd, &xd, n, &mut yd)?;
    Ok(rel_err(&dev.download(&yd)?, &want))
}

/// 4-bit GEMVs with int8 activations (the default path for affine 4-bit, nvfp4, mxfp4)
/// against the exact f32 reference: x quantized per 32 to int8 costs 1–2.5% relative
/// error on these random weights (unsigned 4-bit codes carry the quantization error of
/// x's chunk sum).
fn check_gemv_int8(dev: &CudaDevice, rng: &mut StdRng, c: &mut Checks) -> Result<()> {
    println!("GEMV 4-bit, int8 activations vs rooftop_cpu::matmul_ref (tolerance 4e-2)");
    for (spec, dtype, (rows, cols), global) in [
        (QuantSpec::affine(4, 64)?, DType::BF16, (200, 768), None),
        (QuantSpec::affine(4, 32)?, DType::BF16, (96, 2048), None),
        (QuantSpec::affine(4, 128)?, DType::F16, (130, 1408), None),
        (QuantSpec::affine(4, 64)?, DType::F32, (77, 384), None),
        (QuantSpec::nvfp4(), DType::BF16, (200, 768), None),
        (QuantSpec::nvfp4(), DType::F32, (96, 2048), Some(3.7)),
        (QuantSpec::mxfp4(), DType::BF16, (130, 1408), None),
    ] {
        let g = spec.group_size;
        let spec = Some(spec);
        let cols = if cols % g != 0 { 1536 } else { cols };
        let hw = random_weight(rng, spec, dtype, rows, cols, global)?;
        let wd = CudaWeight::upload(dev, &hw.view())?;
        for n in [1usize, 3, 8] {
            let err = gemv_err(dev, rng, &hw, &wd, n)?;
            let name = format!(
                "gemv int8-act {} n={n} [{rows}x{cols}]",
                spec_name(spec, dtype)
            );
            c.record(&name, err, 4e-2);
        }
    }
    Ok(())
}

/// The routers' GEMV module (exact f32 activations whatever the format) against the
/// exact f32 reference. With int8 x these formats are 1–2.5% off (check_gemv_int8), and
/// int8 noise picks other experts at near-ties; the router must stay exact.
fn check_gemv_router(dev: &CudaDevice, rng: &mut StdRng, c: &mut Checks) -> Result<()> {
    println!("Router GEMV (f32 activations) vs rooftop_cpu::matmul_ref (tolerance 1e-4)");
    for (spec, dtype, (rows, cols), global) in [
        (QuantSpec::affine(4, 64)?, DType::BF16, (128, 2048), None),
        (QuantSpec::affine(4, 128)?, DType::F16, (64, 1408), None),
        (QuantSpec::nvfp4(), DType::F32, (128, 2048), Some(3.7)),
        (QuantSpec::mxfp4(), DType::BF16, (60, 768), None),
    ] {
        let hw = random_weight(rng, Some(spec), dtype, rows, cols, global)?;
        let wd = CudaWeight::upload(dev, &hw.view())?;
        for n in [1usize, 8] {
            let x = randn(rng, n * cols, 1.0);
            let mut want = vec![0f32; n * rows];
            rooftop_cpu::matmul_ref(&hw.view(), &x, n, &mut want);
            let xd = dev.upload(&x)?;
            let mut yd = dev.upload(&vec![f32::NAN; n * rows])?;
            dev.matmul_router(&wd, &xd, n, &mut yd)?;
            let name = format!(
                "router gemv {} n={n} [{rows}x{cols}]",
                spec_name(Some(spec), dtype)
            );
            c.record(&name, rel_err(&dev.download(&yd)?, &want), 1e-4);
        }
    }
    Ok(())
}

struct MoeCase {
    name: &'static str,
    spec: QuantSpec,
    e: usize,
    h: usize,
    i: usize,
    shared: usize,
    routing: Routing,
    bias: bool,
}

fn check_moe(dev: &CudaDevice, rng: &mut StdRng, c: &mut Checks) -> Result<()> {
    println!("Fused MoE step vs CPU reference (routing + matmul_ref)");
    let ds = Routing {
        kind: RoutingKind::Sigmoid,
        top_k: 6,
        norm_topk_prob: true,
        n_group: 4,
        topk_group: 2,
        routed_scaling_factor: 2.5,
    };
    let cases = [
        MoeCase {
            name: "qwen softmax",
            spec: QuantSpec::affine(4, 64)?,
            e: 64,
            h: 512,
            i: 256,
            shared: 0,
            routing: Routing::qwen(8, true),
            bias: false,
        },
        MoeCase {
            name: "qwen no-renorm",
            spec: QuantSpec::nvfp4(),
            e: 32,
            h: 256,
            i: 96,
            shared: 0,
            routing: Routing::qwen(4, false),
            bias: false,
        },
        MoeCase {
            name: "deepseek grouped+shared",
            spec: QuantSpec::affine(3, 32)?,
            e: 32,
            h: 384,
            i: 128,
            shared: 192,
            routing: ds,
            bias: true,
        },
        MoeCase {
            name: "glm sigmoid+shared",
            spec: QuantSpec::mxfp8(),
            e: 16,
            h: 256,
            i: 160,
            shared: 160,
            routing: Routing {
                n_group: 1,
                topk_group: 1,
                top_k: 4,
                ..ds
            },
            bias: true,
        },
        MoeCase {
            name: "mxfp4 softmax",
            spec: QuantSpec::mxfp4(),
            e: 16,
            h: 256,
            i: 64,
            shared: 0,
            routing: Routing::qwen(2, true),
            bias: false,
        },
    ];
    for mc in cases {
        let dt = DType::BF16;
        let w = |rng: &mut StdRng, r, cols| random_weight(rng, Some(mc.spec), dt, r, cols, None);
        let router = random_weight(rng, Some(QuantSpec::affine(8, 64)?), dt, mc.e, mc.h, None)?;
        let (g, u, d) = (
            w(rng, mc.e * mc.i, mc.h)?,
            w(rng, mc.e * mc.i, mc.h)?,
            w(rng, mc.e * mc.h, mc.i)?,
        );
        let sh = if mc.shared > 0 {
            Some([
                w(rng, mc.shared, mc.h)?,
                w(rng, mc.shared, mc.h)?,
                w(rng, mc.h, mc.shared)?,
            ])
        } else {
            None
        };
        let bias: Option<Vec<f32>> = mc.bias.then(|| randn(rng, mc.e, 0.05));
        let r = MoeRef {
            router: router.view(),
            gate: g.view(),
            up: u.view(),
            down: d.view(),
            shared: sh.as_ref().map(|s| [s[0].view(), s[1].view(), s[2].view()]),
            bias: bias.as_deref(),
            routing: mc.routing,
        };
        let up = |hw: &HostWeight| CudaWeight::upload(dev, &hw.view());
        let moe = CudaMoe::new(
            up(&router)?,
            [up(&g)?, up(&u)?, up(&d)?],
            match &sh {
                Some(s) => Some([up(&s[0])?, up(&s[1])?, up(&s[2])?]),
                None => None,
            },
            match &bias {
                Some(b) => Some(dev.upload(b)?),
                None => None,
            },
            mc.routing,
        )?;
        let mut scratch = moe.scratch(dev)?;
        for trial in 0..3 {
            let x = randn(rng, mc.h, 1.0);
            let resid = randn(rng, mc.h, 1.0);
            let (want, _logits, ids, wts) = r.forward(&x);
            let xd = dev.upload(&x)?;
            let mut od = dev.upload(&resid)?;
            moe.step(dev, &mut scratch, &xd, &mut od)?;
            let got: Vec<f32> = dev
                .download(&od)?
                .iter()
                .zip(&resid)
                .map(|(o, r)| o - r)
                .collect();
            let gids: Vec<usize> = dev
                .download(&scratch.ids)?
                .iter()
                .map(|&v| v as usize)
                .collect();
            let gw = dev.download(&scratch.wts)?;
            let name = format!(
                "moe {} {} E{} H{} I{} k{} #{trial}",
                mc.name, mc.spec, mc.e, mc.h, mc.i, mc.routing.top_k
            );
            if gids != ids {
                println!("  {name}: experts differ: gpu {gids:?} cpu {ids:?}");
                c.record(&format!("{name} experts"), f64::INFINITY, 0.0);
                continue;
            }
            c.record(&format!("{name} weights"), rel_err(&gw, &wts), 1e-5);
            c.record(&name, rel_err(&got, &want), 1e-4);
        }
    }
    Ok(())
}

fn check_ops(dev: &CudaDevice, rng: &mut StdRng, c: &mut Checks) -> Result<()> {
    println!("RMSNorm, RoPE, KV append + decode attention vs f64 references");
    let (rows, d) = (3, 2048);
    let x = randn(rng, rows * d, 2.0);
    let w = randn(rng, d, 1.0);
    let (xd, wd) = (dev.upload(&x)?, dev.upload(&w)?);
    let mut yd = dev.upload(&vec![f32::NAN; rows * d])?;
    dev.rmsnorm(&xd, &wd, &mut yd, rows, 1e-6)?;
    c.record(
        "rmsnorm 3x2048",
        rel_err(&dev.download(&yd)?, &reference::rmsnorm(&x, &w, 1e-6)),
        1e-5,
    );

    for traditional in [false, true] {
        let (heads, hd, pos) = (4, 128, 777);
        let x = randn(rng, heads * hd, 1.0);
        let mut want = x.clone();
        reference::rope(&mut want, hd, hd, pos, 1e6, traditional);
        let mut xd = dev.upload(&x)?;
        let pd = dev.upload(&[pos as i32])?;
        dev.rope(
            &mut xd,
            &pd,
            &rooftop_cuda::Rope {
                heads,
                head_dim: hd,
                rot_dim: hd,
                theta: 1e6,
                traditional,
            },
        )?;
        c.record(
            &format!("rope pos {pos} traditional={traditional}"),
            rel_err(&dev.download(&xd)?, &want),
            1e-5,
        );
    }

    let s = AttnShape {
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 128,
        max_seq: 512,
        splits: 1,
    };
    let len = 300;
    let kv = s.n_kv_heads * s.head_dim;
    let ks: Vec<Vec<f32>> = (0..len).map(|_| randn(rng, kv, 1.0)).collect();
    let vs: Vec<Vec<f32>> = (0..len).map(|_| randn(rng, kv, 1.0)).collect();
    let mut kc: CudaSlice<u16> = dev.alloc(s.cache_len())?;
    let mut vc: CudaSlice<u16> = dev.alloc(s.cache_len())?;
    let mut pd = dev.upload(&[0i32])?;
    for p in 0..len {
        dev.write(&mut pd, &[p as i32])?;
        let (kd, vd) = (dev.upload(&ks[p])?, dev.upload(&vs[p])?);
        dev.kv_append(&kd, &vd, &mut kc, &mut vc, &pd, &s)?;
    }
    // Reference caches [n_kv, len, hd], rounded to f16 as stored.
    let lay = |src: &[Vec<f32>]| -> Vec<f32> {
        let mut o = vec![0f32; s.n_kv_heads * len * s.head_dim];
        for (p, row) in src.iter().enumerate() {
            for h in 0..s.n_kv_heads {
                for e in 0..s.head_dim {
                    o[(h * len + p) * s.head_dim + e] =
                        f16::from_f32(row[h * s.head_dim + e]).to_f32();
                }
            }
        }
        o
    };
    let (kr, vr) = (lay(&ks), lay(&vs));
    let q = randn(rng, s.n_heads * s.head_dim, 1.0);
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let want = reference::attention(&q, &kr, &vr, &s, len, scale);
    let qd = dev.upload(&q)?;
    for splits in [1, 5, 64] {
        let s = AttnShape { splits, ..s };
        // Scratch full of NaN (counters included: attention zeroes them), and two calls
        // on it: the arrival counters must come back to zero after each.
        // The same for the long-context kernel (one CTA per kv head and split).
        let mut part = dev.upload(&vec![f32::NAN; s.partial_len()])?;
        for (call, grouped) in [(1, false), (2, false), (1, true), (2, true)] {
            let mut od = dev.upload(&vec![f32::NAN; s.n_heads * s.head_dim])?;
            let kernel = if grouped {
                AttnKernel::Grouped
            } else {
                AttnKernel::PerHead
            };
            dev.attention(&qd, &kc, &vc, &pd, &mut part, &mut od, &s, scale, kernel)?;
            let kind = if grouped {
                "grouped attention"
            } else {
                "attention"
            };
            c.record(
                &format!("kv_append x{len} + {kind} splits={splits} call {call}"),
                rel_err(&dev.download(&od)?, &want),
                1e-5,
            );
        }
    }
    Ok(())
}

fn median(mut v: Vec<f32>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] as f64
}

struct BenchRow {
    name: String,
    bytes: usize,
    ms: f64,
}

fn bench_bandwidth(dev: &CudaDevice, iters: usize) -> Result<f64> {
    Ok(dev.read_bandwidth(4 << 30, iters)?)
}

fn bench_gemv(dev: &CudaDevice, iters: usize, rows_out: &mut Vec<BenchRow>) -> Result<()> {
    let cols = 2048;
    let cases: Vec<(Option<QuantSpec>, usize)> = vec![
        (Some(QuantSpec::affine(4, 64)?), 1),
        (Some(QuantSpec::affine(4, 64)?), 8),
        (Some(QuantSpec::nvfp4()), 1),
        (Some(QuantSpec::mxfp4()), 1),
        (Some(QuantSpec::affine(2, 64)?), 1),
        (Some(QuantSpec::affine(3, 64)?), 1),
        (Some(QuantSpec::affine(5, 64)?), 1),
        (Some(QuantSpec::affine(6, 64)?), 1),
        (Some(QuantSpec::affine(8, 64)?), 1),
        (Some(QuantSpec::mxfp8()), 1),
        (None, 1),
    ];
    let t = dev.timer()?;
    for (spec, n) in cases {
        // ~512 MiB of weight: ten times the L2, so every pass reads HBM.
        let bpr = spec.map_or(cols * 2, |s| {
            s.words_per_row(cols) * 4
                + cols / s.group_size * s.scale_bytes(DType::BF16) * (1 + s.has_biases() as usize)
        });
        let rows = (512usize << 20) / bpr;
        let w = CudaWeight::random(dev, spec, DType::BF16, rows, cols, 11)?;
        let x = dev.upload(&randn(&mut StdRng::seed_from_u64(3), n * cols, 1.0))?;
        let mut y: CudaSlice<f32> = dev.alloc(n * rows)?;
        dev.matmul(&w, &x, n, &mut y)?;
        let mut ms = Vec::new();
        for _ in 0..iters {
            t.start(dev)?;
            dev.matmul(&w, &x, n, &mut y)?;
            ms.push(t.stop_ms(dev)?);
        }
        rows_out.push(BenchRow {
            name: format!(
                "gemv {} n={n} [{rows}x{cols}]",
                spec_name(spec, DType::BF16)
            ),
            bytes: w.nbytes(),
            ms: median(ms),
        });
    }
    Ok(())
}

/// qwen3-30b-a3b MoE: H 2048, 128 experts, top-8 softmax (renormalized), I 768.
fn bench_moe(
    dev: &CudaDevice,
    spec: QuantSpec,
    layers: usize,
    iters: usize,
    out: &mut Vec<BenchRow>,
) -> Result<()> {
    let (e, h, i) = (128, 2048, 768);
    let routing = Routing::qwen(8, true);
    let mut moes = Vec::new();
    for l in 0..layers {
        let s = 100 + 10 * l as u32;
        let rw = |r, c, k| CudaWeight::random(dev, Some(spec), DType::BF16, r, c, s + k);
        moes.push(CudaMoe::new(
            rw(e, h, 0)?,
            [rw(e * i, h, 1)?, rw(e * i, h, 2)?, rw(e * h, i, 3)?],
            None,
            None,
            routing,
        )?);
    }
    let mut scratch: Vec<_> = moes
        .iter()
        .map(|m| m.scratch(dev))
        .collect::<Result<_, _>>()?;
    let x = dev.upload(&randn(&mut StdRng::seed_from_u64(5), h, 1.0))?;
    let mut resid: CudaSlice<f32> = dev.alloc(h)?;
    let (px, pr) = (dev.ptr(&x), dev.ptr(&resid));
    let run = |scratch: &mut Vec<rooftop_cuda::MoeScratch>| -> Result<(), rooftop_cuda::CudaError> {
        for (m, s) in moes.iter().zip(scratch.iter_mut()) {
            m.step_raw(dev, s, px, pr, None, None)?;
        }
        Ok(())
    };
    run(&mut scratch)?;
    dev.synchronize()?;
    let bytes = moes.iter().map(|m| m.bytes_per_step()).sum::<usize>();
    let t = dev.timer()?;
    let time_graph =
        |parts: [bool; 3], scratch: &mut Vec<rooftop_cuda::MoeScratch>| -> Result<f64> {
            let graph = dev.capture(|| {
                for (m, s) in moes.iter().zip(scratch.iter_mut()) {
                    m.step_parts(
                        dev,
                        s,
                        px,
                        pr,
                        rooftop_cuda::StepOpts {
                            parts,
                            norm: None,
                            next: None,
                        },
                    )?;
                }
                Ok(())
            })?;
            graph
                .launch()
                .map_err(|e| anyhow::anyhow!("graph launch: {e}"))?;
            let mut ms = Vec::new();
            for _ in 0..iters {
                t.start(dev)?;
                graph
                    .launch()
                    .map_err(|e| anyhow::anyhow!("graph launch: {e}"))?;
                ms.push(t.stop_ms(dev)?);
            }
            Ok(median(ms))
        };
    let pdl_default = dev.pdl();
    for pdl in [false, true] {
        dev.set_pdl(pdl);
        if dev.pdl() != pdl {
            continue;
        }
        let ms = time_graph([true; 3], &mut scratch)?;
        out.push(BenchRow {
            name: format!(
                "moe step x{layers} {spec} graph{}",
                if pdl { "+PDL" } else { "" }
            ),
            bytes,
            ms,
        });
    }
    dev.set_pdl(pdl_default);
    let pb: Vec<[usize; 3]> = moes.iter().map(|m| m.part_bytes()).collect();
    for (i, part) in ["router", "routing+gate/up", "down"].iter().enumerate() {
        let mut mask = [false; 3];
        mask[i] = true;
        let ms = time_graph(mask, &mut scratch)?;
        out.push(BenchRow {
            name: format!("  {part} only x{layers}"),
            bytes: pb.iter().map(|b| b[i]).sum(),
            ms,
        });
    }
    let _ = &mut resid;
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    let dev = CudaDevice::new(a.device)?;
    let (free, total) = dev.mem_info()?;
    println!(
        "device {}: {} (sm_{}{}, {} SMs, {:.1} GiB, {:.1} GiB free), NVRTC target {}",
        a.device,
        dev.name,
        dev.cc.0,
        dev.cc.1,
        dev.sms,
        total as f64 / (1u64 << 30) as f64,
        free as f64 / (1u64 << 30) as f64,
        dev.arch()
    );
    let mut rng = StdRng::seed_from_u64(a.seed ^ rand::rng().random::<u64>());
    let mut c = Checks {
        failed: vec![],
        n: 0,
    };
    if !a.skip_checks {
        // Exact f32 activations: every kernel against the f32 CPU reference at 1e-4.
        for g in &a.only {
            if !["gemv", "moe", "ops", "int8", "router"].contains(&g.as_str()) {
                bail!("--only: unknown check group {g:?} (gemv, moe, ops, int8, router)");
            }
        }
        let run = |g: &str| a.only.is_empty() || a.only.iter().any(|o| o == g);
        rooftop_cuda::nvrtc::set_f32_activations(true);
        if run("gemv") {
            check_gemv(&dev, &mut rng, &mut c)?;
        }
        if run("moe") {
            check_moe(&dev, &mut rng, &mut c)?;
        }
        if run("ops") {
            check_ops(&dev, &mut rng, &mut c)?;
        }
        // The default int8-activation GEMV for 4-bit affine (looser: x is quantized);
        // what follows (benchmarks, whole models) runs the defaults.
        rooftop_cuda::nvrtc::set_f32_activations(false);
        if run("int8") {
            check_gemv_int8(&dev, &mut rng, &mut c)?;
        }
        if run("router") {
            check_gemv_router(&dev, &mut rng, &mut c)?;
        }
    }
    if let Some(root) = &a.models {
        let checks = super::cuda_models::check_models(&dev, root)?;
        c.n += checks.len();
        c.failed.extend(super::cuda_models::report(&checks));
    }
    println!("{} checks, {} failed", c.n, c.failed.len());

    if !a.no_bench {
        let bw = bench_bandwidth(&dev, a.iters)?;
        let mut rows = Vec::new();
        bench_gemv(&dev, a.iters, &mut rows)?;
        for spec in [QuantSpec::affine(4, 64)?, QuantSpec::nvfp4()] {
            bench_moe(&dev, spec, a.layers, a.iters, &mut rows)?;
        }
        println!(
            "\n{} — measured streaming read bandwidth {bw:.0} GB/s (4 GiB, median of {})",
            dev.name, a.iters
        );
        println!(
            "{:<52} {:>10} {:>10} {:>8} {:>7}",
            "benchmark", "MB moved", "time us", "GB/s", "% read"
        );
        for r in &rows {
            let gbs = r.bytes as f64 / (r.ms * 1e-3) / 1e9;
            println!(
                "{:<52} {:>10.1} {:>10.1} {:>8.0} {:>6.1}%",
                r.name,
                r.bytes as f64 / 1e6,
                r.ms * 1e3,
                gbs,
                100.0 * gbs / bw
            );
        }
    }
    println!("\nchecks: {} run, {} failed", c.n, c.failed.len());
    if !c.failed.is_empty() {
        bail!(
            "{} CUDA checks failed:\n  {}",
            c.failed.len(),
            c.failed.join("\n  ")
        );
    }
    Ok(())
}
