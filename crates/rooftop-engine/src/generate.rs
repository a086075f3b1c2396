//! Prefill the prompt in one batch, then decode token by token with a sampler,
//! streaming text and stopping on EOS ids, stop strings or the token limit.

use crate::model::{Cache, Logits, Model};
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
    gpu: Option<&'a rooftop_cuda::CudaDecoder>,
}

/// What one step hands the sampler: logits, or (greedy on the GPU) the token itself,
/// chosen on the device so that only 4 bytes come back.
enum Out {
    Logits(Vec<f32>),
    Token(u32),
}

/// Where the forward passes run. (One per generation: variant sizes are irrelevant.)
#[allow(clippy::large_enum_variant)]
enum Runner<'a> {
    Cpu(&'a Model, Cache, Logits),
    Cuda {
        dec: &'a rooftop_cuda::CudaDecoder,
        state: rooftop_cuda::CudaState,
        /// Pick tokens on the device (greedy sampling and no logits kept).
        device_greedy: bool,
        /// Return every position's logits (`--dump-logits`).
        all: bool,
    },
}

impl Runner<'_> {
    fn run(&mut self, tokens: &[u32]) -> Result<Out> {
        match self {
            Runner::Cpu(m, cache, which) => Ok(Out::Logits(m.forward(tokens, cache, *which)?)),
            Runner::Cuda {
                dec,
                state,
                device_greedy,
                all,
            } => {
                let (last, rest) = tokens.split_last().expect("never empty");
                if let Some(&id) = tokens.iter().find(|&&id| id as usize >= dec.vocab()) {
                    return Err(EngineError::BadToken {
                        id,
                        vocab: dec.vocab(),
                    });
                }
                if state.len() + tokens.len() > state.capacity() {
                    return Err(EngineError::ContextOverflow {
                        tokens: state.len() + tokens.len(),
                        max: state.capacity(),
                    });
                }
                let mut logits = Vec::new();
                if *all {
                    // Logits at every position: token by token through the decode graph.
                    for &t in rest {
                        dec.feed(state, t)?;
                        logits.extend(dec.logits(state)?);
                    }
                } else {
                    // Tensor-core chunks for long prompts, else chunks of 8: each
                    // weight row read once per chunk, not once per token.
                    dec.prefill(state, rest)?;
                }
                if *device_greedy {
                    Ok(Out::Token(dec.feed_greedy(state, *last)?))
                } else {
                    dec.feed(state, *last)?;
                    logits.extend(dec.logits(state)?);
                    Ok(Out::Logits(logits))
                }
            }
        }
    }
    fn full(&self) -> bool {
        match self {
            Runner::Cpu(_, c, _) => c.len() >= c.capacity(),
            Runner::Cuda { state, .. } => state.len() >= state.capacity(),
        }
    }
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a Model, tok: &'a Tokenizer, opts: GenerateOptions) -> Self {
        Self {
            model,
            tok,
            opts,
            gpu: None,
        }
    }

    /// Run the forward passes on the GPU (`model` uploaded with [`Model::to_cuda`]).
    /// Prompts are prefilled in chunks (`CudaDecoder::prefill`: tensor cores from 64
    /// tokens, else 8 tokens a chunk); with greedy sampling the token is chosen on the
    /// device.
    pub fn on_cuda(self, dec: &'a rooftop_cuda::CudaDecoder) -> Self {
        Self {
            gpu: Some(dec),
            ..self
        }
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
        let which = if o.keep_logits {
            Logits::All
        } else {
            Logits::Last
        };
        let greedy = o.sampler.temp == 0.0 && o.sampler.repetition_penalty == 1.0;
        let mut runner = match self.gpu {
            None => Runner::Cpu(self.model, self.model.new_cache(cap), which),
            Some(dec) => Runner::Cuda {
                dec,
                state: dec.new_state(cap)?,
                device_greedy: greedy && !o.keep_logits,
                all: o.keep_logits,
            },
        };
        let mut sampler = Sampler::new(o.sampler.clone());
        let mut eos: Vec<u32> = self.tok.eos_ids().to_vec();
        eos.extend(&o.extra_eos);
        let vocab = self.model.vocab_size();
        let mut kept = Vec::new();

        let t0 = Instant::now();
        let mut out = runner.run(prompt)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let mut history = prompt.to_vec();
        let mut tokens = Vec::new();
        let mut text = String::new();
        // Bytes of `text` already passed to `on_text`.
        let mut emitted = 0;
        let mut stream = self.tok.stream();
        let mut finish = Finish::Length;
        let mut steps = 0;
        let t1 = Instant::now();
        loop {
            if let (true, Out::Logits(l)) = (o.keep_logits, &out) {
                kept.extend_from_slice(l);
            }
            if tokens.len() >= o.max_tokens {
                break;
            }
            let next = match &mut out {
                Out::Logits(logits) => {
                    let n = logits.len();
                    sampler.sample(&mut logits[n - vocab..], &history)
                }
                Out::Token(t) => *t,
            };
            tokens.push(next);
            history.push(next);
            if eos.contains(&next) {
                finish = Finish::Eos;
                break;
            }
            text.push_str(&stream.push(next)?);
            if let Some(at) = o
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                if at > emitted {
                    on_text(&text[emitted..at]);
                }
                text.truncate(at);
                finish = Finish::Stop;
                break;
            }
            // Hold back a tail that could still grow into a stop string.
            let safe = text.len() - held_back(&text, &o.stop_strings);
            if safe > emitted {
                on_text(&text[emitted..safe]);
                emitted = safe;
            }
            if runner.full() {
                break;
            }
            // The last token's logits are only needed when they are kept.
            if tokens.len() >= o.max_tokens && !o.keep_logits {
                break;
            }
            out = runner.run(&[next])?;
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
                text = full;
            }
            if text.len() > emitted {
                on_text(&text[emitted..]);
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

/// Length of the longest suffix of `text` that is a proper prefix of a stop string
/// (on a char boundary).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}
