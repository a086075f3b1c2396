//! Token sampling with mlx-lm's knobs: temperature (0 = greedy), top-k, top-p,
//! min-p, repetition penalty over a recent window, and a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// 0 = greedy (argmax).
    pub temp: f32,
    /// Keep the smallest set of tokens whose probability sums to `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep tokens with probability ≥ `min_p` × the top probability (0 = off).
    pub min_p: f32,
    /// mlx-lm's repetition penalty: positive logits ÷ p, negative × p, for tokens in
    /// the last `repetition_context` tokens (1 = off).
    pub repetition_penalty: f32,
    pub repetition_context: usize,
    pub seed: Option<u64>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temp: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_context: 20,
            seed: None,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        Self::default()
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
    /// (probability, token) scratch, reused every step.
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self {
            cfg,
            rng,
            cand: Vec::new(),
        }
    }

    /// Pick the next token from `logits` `[V]` (modified in place by the penalty);
    /// `history` is every token so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = &self.cfg;
        if c.repetition_penalty != 1.0 {
            let from = history.len().saturating_sub(c.repetition_context);
            for &t in &history[from..] {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l < 0.0 {
                        *l * c.repetition_penalty
                    } else {
                        *l / c.repetition_penalty
                    };
                }
            }
        }
        if c.temp <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.cand.clear();
        self.cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (((l - max) / c.temp).exp(), i as u32)),
        );
        let sum: f32 = self.cand.iter().map(|p| p.0).sum();
        self.cand.iter_mut().for_each(|p| p.0 /= sum);
        self.cand.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut keep = self.cand.len();
        if c.top_k > 0 {
            keep = keep.min(c.top_k);
        }
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let n = self.cand[..keep]
                .iter()
                .take_while(|p| {
                    let before = acc;
                    acc += p.0;
                    before < c.top_p
                })
                .count();
            keep = keep.min(n.max(1));
        }
        if c.min_p > 0.0 {
            let thr = c.min_p * self.cand[0].0;
            keep = keep.min(self.cand.iter().take_while(|p| p.0 >= thr).count().max(1));
        }
        let total: f32 = self.cand[..keep].iter().map(|p| p.0).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(p, t) in &self.cand[..keep] {
            if r < p {
                return t;
            }
            r -= p;
        }
        self.cand[keep - 1].1
    }
}

/// Index of the largest logit (first on ties, like mx.argmax).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_and_penalty_applies() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[]), 1);
        let mut s = Sampler::new(SamplerConfig {
            repetition_penalty: 2.0,
            ..SamplerConfig::greedy()
        });
        // 3.0 / 2 = 1.5 < 2.0: the repeated token loses.
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn filters_restrict_the_support() {
        let logits = [0.0f32, 5.0, 4.9, -3.0, 1.0];
        for (cfg, allowed) in [
            (
                SamplerConfig {
                    temp: 1.0,
                    top_k: 2,
                    ..Default::default()
                },
                vec![1, 2],
            ),
            (
                SamplerConfig {
                    temp: 1.0,
                    top_p: 0.9,
                    ..Default::default()
                },
                vec![1, 2],
            ),
            (
                SamplerConfig {
                    temp: 1.0,
                    min_p: 0.5,
                    ..Default::default()
                },
                vec![1, 2],
            ),
            (
                SamplerConfig {
                    temp: 1.0,
                    top_k: 1,
                    ..Default::default()
                },
                vec![1],
            ),
        ] {
            let mut s = Sampler::new(SamplerConfig {
                seed: Some(7),
                ..cfg
            });
            let mut seen = std::collections::HashSet::new();
            for _ in 0..200 {
                seen.insert(s.sample(&mut logits.clone(), &[]));
            }
            let mut seen: Vec<u32> = seen.into_iter().collect();
            seen.sort();
            assert_eq!(seen, allowed);
        }
    }

    #[test]
    fn seed_makes_sampling_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplerConfig {
                temp: 1.0,
                seed: Some(seed),
                ..Default::default()
            });
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }
}
