//! The fused MoE step: router → top-k → gate/up of every selected expert → SiLU·mul →
//! down → weighted sum (+ shared expert), as two parallel regions (gate/up, down).
//!
//! Legend: T = tokens in the step, H = hidden, I = expert intermediate, E = experts,
//! K = experts per token, A = experts active in the step (≤ min(E, T·K)).
//!
//! Why fused: at batch 1 each expert matrix is ~1 MB, a few tens of µs to stream; a
//! region per matrix would pay a wake-up and a join per matrix (24 per layer for
//! top-8). Here the gate/up row blocks of all active experts are one region's items,
//! and the down row blocks (each covering every active expert) the next one's, so the
//! work is balanced no matter how many tokens picked each expert.

use crate::acts::QActs;
use crate::gemv::{
    isa, plan, prepare, rows_kernel, with_scratch, Plan, Prepared, RowArgs, SyncPtr,
};
use crate::pool::Pool;
use crate::CpuError;
use rooftop_quant::WeightView;
use std::time::{Duration, Instant};

/// One expert's three projections: gate/up `[I, H]`, down `[H, I]`.
#[derive(Clone, Copy, Debug)]
pub struct Expert<'a> {
    pub gate: WeightView<'a>,
    pub up: WeightView<'a>,
    pub down: WeightView<'a>,
}

/// An MoE block's weights, borrowed. Stacked `[E·I, H]` tensors become per-expert
/// views with [`WeightView::slice_rows`] (no copy).
#[derive(Clone, Copy, Debug)]
pub struct MoeWeights<'a> {
    /// `[E, H]`
    pub router: WeightView<'a>,
    pub experts: &'a [Expert<'a>],
    /// Always-on expert added with weight 1 (GLM-4.5, DeepSeek-V3).
    pub shared: Option<Expert<'a>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// softmax over all experts, then top-k (Qwen3-MoE, OLMoE).
    Softmax,
    /// sigmoid per expert; top-k chosen on score + correction bias (GLM-4.5, DeepSeek-V3).
    Sigmoid,
}

/// How tokens pick experts.
#[derive(Clone, Copy, Debug)]
pub struct RoutingConfig<'a> {
    pub top_k: usize,
    pub scoring: Scoring,
    /// Renormalize the K selected weights to sum to 1.
    pub norm_topk_prob: bool,
    /// Multiplies the routed experts' weights (GLM: `routed_scaling_factor`).
    pub scaling: f32,
    /// `[E]` added to scores for selection only (`e_score_correction_bias`).
    pub correction_bias: Option<&'a [f32]>,
}

/// Where time went in the last step (filled when `MoeScratch::timing` is on).
#[derive(Clone, Copy, Debug, Default)]
pub struct MoeTimes {
    pub router: Duration,
    pub experts: Duration,
}

/// Buffers reused across steps; one per model is enough.
#[derive(Default)]
pub struct MoeScratch {
    acts_x: Vec<QActs>,
    /// The router's two-term activations (`matmul_fine_on`).
    fine: crate::gemv::FineScratch,
    logits: Vec<f32>,
    /// `[T, K]` chosen (expert, weight).
    chosen: Vec<(u32, f32)>,
    /// Active experts: (expert index or E for shared, tokens, weights).
    active: Vec<Active>,
    /// `[Σ_a T_a · I_a]` SiLU(gate)·up.
    h: Vec<f32>,
    acts_h: Vec<QActs>,
    pub timing: bool,
    pub times: MoeTimes,
    /// Experts routed to in the last step, per token (for routing statistics).
    pub last_routing: Vec<u32>,
}

#[derive(Default, Clone)]
struct Active {
    expert: usize,
    tokens: Vec<u32>,
    weights: Vec<f32>,
    /// Offset of this expert's `[T_a, I]` block in `h`.
    h_off: usize,
    /// Offset in the concatenated gate/up row space.
    row_off: usize,
}

impl MoeScratch {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Routing of one token: scores → top-k (expert, weight) pairs.
pub fn route(logits: &[f32], cfg: &RoutingConfig, out: &mut Vec<(u32, f32)>) {
    let e = logits.len();
    let scores: Vec<f32> = match cfg.scoring {
        Scoring::Softmax => {
            let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let ex: Vec<f32> = logits.iter().map(|&l| (l - m).exp()).collect();
            let s: f32 = ex.iter().sum();
            ex.iter().map(|v| v / s).collect()
        }
        Scoring::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
    };
    let mut idx: Vec<u32> = (0..e as u32).collect();
    let key = |i: u32| scores[i as usize] + cfg.correction_bias.map_or(0.0, |b| b[i as usize]);
    // Descending by selection score; ties to the lower index (stable).
    idx.sort_by(|&a, &b| {
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let k = cfg.top_k.min(e);
    let start = out.len();
    for &i in &idx[..k] {
        out.push((i, scores[i as usize]));
    }
    if cfg.norm_topk_prob {
        let s: f32 = out[start..].iter().map(|p| p.1).sum();
        if s > 0.0 {
            for p in &mut out[start..] {
                p.1 /= s;
            }
        }
    }
    for p in &mut out[start..] {
        p.1 *= cfg.scaling;
    }
}

fn check(w: &MoeWeights, h: usize) -> Result<(), CpuError> {
    let shape = |what: &str, v: &WeightView, r: usize, c: usize| {
        if v.rows() != r || v.cols() != c {
            Err(CpuError::Shape(format!(
                "moe {what}: expected [{r}, {c}], got [{}, {}]",
                v.rows(),
                v.cols()
            )))
        } else {
            Ok(())
        }
    };
    shape("router", &w.router, w.experts.len(), h)?;
    for (i, e) in w.experts.iter().chain(w.shared.iter()).enumerate() {
        let inter = e.gate.rows();
        shape(&format!("expert {i} gate"), &e.gate, inter, h)?;
        shape(&format!("expert {i} up"), &e.up, inter, h)?;
        shape(&format!("expert {i} down"), &e.down, h, inter)?;
    }
    Ok(())
}

/// `out[T, H] = MoE(x[T, H])` on the global pool.
pub fn moe_forward(
    w: &MoeWeights,
    x: &[f32],
    n: usize,
    cfg: &RoutingConfig,
    out: &mut [f32],
    s: &mut MoeScratch,
) -> Result<(), CpuError> {
    moe_forward_on(Pool::global(), w, x, n, cfg, out, s)
}

pub fn moe_forward_on(
    pool: &Pool,
    w: &MoeWeights,
    x: &[f32],
    n: usize,
    cfg: &RoutingConfig,
    out: &mut [f32],
    s: &mut MoeScratch,
) -> Result<(), CpuError> {
    let hid = w.router.cols();
    let ne = w.experts.len();
    if x.len() != n * hid || out.len() != n * hid {
        return Err(CpuError::Shape(format!(
            "moe: x and out must be [{n}, {hid}], got {} and {} elements",
            x.len(),
            out.len()
        )));
    }
    if ne == 0 {
        return Err(CpuError::Shape("moe: no experts".into()));
    }
    check(w, hid)?;
    let isa = isa();
    let t_start = Instant::now();

    // Router, then top-k. Its logits choose experts: x with its int8 rounding residual
    // as a second term (~15 bits; `matmul_fine_on`), so int8 noise flips no near-ties.
    s.logits.resize(n * ne, 0.0);
    crate::gemv::matmul_fine_on(pool, isa, &w.router, x, n, &mut s.logits, &mut s.fine);
    s.chosen.clear();
    for t in 0..n {
        route(&s.logits[t * ne..(t + 1) * ne], cfg, &mut s.chosen);
    }
    let t_router = t_start.elapsed();
    let chosen = std::mem::take(&mut s.chosen);
    let r = experts_forward_on(
        pool,
        w.experts,
        w.shared.as_ref(),
        x,
        n,
        cfg.top_k.min(ne),
        &chosen,
        out,
        s,
    );
    s.chosen = chosen;
    if s.timing {
        s.times.router += t_router;
    }
    r
}

/// The expert half of the MoE step with routing chosen by the caller (models whose
/// router this module does not implement, e.g. grouped top-k): `chosen` is `[T, K]`
/// (expert, weight) pairs. `out[T, H] = Σ_k weight·expert(x) (+ shared(x))`.
#[allow(clippy::too_many_arguments)]
pub fn experts_forward_on(
    pool: &Pool,
    experts: &[Expert],
    shared: Option<&Expert>,
    x: &[f32],
    n: usize,
    k: usize,
    chosen: &[(u32, f32)],
    out: &mut [f32],
    s: &mut MoeScratch,
) -> Result<(), CpuError> {
    let ne = experts.len();
    if ne == 0 || chosen.len() != n * k || chosen.iter().any(|c| c.0 as usize >= ne) {
        return Err(CpuError::Shape(format!(
            "moe: routing must be [{n}, {k}] pairs of experts below {ne}, got {} pairs",
            chosen.len()
        )));
    }
    let hid = experts[0].gate.cols();
    if x.len() != n * hid || out.len() != n * hid {
        return Err(CpuError::Shape(format!(
            "moe: x and out must be [{n}, {hid}], got {} and {} elements",
            x.len(),
            out.len()
        )));
    }
    let t_start = Instant::now();
    let isa = isa();
    let gplan = plan(&experts[0].gate, isa);
    let dplan = plan(&experts[0].down, isa);
    s.acts_x.resize_with(2, QActs::new);
    s.last_routing.clear();
    s.last_routing.extend(chosen.iter().map(|c| c.0));
    // Group tokens by expert.
    let mut slot_of = vec![usize::MAX; ne + 1];
    let mut nact = 0;
    for t in 0..n {
        for &(e, wt) in &chosen[t * k..(t + 1) * k] {
            let e = e as usize;
            if slot_of[e] == usize::MAX {
                slot_of[e] = nact;
                if s.active.len() <= nact {
                    s.active.push(Active::default());
                }
                let a = &mut s.active[nact];
                a.expert = e;
                a.tokens.clear();
                a.weights.clear();
                nact += 1;
            }
            let a = &mut s.active[slot_of[e]];
            a.tokens.push(t as u32);
            a.weights.push(wt);
        }
    }
    if shared.is_some() {
        if s.active.len() <= nact {
            s.active.push(Active::default());
        }
        let a = &mut s.active[nact];
        a.expert = ne;
        a.tokens.clear();
        a.tokens.extend(0..n as u32);
        a.weights.clear();
        a.weights.resize(n, 1.0);
        nact += 1;
    }
    let expert = |e: usize| {
        if e == ne {
            shared.expect("slot ne is the shared expert")
        } else {
            &experts[e]
        }
    };
    let (mut h_off, mut row_off) = (0, 0);
    for a in &mut s.active[..nact] {
        let inter = expert(a.expert).gate.rows();
        a.h_off = h_off;
        a.row_off = row_off;
        h_off += a.tokens.len() * inter;
        row_off += inter;
    }
    s.h.resize(h_off, 0.0);
    s.acts_h.resize_with(nact.max(s.acts_h.len()), QActs::new);
    let dspec = match &experts[0].down {
        WeightView::Quant(q) => Some(q.spec),
        _ => None,
    };
    // h chunks owned by one thread must cover whole activation blocks and groups.
    let align = crate::gemv::ROW_ALIGN.max(dspec.map_or(0, |sp| sp.group_size));
    for (a, qa) in s.active[..nact].iter().zip(&mut s.acts_h) {
        if let (Plan::Int(layout), Some(spec)) = (dplan, dspec) {
            qa.reset(a.tokens.len(), expert(a.expert).down.cols(), spec, layout);
        }
    }

    // Packed copies of each active expert's gate, up, down (held for the step).
    let lanes: Vec<[Option<std::sync::Arc<crate::lanes::Lanes8>>; 3]> = s.active[..nact]
        .iter()
        .map(|a| {
            let ex = expert(a.expert);
            [&ex.gate, &ex.up, &ex.down].map(crate::lanes::lookup)
        })
        .collect();
    // Gathered x rows per active expert for gate/up (decode: T = 1, no gather).
    let pg = prepare(&experts[0].gate, gplan, x, n, &mut s.acts_x[1]);
    let active = &s.active[..nact];
    let hp = SyncPtr(s.h.as_mut_ptr());
    let outp = SyncPtr(out.as_mut_ptr());
    let acts_h = SyncQ(s.acts_h.as_mut_ptr());
    // Gathered once per expert (prefill); decode uses the step's activations as is.
    let subs: Vec<SubTokens> = active
        .iter()
        .map(|a| SubTokens::new(&pg, &a.tokens, n))
        .collect();
    // Region 1 items: row blocks (multiples of `align`) of each active expert's
    // gate/up, sized as `rows_per_item` for all active gate+up rows together.
    let total: usize = active.iter().map(|a| expert(a.expert).gate.rows()).sum();
    let gu_step = crate::gemv::rows_per_item(total, 2 * hid, pool.threads()) / align * align;
    let gu_step = gu_step.max(align);
    let mut items: Vec<(usize, usize, usize)> = Vec::new();
    for (ai, a) in active.iter().enumerate() {
        let inter = expert(a.expert).gate.rows();
        let mut r = 0;
        while r < inter {
            items.push((ai, r, (r + gu_step).min(inter)));
            r += gu_step;
        }
    }
    pool.run(items.len(), &|it| {
        let (ai, r0, r1) = items[it];
        let a = &active[ai];
        let ex = expert(a.expert);
        let inter = ex.gate.rows();
        let nt = a.tokens.len();
        let mut g = vec![0f32; nt * (r1 - r0)];
        let mut u = vec![0f32; nt * (r1 - r0)];
        if let Some(l) = &lanes[ai][1] {
            l.prefetch(r0..r1, expert_pf());
        }
        for (wv, buf, l) in [
            (&ex.gate, &mut g, &lanes[ai][0]),
            (&ex.up, &mut u, &lanes[ai][1]),
        ] {
            let r = RowArgs {
                w: *wv,
                rows: r0..r1,
                y: buf.as_mut_ptr(),
                stride: r1 - r0,
                row0: r0,
                alpha: None,
                tok_map: None,
                lanes: l.as_deref(),
            };
            with_scratch(|scr| subs[ai].run(isa, gplan, &r, nt, scr));
        }
        // SiLU(gate)·up into h, then quantize these columns of h for down.
        // SAFETY: this item owns columns [r0, r1) of expert slot ai.
        let hrow = unsafe { std::slice::from_raw_parts_mut({ hp }.0.add(a.h_off), nt * inter) };
        for t in 0..nt {
            for j in 0..r1 - r0 {
                let gv = g[t * (r1 - r0) + j];
                hrow[t * inter + r0 + j] = gv / (1.0 + (-gv).exp()) * u[t * (r1 - r0) + j];
            }
        }
        if let Plan::Int(_) = dplan {
            for t in 0..nt {
                unsafe { QActs::quantize_range({ acts_h }.0.add(ai), hrow, t, r0, r1) };
            }
        }
    });
    // Region 2 items: row blocks of out; each runs down of every active expert.
    let step = crate::gemv::rows_per_item(hid, experts[0].down.cols(), pool.threads());
    let blocks = hid.div_ceil(step);
    pool.run(blocks, &|b| {
        let (lo, hi) = (b * step, ((b + 1) * step).min(hid));
        for t in 0..n {
            // SAFETY: rows lo..hi of out belong to this item.
            let o =
                unsafe { std::slice::from_raw_parts_mut({ outp }.0.add(t * hid + lo), hi - lo) };
            o.fill(0.0);
        }
        for (ai, a) in active.iter().enumerate() {
            let ex = expert(a.expert);
            let nt = a.tokens.len();
            let inter = ex.down.cols();
            let hslice = unsafe { std::slice::from_raw_parts({ hp }.0.add(a.h_off), nt * inter) };
            let p = match dplan {
                Plan::Int(_) => Prepared::Int(unsafe { &*{ acts_h }.0.add(ai) }),
                _ => Prepared::Float(hslice),
            };
            let r = RowArgs {
                w: ex.down,
                rows: lo..hi,
                y: { outp }.0,
                stride: hid,
                row0: 0,
                alpha: Some(&a.weights),
                tok_map: Some(&a.tokens),
                lanes: lanes[ai][2].as_deref(),
            };
            if let Some(Some(l)) = lanes.get(ai + 1).map(|l| &l[2]) {
                l.prefetch(lo..hi, expert_pf());
            }
            with_scratch(|scr| unsafe { rows_kernel(isa, dplan, &r, &p, nt, scr) });
        }
    });
    if s.timing {
        s.times.experts += t_start.elapsed();
    }
    Ok(())
}

/// Bytes of the next expert's packed rows fetched ahead (`ROOFTOP_EXPERT_PF` for
/// A/B). Measured (12-layer qwen3-30b-a3b bench, 2 threads, three quiet pairs): expert
/// time 11.9 → 11.5 ms/token with 4 KiB.
fn expert_pf() -> usize {
    static B: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    crate::gemv::knob(&B, "ROOFTOP_EXPERT_PF", 4096)
}

#[derive(Clone, Copy)]
struct SyncQ(*mut QActs);
// SAFETY: items touch disjoint column ranges; region 2 reads after region 1 ends.
unsafe impl Send for SyncQ {}
unsafe impl Sync for SyncQ {}

/// Gate/up input for the tokens routed to one expert: when the expert has every
/// token (decode, shared expert) the step's activations are used as they are;
/// otherwise the rows are gathered once into a per-thread copy.
enum SubTokens<'a> {
    All(&'a Prepared<'a>),
    Int(QActs),
    Float(Vec<f32>),
}

impl<'a> SubTokens<'a> {
    fn new(full: &'a Prepared<'a>, tokens: &[u32], n: usize) -> Self {
        if tokens.len() == n && tokens.iter().enumerate().all(|(i, &t)| i as u32 == t) {
            return SubTokens::All(full);
        }
        match full {
            Prepared::Int(a) => SubTokens::Int(a.gather(tokens)),
            Prepared::Float(x) => {
                let cols = x.len() / n;
                let mut g = Vec::with_capacity(tokens.len() * cols);
                for &t in tokens {
                    g.extend_from_slice(&x[t as usize * cols..(t as usize + 1) * cols]);
                }
                SubTokens::Float(g)
            }
        }
    }
    fn run(&self, isa: crate::Isa, plan: Plan, r: &RowArgs, nt: usize, scr: &mut Vec<f32>) {
        // SAFETY: `r.y` is a [nt, rows] buffer owned by the calling thread.
        unsafe {
            match self {
                SubTokens::All(p) => rows_kernel(isa, plan, r, p, nt, scr),
                SubTokens::Int(a) => rows_kernel(isa, plan, r, &Prepared::Int(a), nt, scr),
                SubTokens::Float(x) => rows_kernel(isa, plan, r, &Prepared::Float(x), nt, scr),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul_ref;
    use rand::{Rng, SeedableRng};
    use rooftop_quant::{quantize, DType, QuantSpec, QuantizeOptions, Quantized};

    fn q(rows: usize, cols: usize, spec: QuantSpec, rng: &mut impl Rng) -> Quantized {
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        quantize("w", &w, &[rows, cols], spec, QuantizeOptions::default()).unwrap()
    }

    /// A random f32 router `[ne, h]` (as bytes) and ne + 1 experts' gate, up, down in
    /// `spec` (the last one serves as the shared expert).
    fn random_moe(
        ne: usize,
        h: usize,
        inter: usize,
        spec: QuantSpec,
        rng: &mut impl Rng,
    ) -> (Vec<u8>, Vec<[Quantized; 3]>) {
        let rf: Vec<f32> = (0..ne * h).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mats = (0..ne + 1)
            .map(|_| {
                [
                    q(inter, h, spec, rng),
                    q(inter, h, spec, rng),
                    q(h, inter, spec, rng),
                ]
            })
            .collect();
        (bytemuck::cast_slice(&rf).to_vec(), mats)
    }

    fn expert_views(mats: &[[Quantized; 3]]) -> Vec<Expert<'_>> {
        mats.iter()
            .map(|m| Expert {
                gate: WeightView::Quant(m[0].view()),
                up: WeightView::Quant(m[1].view()),
                down: WeightView::Quant(m[2].view()),
            })
            .collect()
    }

    /// Plain MoE: f32 routing and `matmul_ref` per expert.
    fn reference(w: &MoeWeights, x: &[f32], n: usize, cfg: &RoutingConfig) -> Vec<f32> {
        let h = w.router.cols();
        let ne = w.experts.len();
        let mut out = vec![0f32; n * h];
        for t in 0..n {
            let xt = &x[t * h..(t + 1) * h];
            let mut logits = vec![0f32; ne];
            matmul_ref(&w.router, xt, 1, &mut logits);
            let mut ch = Vec::new();
            route(&logits, cfg, &mut ch);
            let mut run = |e: &Expert, wt: f32| {
                let i = e.gate.rows();
                let (mut g, mut u, mut d) = (vec![0f32; i], vec![0f32; i], vec![0f32; h]);
                matmul_ref(&e.gate, xt, 1, &mut g);
                matmul_ref(&e.up, xt, 1, &mut u);
                crate::ops::silu_mul(&mut g, &u);
                matmul_ref(&e.down, &g, 1, &mut d);
                for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(&d) {
                    *o += wt * v;
                }
            };
            for (e, wt) in ch {
                run(&w.experts[e as usize], wt);
            }
            if let Some(s) = &w.shared {
                run(s, 1.0);
            }
        }
        out
    }

    /// ~12 tokens per expert and a shared expert with all 32: the packed kernels'
    /// 8-token tiles through gate/up and the down projection's token map and weights
    /// give the natural kernel's result on the same int8 activations.
    #[test]
    fn packed_moe_with_many_tokens_per_expert_matches_natural() {
        crate::gemv::set_int8_activations(true);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (h, inter, ne, n) = (256, 128, 8, 32);
        for spec in [QuantSpec::affine(4, 64).unwrap(), QuantSpec::nvfp4()] {
            let (rb, mats) = random_moe(ne, h, inter, spec, &mut rng);
            let router = WeightView::Dense {
                dtype: DType::F32,
                rows: ne,
                cols: h,
                data: &rb,
            };
            let experts = expert_views(&mats);
            let cfg = RoutingConfig {
                top_k: 3,
                scoring: Scoring::Softmax,
                norm_topk_prob: true,
                scaling: 1.0,
                correction_bias: None,
            };
            let w = MoeWeights {
                router,
                experts: &experts[..ne],
                shared: Some(experts[ne]),
            };
            let x: Vec<f32> = (0..n * h).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut s = MoeScratch::new();
            let mut natural = vec![0f32; n * h];
            moe_forward_on(&Pool::new(2), &w, &x, n, &cfg, &mut natural, &mut s).unwrap();
            let views: Vec<WeightView> = experts
                .iter()
                .flat_map(|e| [e.gate, e.up, e.down])
                .collect();
            let reg = crate::lanes::pack_all(&views);
            assert_eq!(reg.len(), views.len(), "every expert packs");
            let mut packed = vec![0f32; n * h];
            moe_forward_on(&Pool::new(2), &w, &x, n, &cfg, &mut packed, &mut s).unwrap();
            drop(reg);
            let most = (0..ne).map(|e| s.last_routing.iter().filter(|&&r| r as usize == e).count());
            assert!(
                most.max().unwrap_or(0) >= 8,
                "an expert gets a full 8-token tile"
            );
            let scale = natural.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in natural.iter().zip(&packed) {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{spec}: natural {a}, packed {b}"
                );
            }
        }
    }

    #[test]
    fn fused_moe_matches_reference() {
        // Every test here wants the int8 kernels (the exact path is `Isa::Portable`).
        crate::gemv::set_int8_activations(true);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (h, inter, ne) = (256, 128, 8);
        for spec in [
            QuantSpec::affine(4, 64).unwrap(),
            QuantSpec::nvfp4(),
            QuantSpec::affine(3, 32).unwrap(),
            // Last: the draws of the formats above stay as they were.
            QuantSpec::mxfp4(),
        ] {
            let (rb, mats) = random_moe(ne, h, inter, spec, &mut rng);
            let router = WeightView::Dense {
                dtype: DType::F32,
                rows: ne,
                cols: h,
                data: &rb,
            };
            let experts = expert_views(&mats);
            for (shared, scoring, n) in [
                (false, Scoring::Softmax, 1),
                (true, Scoring::Sigmoid, 1),
                (false, Scoring::Softmax, 5),
                (true, Scoring::Sigmoid, 4),
            ] {
                let bias: Vec<f32> = (0..ne).map(|i| i as f32 * 0.01).collect();
                let cfg = RoutingConfig {
                    top_k: 3,
                    scoring,
                    norm_topk_prob: true,
                    scaling: if shared { 2.5 } else { 1.0 },
                    correction_bias: shared.then_some(&bias[..]),
                };
                let w = MoeWeights {
                    router,
                    experts: &experts[..ne],
                    shared: shared.then_some(experts[ne]),
                };
                let x: Vec<f32> = (0..n * h).map(|_| rng.random_range(-1.0..1.0)).collect();
                let want = reference(&w, &x, n, &cfg);
                let mut got = vec![0f32; n * h];
                let mut s = MoeScratch::new();
                moe_forward_on(&Pool::new(2), &w, &x, n, &cfg, &mut got, &mut s).unwrap();
                if spec.bits == 4 && spec.mode != rooftop_quant::QuantMode::Mxfp8 {
                    // The same step with the experts packed (rows in lanes): the same
                    // int8 activations, so equal up to f32 rounding.
                    let views: Vec<WeightView> = w
                        .experts
                        .iter()
                        .chain(&w.shared)
                        .flat_map(|e| [e.gate, e.up, e.down])
                        .collect();
                    let reg = crate::lanes::pack_all(&views);
                    assert_eq!(reg.len(), views.len(), "every expert packs");
                    let mut packed = vec![0f32; n * h];
                    moe_forward_on(&Pool::new(2), &w, &x, n, &cfg, &mut packed, &mut s).unwrap();
                    drop(reg);
                    let scale = got.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (a, b) in got.iter().zip(&packed) {
                        assert!(
                            (a - b).abs() <= 1e-5 * scale,
                            "{spec} shared={shared} n={n}: natural {a}, packed {b}"
                        );
                    }
                }
                let err: f32 = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                let norm: f32 = want.iter().map(|a| a * a).sum::<f32>().sqrt();
                assert!(
                    norm > 0.0 && err / norm < 0.02,
                    "{spec} shared={shared} n={n}: rel err {}",
                    err / norm
                );
            }
        }
    }
}
