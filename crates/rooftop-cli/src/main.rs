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
