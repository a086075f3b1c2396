//! Round-trip error statistics (what `rooftop fidelity` prints).

use serde::Serialize;

/// Error of a reconstruction against its original.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ErrorStats {
    pub mean_abs: f64,
    pub rmse: f64,
    pub max_abs: f64,
    /// 10·log10(Σx² / Σ(x-x̂)²).
    pub snr_db: f64,
}

impl ErrorStats {
    pub fn compute(orig: &[f32], recon: &[f32]) -> Self {
        assert_eq!(orig.len(), recon.len());
        let (mut sa, mut s2, mut mx, mut sig) = (0f64, 0f64, 0f64, 0f64);
        for (&a, &b) in orig.iter().zip(recon) {
            let d = (a - b).abs() as f64;
            sa += d;
            s2 += d * d;
            mx = mx.max(d);
            sig += (a as f64) * (a as f64);
        }
        let n = orig.len().max(1) as f64;
        Self {
            mean_abs: sa / n,
            rmse: (s2 / n).sqrt(),
            max_abs: mx,
            snr_db: if s2 == 0.0 {
                f64::INFINITY
            } else {
                10.0 * (sig / s2).log10()
            },
        }
    }
}
