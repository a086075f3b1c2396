//! `rooftop generate` (alias `run`): stream a completion from a model directory,
//! then print one line of statistics.

use anyhow::{Context, Result};
use rooftop_engine::{npy, GenerateOptions, Generator, Model, SamplerConfig, Tokenizer};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory: config.json, *.safetensors, tokenizer.json (HF or MLX layout).
    #[arg(long, short)]
    model: PathBuf,
    /// Prompt text (the chat template is applied unless --ignore-chat-template).
    #[arg(long, short, default_value = "Hello")]
    prompt: String,
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temp: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// 0 = off.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Use the prompt as is, without the tokenizer's chat template.
    #[arg(long)]
    ignore_chat_template: bool,
    #[arg(long)]
    system_prompt: Option<String>,
    /// Stop when the output contains this text (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Context limit (default: the model's max_position_embeddings).
    #[arg(long)]
    max_context: Option<usize>,
    /// Write float32 logits [positions, vocab] for prompt + generated tokens.
    #[arg(long)]
    dump_logits: Option<PathBuf>,
    /// Where to run: cpu, cuda, cuda:N (weights uploaded once, in their format), or auto
    /// (the first GPU where there is one, else the CPU with a note).
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    let ordinal = super::bench_cuda::parse_device(&a.device)?;
    let model = Model::load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let gpu = match ordinal {
        Some(n) => Some(model.to_cuda(rooftop_cuda::CudaDevice::new(n)?, true)?),
        None => None,
    };
    let tok = Tokenizer::load(&a.model)?;
    let ids = if a.ignore_chat_template || !tok.has_chat_template() {
        tok.encode(&a.prompt, true)?
    } else {
        let mut msgs = vec![];
        if let Some(s) = &a.system_prompt {
            msgs.push(("system", s.as_str()));
        }
        msgs.push(("user", a.prompt.as_str()));
        let text = tok.apply_chat_template(&msgs, true)?;
        tok.encode(&text, false)?
    };
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampler: SamplerConfig {
            temp: a.temp,
            top_p: a.top_p,
            top_k: a.top_k,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
            ..SamplerConfig::default()
        },
        stop_strings: a.stop.clone(),
        max_context: a.max_context,
        keep_logits: a.dump_logits.is_some(),
        ..GenerateOptions::default()
    };
    let mut out = std::io::stdout().lock();
    let mut generator = Generator::new(&model, &tok, opts);
    if let Some(dec) = &gpu {
        generator = generator.on_cuda(dec);
    }
    let g = generator.run(&ids, |t| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
    })?;
    drop(out);
    println!();
    if let (Some(path), Some(logits)) = (&a.dump_logits, &g.logits) {
        let v = model.vocab_size();
        npy::write_f32(path, &[logits.len() / v, v], logits)?;
    }
    println!(
        "prompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s | peak memory: {:.3} GB",
        g.prompt_tokens,
        g.prefill_tps(),
        g.tokens.len(),
        g.decode_tps(),
        peak_rss_bytes() as f64 / 1e9
    );
    Ok(())
}

/// Peak resident set size (Linux `VmHWM`; 0 where unavailable). Mapped weights count
/// once touched, so this is the honest "memory the run needed".
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
