//! SwiGLU MLP and the mixture-of-experts block: a router picks top-k experts per
//! token, each expert is a SwiGLU MLP, optional shared experts are added.
//!
//! Experts are a list of [`W`] views: slices of a stacked `switch_mlp` tensor
//! `[E, out, in]` or the Hub's separate `experts.{e}` tensors — no copy either way.

use super::{gelu_tanh, silu, Linear};
use crate::model::Scratch;
use crate::store::{Loader, W};
use crate::Result;
use rooftop_gguf::math as ggml;

/// `down(silu(gate(x)) · up(x))` (or GeGLU with [`Mlp::gelu`]).
pub struct Mlp {
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
    pub(crate) gelu: bool,
    /// Activations as ggml computes them (GGUF models: `rooftop_gguf::math`).
    ggml: bool,
}

impl Mlp {
    /// `{prefix}.gate_proj/up_proj/down_proj` (names overridable for Mixtral's w1/w3/w2).
    pub fn load(l: &Loader, prefix: &str, hidden: usize, inter: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            gate: Linear::load(l, &format!("{prefix}.gate_proj"), inter, hidden, bias)?,
            up: Linear::load(l, &format!("{prefix}.up_proj"), inter, hidden, bias)?,
            down: Linear::load(l, &format!("{prefix}.down_proj"), hidden, inter, bias)?,
            gelu: false,
            ggml: l.ggml_numerics(),
        })
    }
    /// GeGLU: `down(gelu_tanh(gate(x)) · up(x))` (gemma).
    pub fn gelu(self) -> Self {
        Self { gelu: true, ..self }
    }
    pub fn inter(&self) -> usize {
        self.gate.out_dim()
    }
    fn has_bias(&self) -> bool {
        self.gate.bias.is_some() || self.up.bias.is_some() || self.down.bias.is_some()
    }
    /// x `[T, D]` → out `[T, D]`.
    pub fn forward(&self, x: &[f32], t: usize, s: &mut Scratch, out: &mut [f32]) {
        let i = self.inter();
        let (g, u) = (&mut s.g[..t * i], &mut s.u[..t * i]);
        self.gate.forward(x, t, g);
        self.up.forward(x, t, u);
        let act = match (self.gelu, self.ggml) {
            (true, true) => ggml::gelu,
            (true, false) => gelu_tanh,
            (false, true) => ggml::silu,
            (false, false) => silu,
        };
        g.iter_mut()
            .zip(u.iter())
            .for_each(|(g, u)| *g = act(*g) * u);
        self.down.forward(g, t, out);
    }
}

/// Per-expert SwiGLU weights.
pub struct Experts {
    pub(crate) gate: Vec<W>, // E × [I, D]
    pub(crate) up: Vec<W>,   // E × [I, D]
    pub(crate) down: Vec<W>, // E × [D, I]
}

impl Experts {
    /// Stacked `{stacked}.{gate,up,down}_proj` `[E, out, in]` if present, else per expert
    /// `{per_expert}.{e}.{names[i]}` (Hub layout; `names` = gate, up, down as the
    /// checkpoint spells them, e.g. Mixtral's `w1, w3, w2`).
    pub fn load(
        l: &Loader,
        stacked: &str,
        per_expert: &str,
        names: [&str; 3],
        n: usize,
        hidden: usize,
        inter: usize,
    ) -> Result<Self> {
        let dims = [(inter, hidden), (inter, hidden), (hidden, inter)];
        let mut out: [Vec<W>; 3] = Default::default();
        for (k, proj) in ["gate_proj", "up_proj", "down_proj"].iter().enumerate() {
            let (r, c) = dims[k];
            let sp = format!("{stacked}.{proj}");
            out[k] = if l.has(&format!("{sp}.weight")) {
                l.weight(&sp, &[n], r, c)?
            } else {
                (0..n)
                    .map(|e| {
                        let p = format!("{per_expert}.{e}.{}", names[k]);
                        Ok(l.weight_keyed(&p, &sp, &[], r, c)?.remove(0))
                    })
                    .collect::<Result<_>>()?
            };
        }
        let [gate, up, down] = out;
        Ok(Self { gate, up, down })
    }
    pub fn len(&self) -> usize {
        self.gate.len()
    }
    pub fn is_empty(&self) -> bool {
        self.gate.is_empty()
    }
    pub fn inter(&self) -> usize {
        self.gate[0].rows()
    }
}

/// How a token's experts and their weights are chosen from router logits.
pub enum Router {
    /// Softmax over all experts, top-k, optionally renormalized (qwen3_moe, qwen2_moe).
    SoftmaxTopK { norm_topk_prob: bool },
    /// Top-k logits, softmax over those k (mixtral).
    TopKSoftmax,
    /// DeepSeek-V3 / GLM-4.5 `noaux_tc`: sigmoid scores plus a correction bias pick
    /// the experts (best `topk_group` of `n_group` groups first, a group scored by
    /// its top two); weights are the uncorrected sigmoids, optionally renormalized,
    /// times `routed_scaling_factor`.
    GroupSigmoid {
        bias: Vec<f32>,
        n_group: usize,
        topk_group: usize,
        scaling: f32,
        norm_topk_prob: bool,
    },
}

impl Router {
    /// Logits `[E]` → `sel` = k (expert, weight) pairs. `tmp` is `[E]` scratch.
    fn select(
        &self,
        logits: &[f32],
        k: usize,
        tmp: &mut Vec<(f32, usize)>,
        sel: &mut Vec<(usize, f32)>,
    ) {
        let e = logits.len();
        sel.clear();
        tmp.clear();
        let desc = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0);
        match self {
            Router::SoftmaxTopK { norm_topk_prob } => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = logits.iter().map(|v| (v - max).exp()).sum();
                tmp.extend(
                    logits
                        .iter()
                        .enumerate()
                        .map(|(i, v)| ((v - max).exp() / sum, i)),
                );
                tmp.select_nth_unstable_by(k - 1, desc);
                let mut tot: f32 = tmp[..k].iter().map(|p| p.0).sum();
                if !norm_topk_prob {
                    tot = 1.0;
                }
                sel.extend(tmp[..k].iter().map(|&(p, i)| (i, p / tot)));
            }
            Router::TopKSoftmax => {
                tmp.extend(logits.iter().enumerate().map(|(i, &v)| (v, i)));
                tmp.select_nth_unstable_by(k - 1, desc);
                let max = tmp[..k].iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.0));
                let sum: f32 = tmp[..k].iter().map(|p| (p.0 - max).exp()).sum();
                sel.extend(tmp[..k].iter().map(|&(v, i)| (i, (v - max).exp() / sum)));
            }
            Router::GroupSigmoid {
                bias,
                n_group,
                topk_group,
                scaling,
                norm_topk_prob,
            } => {
                let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
                tmp.extend(
                    logits
                        .iter()
                        .zip(bias)
                        .enumerate()
                        .map(|(i, (&v, b))| (sig(v) + b, i)),
                );
                if *n_group > 1 {
                    let gsz = e / n_group;
                    // Group score = sum of its top two; the weakest n_group - topk_group
                    // groups are zeroed (set to 0.0, as mlx-lm does — not -inf).
                    // `sel` holds (group, score) here; it is refilled below.
                    for g in 0..*n_group {
                        let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                        for p in &tmp[g * gsz..(g + 1) * gsz] {
                            if p.0 > a {
                                (a, b) = (p.0, a);
                            } else if p.0 > b {
                                b = p.0;
                            }
                        }
                        sel.push((g, if gsz > 1 { a + b } else { a }));
                    }
                    sel.sort_by(|x, y| x.1.total_cmp(&y.1));
                    for &(g, _) in &sel[..n_group - topk_group] {
                        tmp[g * gsz..(g + 1) * gsz]
                            .iter_mut()
                            .for_each(|p| p.0 = 0.0);
                    }
                    sel.clear();
                }
                tmp.select_nth_unstable_by(k - 1, desc);
                sel.extend(tmp[..k].iter().map(|&(_, i)| (i, sig(logits[i]))));
                let tot: f32 = if k > 1 && *norm_topk_prob {
                    sel.iter().map(|p| p.1).sum()
                } else {
                    1.0
                };
                sel.iter_mut().for_each(|p| p.1 = p.1 / tot * scaling);
            }
        }
    }
}

/// Router + routed experts (+ shared experts).
pub struct Moe {
    pub gate: Linear,
    pub router: Router,
    pub experts: Experts,
    pub top_k: usize,
    pub shared: Option<Mlp>,
}

impl Moe {
    /// llama.cpp's `build_moe_ffn` for softmax routers (GGUF models): `ggml_soft_max`
    /// of the router logits, top-k in descending order, weights renormalized by their
    /// f64 sum, each expert's down output times its weight, summed in that order
    /// (one token at a time: exact, not yet batched per expert for prompts).
    fn forward_ggml(&self, x: &[f32], t: usize, norm: bool, s: &mut Scratch, out: &mut [f32]) {
        let d = x.len() / t;
        let (ne, k, inter) = (self.experts.len(), self.top_k, self.experts.inter());
        for i in 0..t {
            let probs = &mut s.router[i * ne..(i + 1) * ne];
            ggml::softmax(probs);
            let mut order: Vec<usize> = (0..ne).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let mut w: Vec<f32> = order[..k].iter().map(|&e| probs[e]).collect();
            if norm {
                let sum = w.iter().map(|&v| v as f64).sum::<f64>() as f32;
                w.iter_mut().for_each(|v| *v /= sum);
            }
            let xi = &x[i * d..(i + 1) * d];
            let o = &mut out[i * d..(i + 1) * d];
            let (g, u, ye) = (&mut s.g[..inter], &mut s.u[..inter], &mut s.ye[..d]);
            for (rank, (&e, &we)) in order[..k].iter().zip(&w).enumerate() {
                rooftop_cpu::matmul(&self.experts.gate[e], xi, 1, g); // [I]
                rooftop_cpu::matmul(&self.experts.up[e], xi, 1, u); // [I]
                g.iter_mut()
                    .zip(u.iter())
                    .for_each(|(g, u)| *g = ggml::silu(*g) * u);
                rooftop_cpu::matmul(&self.experts.down[e], g, 1, ye); // [D]
                for (o, y) in o.iter_mut().zip(ye.iter()) {
                    *o = if rank == 0 { y * we } else { *o + y * we };
                }
            }
        }
    }

    /// All selected experts (and the shared expert) in rooftop-cpu's fused step: the
    /// gate/up row blocks of every selected expert are one parallel region, down the
    /// next. `s.route` holds (expert, token, weight) in token order. Returns false
    /// (caller runs the per-expert loop) when the shared expert has biases.
    fn fused(&self, x: &[f32], t: usize, s: &Scratch, out: &mut [f32]) -> bool {
        use rooftop_cpu::moe::{experts_forward_on, Expert, MoeScratch};
        if self.shared.as_ref().is_some_and(|m| m.has_bias()) {
            return false;
        }
        let ex = &self.experts;
        let experts: Vec<Expert> = (0..ex.len())
            .map(|e| Expert {
                gate: ex.gate[e],
                up: ex.up[e],
                down: ex.down[e],
            })
            .collect();
        let shared = self.shared.as_ref().map(|m| Expert {
            gate: m.gate.w,
            up: m.up.w,
            down: m.down.w,
        });
        let chosen: Vec<(u32, f32)> = s.route.iter().map(|r| (r.0, r.2)).collect();
        thread_local! {
            static MOE: std::cell::RefCell<MoeScratch> = std::cell::RefCell::new(MoeScratch::new());
        }
        MOE.with(|m| {
            let mut m = m.borrow_mut();
            let pool = rooftop_cpu::pool::Pool::global();
            experts_forward_on(
                pool,
                &experts,
                shared.as_ref(),
                x,
                t,
                self.top_k,
                &chosen,
                out,
                &mut m,
            )
            .is_ok()
        })
    }

    /// x `[T, D]` → out `[T, D]`. Tokens are grouped by expert so each expert's
    /// weights are streamed once per step, with all of its tokens as one batch.
    pub fn forward(&self, x: &[f32], t: usize, s: &mut Scratch, out: &mut [f32]) {
        let d = x.len() / t;
        let ne = self.experts.len();
        let logits = &mut s.router[..t * ne];
        self.gate.forward_router(x, t, logits); // [T, E]
                                                // Shared experts (qwen2moe) are not on this path yet.
        if matches!(self.gate.w, W::Gguf(_)) && self.shared.is_none() {
            if let Router::SoftmaxTopK { norm_topk_prob } = self.router {
                return self.forward_ggml(x, t, norm_topk_prob, s, out);
            }
        }
        s.route.clear();
        for i in 0..t {
            self.router.select(
                &logits[i * ne..(i + 1) * ne],
                self.top_k,
                &mut s.rtmp,
                &mut s.sel,
            );
            s.route
                .extend(s.sel.iter().map(|&(e, w)| (e as u32, i as u32, w)));
        }
        if self.fused(x, t, s, out) {
            return;
        }
        s.route.sort_by_key(|r| (r.0, r.1));
        out.fill(0.0);
        let inter = self.experts.inter();
        let mut a = 0;
        while a < s.route.len() {
            let e = s.route[a].0;
            let b = a + s.route[a..].iter().take_while(|r| r.0 == e).count();
            let c = b - a;
            let (xe, g, u, ye) = (
                &mut s.xe[..c * d],
                &mut s.g[..c * inter],
                &mut s.u[..c * inter],
                &mut s.ye[..c * d],
            );
            for (j, r) in s.route[a..b].iter().enumerate() {
                let tok = r.1 as usize;
                xe[j * d..(j + 1) * d].copy_from_slice(&x[tok * d..(tok + 1) * d]);
            }
            let e = e as usize;
            rooftop_cpu::matmul(&self.experts.gate[e], xe, c, g); // [c, I]
            rooftop_cpu::matmul(&self.experts.up[e], xe, c, u); // [c, I]
            g.iter_mut()
                .zip(u.iter())
                .for_each(|(g, u)| *g = silu(*g) * u);
            rooftop_cpu::matmul(&self.experts.down[e], g, c, ye); // [c, D]
            for (j, r) in s.route[a..b].iter().enumerate() {
                let tok = r.1 as usize;
                let o = &mut out[tok * d..(tok + 1) * d];
                o.iter_mut()
                    .zip(&ye[j * d..(j + 1) * d])
                    .for_each(|(o, y)| *o += r.2 * y);
            }
            a = b;
        }
        if let Some(sh) = &self.shared {
            let y = std::mem::take(&mut s.shared);
            let mut y = y;
            sh.forward(x, t, s, &mut y[..t * d]);
            out.iter_mut().zip(&y[..t * d]).for_each(|(o, y)| *o += y);
            s.shared = y;
        }
    }
}
