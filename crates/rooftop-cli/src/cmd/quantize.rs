//! `rooftop quantize`: HF checkpoint → MLX-format quantized model (mlx_lm.convert's
//! flags and output), plus recipes, the optimizing quantizer and an error report.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rooftop_convert::{Mixed, Options, Recipe};
use rooftop_quant::{DType, Method, QuantMode};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(
    about = "Convert a Hugging Face checkpoint to an MLX-format (optionally quantized) model",
    long_about = "Convert a Hugging Face checkpoint to an MLX-format model. With the same flags the \
output equals mlx_lm.convert's tensor for tensor; mlx-lm and rooftop both load it.\n\n\
Beyond mlx_lm.convert: --recipe gives per-layer / per-tensor formats, --optimize picks \
lower-error scales in the same format, and a report of error, bits per weight and bytes \
per decode token follows every run.",
    after_help = "Examples:\n  rooftop quantize --hf-path Qwen3-30B-A3B --mlx-path q4 -q\n  \
rooftop quantize --hf-path Qwen3-30B-A3B --mlx-path nv -q --q-mode nvfp4 --optimize\n  \
rooftop quantize --hf-path Qwen3-30B-A3B --mlx-path mix --recipe recipes/edge-nvfp4-middle-affine3.toml"
)]
pub struct Args {
    /// Hugging Face model directory (config.json + model*.safetensors).
    #[arg(long, alias = "model")]
    hf_path: PathBuf,
    /// Where to write the MLX model; must not exist.
    #[arg(long, default_value = "mlx_model")]
    mlx_path: PathBuf,
    /// Quantize the model.
    #[arg(short, long)]
    quantize: bool,
    /// Group size (default: the mode's, 64 for affine).
    #[arg(long)]
    q_group_size: Option<usize>,
    /// Bits per weight (default: the mode's, 4 for affine).
    #[arg(long)]
    q_bits: Option<u32>,
    /// Quantization mode.
    #[arg(long, default_value = "affine", value_parser = ["affine", "mxfp4", "nvfp4", "mxfp8"])]
    q_mode: String,
    /// mlx-lm mixed-bit recipe.
    #[arg(long, value_parser = ["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"])]
    quant_predicate: Option<String>,
    /// Dtype of unquantized tensors (default: config.json's torch_dtype).
    #[arg(long, value_parser = ["float16", "bfloat16", "float32"])]
    dtype: Option<String>,
    /// TOML recipe of per-layer / per-tensor formats (implies -q); see recipes/.
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Search for lower-error scales: same format and bytes layout, not bit-identical
    /// to mlx_lm.convert.
    #[arg(long)]
    optimize: bool,
    /// Largest shard in GiB (mlx-lm: 5).
    #[arg(long, default_value_t = 5.0)]
    max_shard_gb: f64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Also list every tensor in the text report.
    #[arg(long)]
    verbose: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let recipe = a.recipe.as_deref().map(Recipe::load).transpose()?;
    let opts = Options {
        quantize: a.quantize || recipe.is_some(),
        group_size: a.q_group_size,
        bits: a.q_bits,
        mode: a.q_mode.parse::<QuantMode>()?,
        quant_predicate: a
            .quant_predicate
            .as_deref()
            .map(str::parse::<Mixed>)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        dtype: a.dtype.as_deref().map(|d| match d {
            "float16" => DType::F16,
            "bfloat16" => DType::BF16,
            _ => DType::F32,
        }),
        recipe,
        method: if a.optimize {
            Method::Optimized
        } else {
            Method::Mlx
        },
        max_shard_bytes: (a.max_shard_gb * (1u64 << 30) as f64) as u64,
    };
    if a.mlx_path.exists() {
        anyhow::bail!(
            "cannot save to {}: it already exists (delete it or choose another --mlx-path)",
            a.mlx_path.display()
        );
    }
    // Everything is checked before the first tensor is read.
    let prepared = rooftop_convert::prepare(&a.hf_path, &opts)
        .with_context(|| format!("cannot convert {}", a.hf_path.display()))?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let report = rooftop_convert::run(&prepared, &a.mlx_path, &opts, &progress)?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
        if a.verbose {
            for t in &report.tensors {
                let err = t
                    .err
                    .map(|e| format!("{:.3e} {:.3e}", e.mean_abs(), e.rmse()))
                    .unwrap_or_default();
                println!(
                    "{:<56} {:<12} {:>12} {err}",
                    format!("{}.{}", t.module, t.param),
                    t.format,
                    t.bytes
                );
            }
        }
        println!("wrote {}", a.mlx_path.display());
    }
    Ok(())
}
