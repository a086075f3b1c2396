//! Quality of a quantized model against its reference, from next-token logits:
//! perplexity of each, and the KL divergence of the quantized model's next-token
//! distribution from the reference's (as `llama-perplexity --kl-divergence` reports).
//!
//! Engine-agnostic: callers feed `[T, V]` logit rows; everything is accumulated in f64.

use serde::Serialize;

/// `log_softmax` of one row, in f64 (logits of big vocabularies lose digits in f32 sums).
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// Per-token scores collected over a text.
#[derive(Clone, Debug, Default)]
pub struct Scores {
    /// −log p(next token) under the model.
    pub nll: Vec<f64>,
    /// KL(reference ‖ model) at each position (empty for the reference itself).
    pub kl: Vec<f64>,
    /// Whether the model's argmax equals the reference's.
    pub top1_same: Vec<bool>,
}

impl Scores {
    /// Score one chunk: `logits` and `reference` are `[T, V]` for `tokens` (`T` long);
    /// position t predicts `tokens[t + 1]`. Pass `reference = None` for the reference.
    pub fn add_chunk(
        &mut self,
        tokens: &[u32],
        logits: &[f32],
        reference: Option<&[f32]>,
        vocab: usize,
    ) {
        for t in 0..tokens.len().saturating_sub(1) {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let lq = log_softmax(row);
            self.nll.push(-lq[tokens[t + 1] as usize]);
            if let Some(r) = reference {
                let rrow = &r[t * vocab..(t + 1) * vocab];
                let lr = log_softmax(rrow);
                let kl: f64 = lr.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum();
                self.kl.push(kl.max(0.0));
                self.top1_same.push(argmax(row) == argmax(rrow));
            }
        }
    }

    pub fn summary(&self, name: &str) -> Summary {
        let n = self.nll.len().max(1) as f64;
        let mean_nll = self.nll.iter().fold(0.0, |a, b| a + b) / n;
        let mut kl = self.kl.clone();
        kl.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if kl.is_empty() {
                0.0
            } else {
                kl[((kl.len() - 1) as f64 * p).round() as usize]
            }
        };
        Summary {
            name: name.to_string(),
            tokens: self.nll.len(),
            perplexity: mean_nll.exp(),
            mean_nll,
            mean_kl: kl.iter().fold(0.0, |a, b| a + b) / kl.len().max(1) as f64,
            median_kl: q(0.5),
            p99_kl: q(0.99),
            max_kl: kl.last().copied().unwrap_or(0.0),
            top1_agreement: if self.top1_same.is_empty() {
                1.0
            } else {
                self.top1_same.iter().filter(|&&s| s).count() as f64 / self.top1_same.len() as f64
            },
        }
    }
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// One row of the comparison table.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub name: String,
    pub tokens: usize,
    pub perplexity: f64,
    pub mean_nll: f64,
    pub mean_kl: f64,
    pub median_kl: f64,
    pub p99_kl: f64,
    pub max_kl: f64,
    /// Fraction of positions where the argmax token agrees with the reference's.
    pub top1_agreement: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_models_have_zero_kl() {
        let v = 5;
        let logits: Vec<f32> = (0..3 * v).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut s = Scores::default();
        s.add_chunk(&[0, 1, 2], &logits, Some(&logits), v);
        let m = s.summary("q");
        assert_eq!(m.tokens, 2);
        assert!(m.mean_kl.abs() < 1e-12 && m.top1_agreement == 1.0);
        // Uniform logits: perplexity = vocabulary size.
        let mut u = Scores::default();
        u.add_chunk(&[0, 1, 2, 3], &vec![0.0; 4 * v], None, v);
        assert!((u.summary("u").perplexity - v as f64).abs() < 1e-9);
    }
}
