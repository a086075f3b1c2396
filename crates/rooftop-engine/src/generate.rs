//! Prefill the prompt in one batch, then decode token by token with a sampler,
//! streaming text and stopping on EOS ids, stop strings or the token limit.

use crate::model::{Logits, Model};
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::Tokenizer;
use crate::{EngineError, Result};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Stop when the text contains any of these (the stop string is not emitted).
    pub stop_strings: Vec<String>,
    /// Extra EOS ids on top of the tokenizer's.
    pub extra_eos: Vec<u32>,
    /// Context limit; default: the model's `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Keep logits `[prompt + generated, V]` for every position.
    pub keep_logits: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampler: SamplerConfig::default(),
            stop_strings: vec![],
            extra_eos: vec![],
            max_context: None,
            keep_logits: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Stop,
    Length,
}

#[derive(Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Generated ids (the EOS that ended generation included).
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: Finish,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Decode steps timed in `decode_secs`.
    pub decode_steps: usize,
    /// `[prompt + generated, V]` when `keep_logits`.
    pub logits: Option<Vec<f32>>,
}

impl Generation {
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn decode_tps(&self) -> f64 {
        self.decode_steps as f64 / self.decode_secs.max(1e-9)
    }
}

pub struct Generator<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    opts: GenerateOptions,
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a Model, tok: &'a Tokenizer, opts: GenerateOptions) -> Self {
        Self { model, tok, opts }
    }

    /// Generate after `prompt`, calling `on_text` with each new piece of text.
    pub fn run(&self, prompt: &[u32], mut on_text: impl FnMut(&str)) -> Result<Generation> {
        let o = &self.opts;
        if prompt.is_empty() {
            return Err(EngineError::Invalid("empty prompt".into()));
        }
        let limit = o
            .max_context
            .or(self.model.max_context())
            .unwrap_or(usize::MAX);
        if prompt.len() > limit {
            return Err(EngineError::ContextOverflow {
                tokens: prompt.len(),
                max: limit,
            });
        }
        // One extra slot lets `keep_logits` score the last generated token too.
        let cap = (prompt.len() + o.max_tokens + 1).min(limit);
        let mut cache = self.model.new_cache(cap);
        let mut sampler = Sampler::new(o.sampler.clone());
        let mut eos: Vec<u32> = self.tok.eos_ids().to_vec();
        eos.extend(&o.extra_eos);
        let which = if o.keep_logits {
            Logits::All
        } else {
            Logits::Last
        };
        let vocab = self.model.vocab_size();
        let mut kept = Vec::new();

        let t0 = Instant::now();
        let mut logits = self.model.forward(prompt, &mut cache, which)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let mut history = prompt.to_vec();
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut stream = self.tok.stream();
        let mut finish = Finish::Length;
        let mut steps = 0;
        let t1 = Instant::now();
        loop {
            if o.keep_logits {
                kept.extend_from_slice(&logits);
            }
            if tokens.len() >= o.max_tokens {
                break;
            }
            let n = logits.len();
            let next = sampler.sample(&mut logits[n - vocab..], &history);
            tokens.push(next);
            history.push(next);
            if eos.contains(&next) {
                finish = Finish::Eos;
                break;
            }
            let piece = stream.push(next)?;
            text.push_str(&piece);
            if let Some(at) = o
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                let emit_from = text.len() - piece.len();
                if at > emit_from {
                    on_text(&text[emit_from..at]);
                }
                text.truncate(at);
                finish = Finish::Stop;
                break;
            }
            on_text(&piece);
            if cache.len() >= cache.capacity() {
                break;
            }
            // The last token's logits are only needed when they are kept.
            if tokens.len() >= o.max_tokens && !o.keep_logits {
                break;
            }
            logits = self.model.forward(&[next], &mut cache, which)?;
            steps += 1;
        }
        if finish != Finish::Stop {
            // Flush bytes the stream held back waiting for a UTF-8 boundary.
            let ids: Vec<u32> = tokens
                .iter()
                .copied()
                .filter(|t| !eos.contains(t))
                .collect();
            let full = self.tok.decode(&ids, false)?;
            if full.len() > text.len() && full.starts_with(&text) {
                on_text(&full[text.len()..]);
                text = full;
            }
        }
        Ok(Generation {
            prompt_tokens: prompt.len(),
            tokens,
            text,
            finish,
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
            decode_steps: steps,
            logits: o.keep_logits.then_some(kept),
        })
    }
}
