//! `rooftop`: run quantized Mixture-of-Experts models at the memory-bandwidth limit.
//!
//! Each subcommand lives in `cmd/<name>.rs` with its own `Args` and `run`.

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "rooftop",
    version,
    about = "Quantized MoE inference at the memory-bandwidth roofline",
    long_about = "rooftop runs quantized Mixture-of-Experts language models (Qwen3-MoE, GLM-4.5, \
DeepSeek-V3 class) for batch-1 decode at the memory-bandwidth limit.\n\n\
Formats are MLX-compatible (affine 2–8 bit, nvfp4, mxfp4, mxfp8): a model quantized \
by mlx_lm.convert runs here unchanged, and what rooftop writes loads in mlx-lm.",
    after_help = "Start with `rooftop fidelity` to see what each weight format costs in error and bits."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Round-trip error of every weight format on a tensor or on generated data.
    Fidelity(cmd::fidelity::Args),
    /// Convert a Hugging Face checkpoint to an MLX-format quantized model.
    Quantize(cmd::quantize::Args),
    /// Perplexity and KL divergence of quantized models against a reference.
    Eval(cmd::eval::Args),
    /// Prefill/decode speed and % of this machine's memory-bandwidth roofline.
    Bench(cmd::bench::Args),
    /// Bytes per token, the tok/s ceiling, and experts read when verifying K tokens.
    Roofline(cmd::roofline::Args),
    /// Check every CUDA kernel against the CPU reference; benchmark against the roofline.
    CudaCheck(cmd::cuda_check::Args),
    /// Generate text from a model directory (HF or MLX, quantized or not) on the CPU.
    #[command(alias = "run")]
    Generate(cmd::generate::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fidelity(a) => cmd::fidelity::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Roofline(a) => cmd::roofline::run(a),
        Command::CudaCheck(a) => cmd::cuda_check::run(a),
        Command::Generate(a) => cmd::generate::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
