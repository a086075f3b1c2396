//! `rooftop fidelity`: what each weight format costs in error and in bits.

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, StudentT};
use rooftop_quant::stats::ErrorStats;
use rooftop_quant::{
    dequantize, quantize, DType, Float, Method, QuantMode, QuantSpec, QuantizeOptions,
};
use serde::Serialize;

#[derive(clap::Args)]
#[command(
    about = "Round-trip error of every weight format on a tensor or on generated data",
    long_about = "Quantizes a tensor with every format (or the one you pick), dequantizes it, and \
reports mean |err|, RMSE, max |err|, SNR and the true bits per weight (scales and biases \
counted). With --optimize, rooftop's error-minimizing quantizer (same bytes layout, loadable \
by mlx unchanged) is shown beside MLX's.\n\n\
Examples:\n  rooftop fidelity                                   # N(0,1) 4096x4096, all formats\n  \
rooftop fidelity --random student-t --optimize       # heavy tails, both quantizers\n  \
rooftop fidelity --input model.safetensors --tensor model.layers.0.mlp.down_proj.weight\n  \
rooftop fidelity --mode affine --bits 3 --group-size 64 --json"
)]
pub struct Args {
    /// safetensors file to read the tensor from (with --tensor).
    #[arg(long, requires = "tensor", conflicts_with = "random")]
    input: Option<std::path::PathBuf>,
    /// Name of the tensor inside --input.
    #[arg(long, requires = "input")]
    tensor: Option<String>,
    /// Generate data instead: normal or student-t.
    #[arg(long, value_parser = ["normal", "student-t"])]
    random: Option<String>,
    /// Degrees of freedom for --random student-t.
    #[arg(long, default_value_t = 4.0)]
    dof: f64,
    /// Shape of generated data, ROWSxCOLS.
    #[arg(long, default_value = "4096x4096")]
    shape: String,
    /// Seed for generated data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Element type of generated data (the dtype of affine scales and biases).
    #[arg(long, default_value = "float32", value_parser = ["float32", "float16", "bfloat16"])]
    dtype: String,
    /// Only this format: affine, nvfp4, mxfp4 or mxfp8.
    #[arg(long)]
    mode: Option<QuantMode>,
    /// Only this bit width (affine: 2, 3, 4, 5, 6, 8).
    #[arg(long)]
    bits: Option<u32>,
    /// Only this group size (affine: 32, 64, 128).
    #[arg(long)]
    group_size: Option<usize>,
    /// Also run rooftop's error-minimizing quantizer and show it beside MLX's.
    #[arg(long)]
    optimize: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    format: String,
    mode: QuantMode,
    bits: u32,
    group_size: usize,
    bits_per_weight: f64,
    mlx: ErrorStats,
    /// MLX-exact quantizer throughput, GB/s of input.
    quantize_gbps: f64,
    dequantize_gbps: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    optimized: Option<ErrorStats>,
    /// (1 - rmse_opt / rmse_mlx) in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    rmse_reduction_pct: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    source: String,
    shape: Vec<usize>,
    dtype: DType,
    formats: Vec<Row>,
}

/// Source data as f32 plus its dtype (values are exactly representable in it).
struct Data {
    values: Vec<f32>,
    shape: Vec<usize>,
    dtype: DType,
    source: String,
}

fn parse_shape(s: &str) -> Result<Vec<usize>> {
    let dims: Result<Vec<usize>, _> = s.split(['x', 'X']).map(|d| d.trim().parse()).collect();
    match dims {
        Ok(d) if d.len() >= 2 && d.iter().all(|&x| x > 0) => Ok(d),
        _ => bail!("--shape must look like ROWSxCOLS with positive sizes, got {s:?}"),
    }
}

fn parse_dtype(s: &str) -> DType {
    match s {
        "float16" => DType::F16,
        "bfloat16" => DType::BF16,
        _ => DType::F32,
    }
}

fn round_to(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::F32 => {}
        DType::F16 => v.iter_mut().for_each(|x| *x = <f16 as Float>::round(*x)),
        DType::BF16 => v.iter_mut().for_each(|x| *x = <bf16 as Float>::round(*x)),
    }
}

fn load(a: &Args) -> Result<Data> {
    if let (Some(path), Some(name)) = (&a.input, &a.tensor) {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: read-only map of a file we do not modify; a concurrent writer would be
        // the user's own doing, as with every mmapping loader.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
        let t = st
            .tensor(name)
            .with_context(|| format!("{} has no tensor {name:?}", path.display()))?;
        let dtype = match t.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            d => bail!(
                "tensor {name:?} in {} is {d:?}; fidelity needs float32, float16 or bfloat16",
                path.display()
            ),
        };
        let shape = t.shape().to_vec();
        if shape.len() < 2 {
            bail!(
                "tensor {name:?} has shape {shape:?}; only matrices (2 or more dims) are quantized"
            );
        }
        let mut values = vec![0f32; shape.iter().product()];
        rooftop_quant::dtype::bytes_to_f32(dtype, t.data(), &mut values);
        return Ok(Data {
            values,
            shape,
            dtype,
            source: format!("{}:{name}", path.display()),
        });
    }
    let shape = parse_shape(&a.shape)?;
    let n: usize = shape.iter().product();
    let dist = a.random.as_deref().unwrap_or("normal");
    let dtype = parse_dtype(&a.dtype);
    let mut values = vec![0f32; n];
    // Fill in parallel, each chunk with its own seeded stream: reproducible per seed.
    use rayon::prelude::*;
    let dof = a.dof;
    if dist == "student-t" && dof <= 0.0 {
        bail!("--dof must be positive");
    }
    values
        .par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(i, c)| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                a.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            if dist == "student-t" {
                let t = StudentT::new(dof).unwrap();
                c.iter_mut().for_each(|x| *x = t.sample(&mut rng) as f32);
            } else {
                let nd = Normal::new(0.0f32, 1.0).unwrap();
                c.iter_mut().for_each(|x| *x = nd.sample(&mut rng));
            }
        });
    round_to(dtype, &mut values);
    let source = if dist == "student-t" {
        format!("student-t(nu={dof}) seed {}", a.seed)
    } else {
        format!("normal(0,1) seed {}", a.seed)
    };
    Ok(Data {
        values,
        shape,
        dtype,
        source,
    })
}

fn specs(a: &Args) -> Result<Vec<QuantSpec>> {
    let mut out = vec![];
    for mode in QuantMode::ALL {
        if a.mode.is_some_and(|m| m != mode) {
            continue;
        }
        if mode == QuantMode::Affine {
            for bits in [2, 3, 4, 5, 6, 8] {
                for g in [32, 64, 128] {
                    if a.bits.is_none_or(|b| b == bits) && a.group_size.is_none_or(|x| x == g) {
                        out.push(QuantSpec::affine(bits, g)?);
                    }
                }
            }
        } else {
            let (g, b) = mode.defaults();
            if a.mode.is_some() {
                // An explicit mode with explicit bits/group must be valid for it.
                out.push(QuantSpec::new(
                    mode,
                    a.bits.unwrap_or(b),
                    a.group_size.unwrap_or(g),
                )?);
            } else if a.bits.is_none_or(|x| x == b) && a.group_size.is_none_or(|x| x == g) {
                out.push(QuantSpec::new(mode, b, g)?);
            }
        }
    }
    if out.is_empty() {
        bail!("no format matches --mode/--bits/--group-size");
    }
    Ok(out)
}

/// Error of one round trip, and throughput of each half in GB/s of unquantized input.
struct Trip {
    stats: ErrorStats,
    quantize_gbps: f64,
    dequantize_gbps: f64,
}

fn round_trip(d: &Data, spec: QuantSpec, method: Method) -> Result<Trip> {
    fn go<T: Float>(d: &Data, spec: QuantSpec, method: Method) -> Result<Trip> {
        let src: Vec<T> = d.values.iter().map(|&x| T::from_f32(x)).collect();
        let opts = QuantizeOptions {
            method,
            global_scale: None,
        };
        let gb = (src.len() * T::DTYPE.size()) as f64 / 1e9;
        let t = std::time::Instant::now();
        let q = quantize(&d.source, &src, &d.shape, spec, opts)?;
        let tq = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let back: Vec<T> = dequantize(&q.view())?;
        let td = t.elapsed().as_secs_f64();
        let back: Vec<f32> = back.iter().map(|x| x.to_f32()).collect();
        Ok(Trip {
            stats: ErrorStats::compute(&d.values, &back),
            quantize_gbps: gb / tq,
            dequantize_gbps: gb / td,
        })
    }
    match d.dtype {
        DType::F32 => go::<f32>(d, spec, method),
        DType::F16 => go::<f16>(d, spec, method),
        DType::BF16 => go::<bf16>(d, spec, method),
    }
}

pub fn run(a: Args) -> Result<()> {
    let specs = specs(&a)?;
    let data = load(&a)?;
    let bar = if a.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(specs.len() as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]",
            )
            .unwrap(),
        )
    };
    let mut rows = vec![];
    for spec in specs {
        bar.set_message(spec.to_string());
        let trip = round_trip(&data, spec, Method::Mlx)?;
        let mlx = trip.stats;
        let optimized = if a.optimize {
            Some(round_trip(&data, spec, Method::Optimized)?.stats)
        } else {
            None
        };
        rows.push(Row {
            format: spec.to_string(),
            mode: spec.mode,
            bits: spec.bits,
            group_size: spec.group_size,
            bits_per_weight: spec.bits_per_weight(data.dtype),
            rmse_reduction_pct: optimized.map(|o| 100.0 * (1.0 - o.rmse / mlx.rmse)),
            quantize_gbps: trip.quantize_gbps,
            dequantize_gbps: trip.dequantize_gbps,
            mlx,
            optimized,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let report = Report {
        source: data.source,
        shape: data.shape,
        dtype: data.dtype,
        formats: rows,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "fidelity of {} {:?} {} (scales/biases in {})",
        report.source, report.shape, report.dtype, report.dtype
    );
    print!(
        "{:<12} {:>7} {:>10} {:>10} {:>10} {:>8} {:>6} {:>6}",
        "format", "bits/w", "mean|err|", "rmse", "max|err|", "snr dB", "q GB/s", "dq GB/s"
    );
    if a.optimize {
        print!(
            " | {:>10} {:>10} {:>8} {:>7}",
            "opt mean", "opt rmse", "opt snr", "Δrmse"
        );
    }
    println!();
    for r in &report.formats {
        print!(
            "{:<12} {:>7.3} {:>10.5} {:>10.5} {:>10.5} {:>8.2} {:>6.2} {:>6.2}",
            r.format,
            r.bits_per_weight,
            r.mlx.mean_abs,
            r.mlx.rmse,
            r.mlx.max_abs,
            r.mlx.snr_db,
            r.quantize_gbps,
            r.dequantize_gbps
        );
        if let (Some(o), Some(p)) = (r.optimized, r.rmse_reduction_pct) {
            print!(
                " | {:>10.5} {:>10.5} {:>8.2} {:>6.1}%",
                o.mean_abs, o.rmse, o.snr_db, -p
            );
        }
        println!();
    }
    Ok(())
}
