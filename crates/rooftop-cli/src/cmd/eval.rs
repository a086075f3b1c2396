//! `rooftop eval`: perplexity of quantized models and their KL divergence from a
//! reference over a text, side by side (`llama-perplexity --kl-divergence`'s numbers).

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rooftop_convert::eval::{Scores, Summary};
use rooftop_engine::{model::Logits, Model, Tokenizer};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(
    about = "Perplexity and KL divergence of quantized models against a reference over a text",
    after_help = "Example:\n  rooftop eval --reference Qwen3-30B-A3B --model q4 --model nvfp4 --text wiki.test.raw"
)]
pub struct Args {
    /// Quantized model directory (repeat to compare several side by side).
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Reference model directory (usually the unquantized checkpoint).
    #[arg(long)]
    reference: PathBuf,
    /// Text file to score.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per independently evaluated chunk.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score at most this many chunks (0: the whole text).
    #[arg(long, default_value_t = 0)]
    chunks: usize,
    /// Print the table as JSON.
    #[arg(long)]
    json: bool,
    /// Where the models (and the reference) run: cpu, cuda, cuda:N or auto. On a GPU the
    /// logits of every position come from the decode graph, token by token (its KV cache
    /// is f16, the CPU's f32).
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// One model, on the CPU or uploaded to a GPU: logits `[t, vocab]` of every position.
enum Runner<'a> {
    Cpu(&'a Model),
    Cuda(Box<(rooftop_cuda::CudaDecoder, rooftop_cuda::CudaState)>),
}

impl Runner<'_> {
    fn all_logits(&mut self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        match self {
            Runner::Cpu(m) => {
                let mut cache = m.new_cache(tokens.len());
                Ok(m.forward(tokens, &mut cache, Logits::All)?)
            }
            Runner::Cuda(b) => {
                let (dec, st) = &mut **b;
                dec.reset(st)?;
                let mut out = Vec::with_capacity(tokens.len() * dec.vocab());
                for &t in tokens {
                    dec.feed(st, t)?;
                    out.extend(dec.logits(st)?);
                }
                Ok(out)
            }
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.ctx >= 2, "--ctx must be at least 2");
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let tok = Tokenizer::load(&a.reference)?;
    let ids = tok.encode(&text, false)?;
    let mut chunks: Vec<&[u32]> = ids.chunks(a.ctx).filter(|c| c.len() >= 2).collect();
    if a.chunks > 0 {
        chunks.truncate(a.chunks);
    }
    anyhow::ensure!(
        !chunks.is_empty(),
        "{} has fewer than 2 tokens",
        a.text.display()
    );
    let load = |p: &PathBuf| Model::load(p).with_context(|| format!("loading {}", p.display()));
    let reference = load(&a.reference)?;
    let models = a
        .models
        .iter()
        .map(load)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let vocab = reference.vocab_size();
    for (m, p) in models.iter().zip(&a.models) {
        anyhow::ensure!(
            m.vocab_size() == vocab,
            "{} has vocabulary {} but the reference has {vocab}",
            p.display(),
            m.vocab_size()
        );
    }
    let ordinal = super::bench_cuda::parse_device(&a.device)?;
    let dev = ordinal.map(rooftop_cuda::CudaDevice::new).transpose()?;
    let runner = |m| -> anyhow::Result<Runner> {
        Ok(match &dev {
            None => Runner::Cpu(m),
            Some(d) => {
                let dec = m.to_cuda(d.clone(), true)?;
                let st = dec.new_state(a.ctx)?;
                Runner::Cuda(Box::new((dec, st)))
            }
        })
    };
    let mut ref_run = runner(&reference)?;
    let mut runs = models
        .iter()
        .map(runner)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bar = ProgressBar::new((chunks.len() * (models.len() + 1)) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {wide_bar} {pos}/{len} forward passes, ETA {eta}",
        )
        .expect("valid template"),
    );
    let mut ref_scores = Scores::default();
    let mut scores = vec![Scores::default(); models.len()];
    for chunk in &chunks {
        let r = ref_run.all_logits(chunk)?;
        ref_scores.add_chunk(chunk, &r, None, vocab);
        bar.inc(1);
        for (m, s) in runs.iter_mut().zip(&mut scores) {
            let q = m.all_logits(chunk)?;
            s.add_chunk(chunk, &q, Some(&r), vocab);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let mut rows: Vec<Summary> = vec![ref_scores.summary(&a.reference.display().to_string())];
    rows.extend(
        scores
            .iter()
            .zip(&a.models)
            .map(|(s, p)| s.summary(&p.display().to_string())),
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{} tokens in {} chunk(s) of up to {}",
        rows[0].tokens + chunks.len(),
        chunks.len(),
        a.ctx
    );
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7}",
        "model", "PPL", "ΔPPL", "mean KL", "p99 KL", "max KL", "top-1"
    );
    let base = rows[0].perplexity;
    for (i, r) in rows.iter().enumerate() {
        let name = if i == 0 {
            format!("{} (reference)", r.name)
        } else {
            r.name.clone()
        };
        println!(
            "{:<40} {:>10.4} {:>+10.4} {:>10.6} {:>10.6} {:>10.6} {:>6.2}%",
            name,
            r.perplexity,
            r.perplexity - base,
            r.mean_kl,
            r.p99_kl,
            r.max_kl,
            r.top1_agreement * 100.0
        );
    }
    Ok(())
}
