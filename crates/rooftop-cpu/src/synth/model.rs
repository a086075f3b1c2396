//! The synthetic model's forward pass: embedding → per layer (RMSNorm, q/k/v, q/k
//! norm, RoPE, attention over an f32 KV cache, o_proj, RMSNorm, MoE or dense MLP)
//! → RMSNorm → lm_head. Timed per op, bytes counted per step.

use super::weights::{random, OwnedWeight, Recipe};
use super::Preset;
use crate::acts::QActs;
use crate::attention::{attention, AttnShape};
use crate::gemv::{isa, matmul_multi_on, matmul_on};
use crate::moe::{moe_forward_on, Expert, MoeScratch, MoeWeights, RoutingConfig};
use crate::ops::{rms_norm, rms_norm_inplace, rope, silu_mul};
use crate::pool::Pool;
use crate::CpuError;
use std::time::{Duration, Instant};

/// Time per op class, summed over steps.
#[derive(Clone, Copy, Debug, Default)]
pub struct Breakdown {
    /// q/k/v/o projections, norms and RoPE of q/k, attention over the cache.
    pub attention: Duration,
    /// Of `attention`: q/k norms, RoPE and softmax(q·K)·V over the cache.
    pub attention_core: Duration,
    pub router: Duration,
    /// Routed + shared experts, and dense MLPs.
    pub experts: Duration,
    pub lm_head: Duration,
    /// Embedding, RMSNorms, residuals.
    pub other: Duration,
}

impl Breakdown {
    pub fn total(&self) -> Duration {
        self.attention + self.router + self.experts + self.lm_head + self.other
    }
}

struct Layer {
    q: OwnedWeight,
    k: OwnedWeight,
    v: OwnedWeight,
    o: OwnedWeight,
    mlp: Mlp,
}

// One per layer: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Mlp {
    Dense {
        gate: OwnedWeight,
        up: OwnedWeight,
        down: OwnedWeight,
    },
    Moe(MoeLayer),
}

struct MoeLayer {
    router: OwnedWeight,
    /// Stacked `[E·I, H]`, `[E·I, H]`, `[E·H, I]`.
    gate: OwnedWeight,
    up: OwnedWeight,
    down: OwnedWeight,
    shared: Option<(OwnedWeight, OwnedWeight, OwnedWeight)>,
    correction: Vec<f32>,
}

pub struct SynthModel {
    /// Packed copies of the matmul weights (first field: unregistered before the
    /// weights are freed).
    lanes: crate::lanes::Registered,
    pub preset: Preset,
    pub recipe: Recipe,
    embed: OwnedWeight,
    lm_head: OwnedWeight,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    qk_norm: Vec<f32>,
    /// Per layer `[len, Hk·D]`.
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    pub pos: usize,
    pub times: Breakdown,
    /// Bytes of weights and cache read by the last step.
    pub last_bytes: f64,
    /// Unique experts read per MoE layer in the last step.
    pub last_unique_experts: Vec<usize>,
    moe: MoeScratch,
    acts: Vec<QActs>,
}

impl SynthModel {
    /// Random weights for `preset` in `recipe` (seeded: the same every run).
    pub fn new(preset: &Preset, recipe: &Recipe) -> SynthModel {
        let p = preset;
        let (h, n) = (p.hidden, p.layers);
        let mut seed = 1u64;
        let mut gen = |name: &str, l: usize, rows: usize, cols: usize| {
            seed += 1;
            random(recipe.format(name, l, n), rows, cols, 0.02, seed)
        };
        let layers = (0..n)
            .map(|l| {
                let q = gen("q_proj", l, p.heads * p.head_dim, h);
                let k = gen("k_proj", l, p.kv_heads * p.head_dim, h);
                let v = gen("v_proj", l, p.kv_heads * p.head_dim, h);
                let o = gen("o_proj", l, h, p.heads * p.head_dim);
                let mlp = if l < p.dense_layers {
                    Mlp::Dense {
                        gate: gen("gate_proj", l, p.dense_inter, h),
                        up: gen("up_proj", l, p.dense_inter, h),
                        down: gen("down_proj", l, h, p.dense_inter),
                    }
                } else {
                    let si = p.moe_inter * p.shared_experts;
                    Mlp::Moe(MoeLayer {
                        router: gen("router", l, p.experts, h),
                        gate: gen("gate_proj", l, p.experts * p.moe_inter, h),
                        up: gen("up_proj", l, p.experts * p.moe_inter, h),
                        down: gen("down_proj", l, p.experts * h, p.moe_inter),
                        shared: (si > 0).then(|| {
                            (
                                gen("gate_proj", l, si, h),
                                gen("up_proj", l, si, h),
                                gen("down_proj", l, h, si),
                            )
                        }),
                        correction: vec![0.0; p.experts],
                    })
                };
                Layer { q, k, v, o, mlp }
            })
            .collect();
        let mut m = SynthModel {
            lanes: Default::default(),
            preset: p.clone(),
            recipe: recipe.clone(),
            embed: gen("embed", 0, p.vocab, h),
            lm_head: gen("lm_head", 0, p.vocab, h),
            layers,
            norm: vec![1.0; h],
            qk_norm: vec![1.0; p.head_dim],
            k_cache: vec![Vec::new(); n],
            v_cache: vec![Vec::new(); n],
            pos: 0,
            times: Breakdown::default(),
            last_bytes: 0.0,
            last_unique_experts: Vec::new(),
            moe: MoeScratch::new(),
            acts: (0..3).map(|_| QActs::new()).collect(),
        };
        m.pack_lanes();
        m
    }

    /// Every matmul weight with the rows of the views the step takes of it (experts:
    /// one expert's rows; the embedding is read by rows and stays natural).
    fn matmul_weights(&mut self) -> Vec<(&mut OwnedWeight, usize)> {
        let (h, inter) = (self.preset.hidden, self.preset.moe_inter);
        let mut v: Vec<(&mut OwnedWeight, usize)> = Vec::new();
        let lm = &mut self.lm_head;
        let rows = lm.rows;
        v.push((lm, rows));
        for l in &mut self.layers {
            for w in [&mut l.q, &mut l.k, &mut l.v, &mut l.o] {
                let r = w.rows;
                v.push((w, r));
            }
            match &mut l.mlp {
                Mlp::Dense { gate, up, down } => {
                    for w in [gate, up, down] {
                        let r = w.rows;
                        v.push((w, r));
                    }
                }
                Mlp::Moe(m) => {
                    let r = m.router.rows;
                    v.push((&mut m.router, r));
                    v.push((&mut m.gate, inter));
                    v.push((&mut m.up, inter));
                    v.push((&mut m.down, h));
                    if let Some((g, u, d)) = &mut m.shared {
                        for w in [g, u, d] {
                            let r = w.rows;
                            v.push((w, r));
                        }
                    }
                }
            }
        }
        v
    }

    /// Pack the matmul weights into rows-in-lanes layout ([`crate::lanes`]) and drop
    /// the natural bytes of every weight whose views all got a packed copy: memory
    /// stays one copy. (`ROOFTOP_LANES=0`: nothing packed, natural kernels.)
    fn pack_lanes(&mut self) {
        fn slices(w: &OwnedWeight, split: usize) -> Vec<rooftop_quant::WeightView<'_>> {
            let v = w.view();
            (0..w.rows / split.max(1))
                .map(|i| v.slice_rows(i * split, split))
                .collect()
        }
        // One weight at a time, its natural bytes dropped right after: the peak stays
        // one weight above the model.
        let mut reg = crate::lanes::Registered::default();
        for (w, s) in self.matmul_weights() {
            let r = crate::lanes::pack_all(&slices(w, s));
            let all = !r.is_empty()
                && slices(w, s)
                    .iter()
                    .all(|v| crate::lanes::lookup(v).is_some());
            reg.absorb(r);
            if all {
                w.discard_natural();
            }
        }
        self.lanes = reg;
    }

    /// Bytes of all weights held.
    pub fn weight_bytes(&self) -> usize {
        let mut b = self.embed.view().nbytes() + self.lm_head.view().nbytes();
        for l in &self.layers {
            b += [&l.q, &l.k, &l.v, &l.o]
                .iter()
                .map(|w| w.view().nbytes())
                .sum::<usize>();
            b += match &l.mlp {
                Mlp::Dense { gate, up, down } => {
                    gate.view().nbytes() + up.view().nbytes() + down.view().nbytes()
                }
                Mlp::Moe(m) => {
                    let MoeLayer {
                        router,
                        gate,
                        up,
                        down,
                        shared,
                        ..
                    } = m;
                    router.view().nbytes()
                        + gate.view().nbytes()
                        + up.view().nbytes()
                        + down.view().nbytes()
                        + shared.as_ref().map_or(0, |s| {
                            s.0.view().nbytes() + s.1.view().nbytes() + s.2.view().nbytes()
                        })
                }
            };
        }
        b
    }

    pub fn reset(&mut self) {
        self.pos = 0;
        for c in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            c.clear();
        }
    }

    /// Run `tokens` (a prefill chunk or one decode token) and return the argmax of the
    /// last token's logits.
    pub fn step(&mut self, pool: &Pool, tokens: &[u32]) -> Result<u32, CpuError> {
        let p = self.preset.clone();
        let (h, n) = (p.hidden, tokens.len());
        let isa = isa();
        let kvw = p.kv_heads * p.head_dim;
        let qw = p.heads * p.head_dim;
        let rot = ((p.head_dim as f32 * p.partial_rotary) as usize) & !1;
        let mut bytes = 0f64;
        self.last_unique_experts.clear();
        let mut clock = Clock(Instant::now());
        let mut times = self.times;

        // Embedding rows.
        let mut x = vec![0f32; n * h];
        let ev = self.embed.view();
        for (t, &tok) in tokens.iter().enumerate() {
            ev.row_f32(tok as usize % p.vocab, &mut x[t * h..(t + 1) * h]);
        }
        bytes += n as f64 * ev.nbytes() as f64 / p.vocab as f64;
        let mut xn = vec![0f32; n * h];
        let (mut q, mut k, mut v) = (vec![0f32; n * qw], vec![0f32; n * kvw], vec![0f32; n * kvw]);
        let mut att = vec![0f32; n * qw];
        let mut y = vec![0f32; n * h];
        clock.lap(&mut times.other);
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &self.norm, 1e-6, &mut xn);
            clock.lap(&mut times.other);
            let ws = [layer.q.view(), layer.k.view(), layer.v.view()];
            matmul_multi_on(
                pool,
                isa,
                &ws,
                &xn,
                n,
                &mut [&mut q, &mut k, &mut v],
                &mut self.acts,
            );
            bytes += ws.iter().map(|w| w.nbytes() as f64).sum::<f64>();
            let core0 = Instant::now();
            for t in 0..n {
                let (qt, kt) = (&mut q[t * qw..(t + 1) * qw], &mut k[t * kvw..(t + 1) * kvw]);
                if p.qk_norm {
                    rms_norm_inplace(qt, &self.qk_norm, 1e-6);
                    rms_norm_inplace(kt, &self.qk_norm, 1e-6);
                }
                rope(qt, p.head_dim, rot, self.pos + t, p.rope_theta, true);
                rope(kt, p.head_dim, rot, self.pos + t, p.rope_theta, true);
            }
            self.k_cache[li].extend_from_slice(&k);
            self.v_cache[li].extend_from_slice(&v);
            let shape = AttnShape {
                n_heads: p.heads,
                n_kv_heads: p.kv_heads,
                head_dim: p.head_dim,
                scale: 1.0 / (p.head_dim as f32).sqrt(),
            };
            attention(
                pool,
                &q,
                &self.k_cache[li],
                &self.v_cache[li],
                n,
                shape,
                &mut att,
            );
            bytes += 2.0 * self.k_cache[li].len() as f64 * 4.0;
            times.attention_core += core0.elapsed();
            let ov = layer.o.view();
            matmul_on(pool, isa, &ov, &att, n, &mut y, &mut self.acts[0]);
            bytes += ov.nbytes() as f64;
            clock.lap(&mut times.attention);
            for (a, b) in x.iter_mut().zip(&y) {
                *a += b;
            }
            rms_norm(&x, &self.norm, 1e-6, &mut xn);
            clock.lap(&mut times.other);
            match &layer.mlp {
                Mlp::Dense { gate, up, down } => {
                    let di = gate.rows;
                    let (mut g, mut u) = (vec![0f32; n * di], vec![0f32; n * di]);
                    let ws = [gate.view(), up.view()];
                    matmul_multi_on(
                        pool,
                        isa,
                        &ws,
                        &xn,
                        n,
                        &mut [&mut g, &mut u],
                        &mut self.acts,
                    );
                    silu_mul(&mut g, &u);
                    matmul_on(pool, isa, &down.view(), &g, n, &mut y, &mut self.acts[0]);
                    bytes +=
                        (gate.view().nbytes() + up.view().nbytes() + down.view().nbytes()) as f64;
                    clock.lap(&mut times.experts);
                }
                Mlp::Moe(m) => {
                    let MoeLayer {
                        router,
                        gate,
                        up,
                        down,
                        shared,
                        correction,
                    } = m;
                    let (ne, inter) = (p.experts, p.moe_inter);
                    let (gv, uv, dv) = (gate.view(), up.view(), down.view());
                    let experts: Vec<Expert> = (0..ne)
                        .map(|e| Expert {
                            gate: gv.slice_rows(e * inter, inter),
                            up: uv.slice_rows(e * inter, inter),
                            down: dv.slice_rows(e * h, h),
                        })
                        .collect();
                    let w = MoeWeights {
                        router: router.view(),
                        experts: &experts,
                        shared: shared.as_ref().map(|s| Expert {
                            gate: s.0.view(),
                            up: s.1.view(),
                            down: s.2.view(),
                        }),
                    };
                    let cfg = RoutingConfig {
                        top_k: p.top_k,
                        scoring: p.scoring,
                        norm_topk_prob: p.norm_topk,
                        scaling: 1.0,
                        correction_bias: (p.scoring == crate::moe::Scoring::Sigmoid)
                            .then_some(&correction[..]),
                    };
                    self.moe.timing = true;
                    self.moe.times = Default::default();
                    moe_forward_on(pool, &w, &xn, n, &cfg, &mut y, &mut self.moe)?;
                    times.router += self.moe.times.router;
                    times.experts += self.moe.times.experts;
                    clock = Clock(Instant::now());
                    let mut used = vec![false; ne];
                    for &e in &self.moe.last_routing {
                        used[e as usize] = true;
                    }
                    let uniq = used.iter().filter(|u| **u).count();
                    self.last_unique_experts.push(uniq);
                    let one = experts[0].gate.nbytes()
                        + experts[0].up.nbytes()
                        + experts[0].down.nbytes();
                    bytes += (router.view().nbytes() + uniq * one) as f64;
                    if let Some(s) = &w.shared {
                        bytes += (s.gate.nbytes() + s.up.nbytes() + s.down.nbytes()) as f64;
                    }
                }
            }
            for (a, b) in x.iter_mut().zip(&y) {
                *a += b;
            }
            bytes += 2.0 * h as f64 * 4.0;
            clock.lap(&mut times.other);
        }
        // Final norm and logits of the last token only.
        let last = &x[(n - 1) * h..n * h];
        let mut xl = vec![0f32; h];
        rms_norm(last, &self.norm, 1e-6, &mut xl);
        clock.lap(&mut times.other);
        let lm = self.lm_head.view();
        let mut logits = vec![0f32; p.vocab];
        matmul_on(pool, isa, &lm, &xl, 1, &mut logits, &mut self.acts[0]);
        bytes += lm.nbytes() as f64;
        let next = crate::ops::argmax(&logits) as u32;
        clock.lap(&mut times.lm_head);
        self.times = times;
        self.pos += n;
        self.last_bytes = bytes;
        Ok(next)
    }
}

struct Clock(Instant);

impl Clock {
    /// Add the time since the last lap to `slot`.
    fn lap(&mut self, slot: &mut Duration) {
        let now = Instant::now();
        *slot += now - self.0;
        self.0 = now;
    }
}
