//! The fused MoE decode step (batch 1): three launches, no host synchronization.
//!
//! ```text
//! E = experts, K = top-k, H = hidden, I = moe_intermediate, S = shared intermediate
//! 1. moe_router : logits[E] = R x
//! 2. moe_gate_up: every CTA routes -> ids[K], wts[K] (CTA 0 stores them);
//!                 h[K·I + S] = silu(G_e x) * (U_e x)  for e in ids (+ shared expert)
//! 3. moe_down   : out[H] += Σ_k wts[k] · D_e h_k (+ D_shared h_shared)
//! ```
//! Expert indices never leave the device, so the step can be captured in a CUDA graph.

use crate::decoder::{gemv_pre, preload_of, EpiArg};
use crate::device::{cfg, launch, CudaDevice};
use crate::error::shape;
use crate::nvrtc::{rows_moe, ModuleSource};
use crate::weight::{lanes_per_row, stage_bytes, CudaWeight, PfArg, QwArg};
use crate::CudaError;
use cudarc::driver::{CudaSlice, DeviceRepr};

/// How the router's logits become expert weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RoutingKind {
    /// Qwen-MoE: softmax over all experts, top-k.
    Softmax,
    /// DeepSeek-V3 / GLM-4.5: sigmoid; top-k on sigmoid + e_score_correction_bias.
    Sigmoid,
}

/// Options of [`CudaMoe::step_parts`].
#[derive(Clone, Copy)]
pub struct StepOpts<'a> {
    /// Which launches to enqueue: router, gate/up, down.
    pub parts: [bool; 3],
    /// RMSNorm (weights, eps) fused into the launches that read x.
    pub norm: Option<(&'a CudaSlice<f32>, f32)>,
    /// A weight to prefetch into L2 for whatever runs after the step.
    pub next: Option<&'a CudaWeight>,
}

/// Router configuration, as in the model's config.json.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Routing {
    pub kind: RoutingKind,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// Expert groups (DeepSeek `n_group`); 1 = no group limit.
    pub n_group: usize,
    /// Groups kept (`topk_group`).
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
}

impl Routing {
    /// Qwen3-MoE routing.
    pub fn qwen(top_k: usize, norm_topk_prob: bool) -> Self {
        Routing {
            kind: RoutingKind::Softmax,
            top_k,
            norm_topk_prob,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
        }
    }
}

/// `struct Routing` in gemv.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RoutingArg {
    bias: u64,
    n_experts: i32,
    k: i32,
    sigmoid: i32,
    norm: i32,
    n_group: i32,
    topk_group: i32,
    scale: f32,
}
unsafe impl DeviceRepr for RoutingArg {}

/// One MoE block on the device.
pub struct CudaMoe {
    /// `[E, H]`
    pub router: CudaWeight,
    /// Stacked `[E·I, H]`.
    pub gate: CudaWeight,
    /// Stacked `[E·I, H]`.
    pub up: CudaWeight,
    /// Stacked `[E·H, I]`.
    pub down: CudaWeight,
    /// Shared expert (gate `[S, H]`, up `[S, H]`, down `[H, S]`), weight 1, same format.
    pub shared: Option<[CudaWeight; 3]>,
    /// `e_score_correction_bias` `[E]` (sigmoid routing).
    pub bias: Option<CudaSlice<f32>>,
    pub routing: Routing,
    pub n_experts: usize,
    pub hidden: usize,
    pub inter: usize,
}

/// Per-step device scratch (allocate once, reuse every token).
pub struct MoeScratch {
    /// `[E]` router logits.
    pub logits: CudaSlice<f32>,
    /// `[K]` selected experts.
    pub ids: CudaSlice<i32>,
    /// `[K]` their weights.
    pub wts: CudaSlice<f32>,
    /// `[K·I + S]` activated intermediate.
    pub h: CudaSlice<f32>,
}

impl CudaMoe {
    /// Validate shapes and formats. The three expert projections (and the shared
    /// expert) must share one format: they run in the same fused launches.
    pub fn new(
        router: CudaWeight,
        [gate, up, down]: [CudaWeight; 3],
        shared: Option<[CudaWeight; 3]>,
        bias: Option<CudaSlice<f32>>,
        routing: Routing,
    ) -> Result<Self, CudaError> {
        let e = router.rows;
        let h = router.cols;
        let bad = |m: String| Err(shape("moe", m));
        if e == 0 || e > 512 || !gate.rows.is_multiple_of(e) {
            return bad(format!(
                "router has {e} experts (1..=512) and gate {} rows",
                gate.rows
            ));
        }
        let inter = gate.rows / e;
        if gate.cols != h
            || up.cols != h
            || up.rows != gate.rows
            || down.rows != e * h
            || down.cols != inter
        {
            return bad(format!(
                "E={e} H={h} I={inter}: gate [{}, {}], up [{}, {}], down [{}, {}] (want [E·I, H], [E·I, H], [E·H, I])",
                gate.rows, gate.cols, up.rows, up.cols, down.rows, down.cols
            ));
        }
        if routing.top_k == 0
            || routing.top_k > e.min(32)
            || routing.n_group == 0
            || routing.n_group > 32
            || !e.is_multiple_of(routing.n_group)
            || routing.topk_group > routing.n_group
        {
            return bad(format!(
                "routing {routing:?} does not fit {e} experts (top_k <= 32, n_group <= 32 dividing E)"
            ));
        }
        // gate/up (and the shared expert's) run in one launch, down (and the shared
        // down) in another: each launch needs one format, the two may differ (mlx-lm's
        // mixed recipes give down_proj more bits).
        if up.format != gate.format {
            return Err(CudaError::Unsupported(format!(
                "fused MoE needs one format for gate and up; got {}, {}",
                gate.format.name(),
                up.format.name()
            )));
        }
        if let Some([sg, su, sd]) = &shared {
            if sg.format != gate.format || su.format != gate.format || sd.format != down.format {
                return Err(CudaError::Unsupported(format!(
                    "fused MoE needs the shared expert in the experts' formats (gate/up {}, down {})",
                    gate.format.name(),
                    down.format.name()
                )));
            }
            if sg.cols != h
                || su.cols != h
                || su.rows != sg.rows
                || sd.rows != h
                || sd.cols != sg.rows
            {
                return bad(format!(
                    "shared expert gate [{}, {}], up [{}, {}], down [{}, {}] vs H={h}",
                    sg.rows, sg.cols, su.rows, su.cols, sd.rows, sd.cols
                ));
            }
        }
        if let Some(b) = &bias {
            if b.len() != e {
                return bad(format!(
                    "correction bias has {} entries for {e} experts",
                    b.len()
                ));
            }
        }
        Ok(CudaMoe {
            router,
            gate,
            up,
            down,
            shared,
            bias,
            routing,
            n_experts: e,
            hidden: h,
            inter,
        })
    }

    pub(crate) fn routing_arg(&self, dev: &CudaDevice) -> RoutingArg {
        RoutingArg {
            bias: self.bias.as_ref().map_or(0, |b| dev.ptr(b)),
            n_experts: self.n_experts as i32,
            k: self.routing.top_k as i32,
            sigmoid: (self.routing.kind == RoutingKind::Sigmoid) as i32,
            norm: self.routing.norm_topk_prob as i32,
            n_group: self.routing.n_group as i32,
            topk_group: self.routing.topk_group as i32,
            scale: self.routing.routed_scaling_factor,
        }
    }

    pub(crate) fn inter_shared(&self) -> usize {
        self.shared.as_ref().map_or(0, |s| s[0].rows)
    }

    pub fn scratch(&self, dev: &CudaDevice) -> Result<MoeScratch, CudaError> {
        let k = self.routing.top_k;
        Ok(MoeScratch {
            logits: dev.alloc(self.n_experts)?,
            ids: dev.alloc(k)?,
            wts: dev.alloc(k)?,
            h: dev.alloc(k * self.inter + self.inter_shared())?,
        })
    }

    /// Bytes each launch streams: router, gate/up (+ shared), down (+ shared).
    pub fn part_bytes(&self) -> [usize; 3] {
        let k = self.routing.top_k;
        let sh = |i: usize| self.shared.as_ref().map_or(0, |s| s[i].nbytes());
        [
            self.router.nbytes(),
            k * (self.gate.rows_nbytes(self.inter) + self.up.rows_nbytes(self.inter))
                + sh(0)
                + sh(1),
            k * self.down.rows_nbytes(self.hidden) + sh(2),
        ]
    }

    /// Bytes one step streams: the router, K experts' three projections, the shared
    /// expert (activations are negligible and stay in L2).
    pub fn bytes_per_step(&self) -> usize {
        let k = self.routing.top_k;
        self.router.nbytes()
            + k * (self.gate.rows_nbytes(self.inter)
                + self.up.rows_nbytes(self.inter)
                + self.down.rows_nbytes(self.hidden))
            + self
                .shared
                .as_ref()
                .map_or(0, |s| s.iter().map(|w| w.nbytes()).sum())
    }

    /// `out[H] += moe(x[H])`, enqueued as three launches. `x` is the normed hidden
    /// state, `out` the residual stream.
    pub fn step(
        &self,
        dev: &CudaDevice,
        s: &mut MoeScratch,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if x.len() < self.hidden || out.len() < self.hidden {
            return Err(shape(
                "moe",
                format!(
                    "x has {}, out {} elements; H = {}",
                    x.len(),
                    out.len(),
                    self.hidden
                ),
            ));
        }
        let (px, pout) = (dev.ptr(x), dev.ptr(out));
        self.step_raw(dev, s, px, pout, None, None)
    }

    /// [`CudaMoe::step`] on raw device addresses of `x[H]` and `out[H]`. With `norm`
    /// (weights `[H]`, eps), x is the raw residual stream and the RMSNorm is fused into
    /// the launches that read it. `next`: a weight the launch after this step reads,
    /// prefetched into L2 while the down projection runs.
    pub fn step_raw(
        &self,
        dev: &CudaDevice,
        s: &mut MoeScratch,
        x: u64,
        out: u64,
        norm: Option<(&CudaSlice<f32>, f32)>,
        next: Option<&CudaWeight>,
    ) -> Result<(), CudaError> {
        self.step_parts(
            dev,
            s,
            x,
            out,
            StepOpts {
                parts: [true; 3],
                norm,
                next,
            },
        )
    }

    /// Enqueue only the chosen launches (router, gate/up, down), for per-kernel timing;
    /// a part reads what earlier parts of a previous step left in the scratch.
    pub fn step_parts(
        &self,
        dev: &CudaDevice,
        s: &mut MoeScratch,
        x: u64,
        out: u64,
        o: StepOpts,
    ) -> Result<(), CudaError> {
        let StepOpts { parts, norm, next } = o;
        let k = self.routing.top_k;
        let (nw, eps) = norm.map_or((0u64, 0f32), |(w, e)| (dev.ptr(w), e));
        let (h, inter) = (self.hidden, self.inter);
        let (p_logits, p_ids, p_wts, p_h) = (
            dev.ptr(&s.logits),
            dev.ptr(&s.ids),
            dev.ptr(&s.wts),
            dev.ptr(&s.h),
        );

        // 1. Router logits (routing: at the start of gate/up).
        let rm = ModuleSource::gemv_router(self.router.format);
        let f = dev.function(&rm, "moe_router")?;
        let rarg = self.router.arg(dev);
        let lpr = lanes_per_row(h, self.router.format.unroll());
        let smem = stage_bytes(1, h);
        dev.check_smem("moe router", smem)?;
        let grid = dev.grid_for(
            &f,
            256,
            smem,
            self.n_experts.div_ceil(32 / lpr as usize).div_ceil(8),
        );
        let pre = parts[0] && preload_of("router", self.router.format) && {
            let e = EpiArg {
                nw,
                eps,
                add: 0,
                bias: 0,
            };
            gemv_pre(dev, &self.router, true, x, p_logits, e)?
        };
        if parts[0] && !pre {
            launch!(
                dev,
                f,
                cfg((grid, 1), 256, smem),
                "moe_router",
                rarg,
                x,
                p_logits,
                lpr,
                nw,
                eps
            )?;
        }

        if parts[1] || parts[2] {
            let ffn = FfnLaunch {
                gate: Some((&self.gate, &self.up)),
                down: Some(&self.down),
                shared: self.shared.as_ref(),
                k,
                inter,
                hidden: h,
                logits: p_logits,
                routing: self.routing_arg(dev),
                ids: p_ids,
                wts: p_wts,
                h: p_h,
                norm: (nw, eps),
                next: PfArg::of(dev, next),
            };
            ffn.enqueue(dev, x, out, [parts[1], parts[2]])?;
        }
        Ok(())
    }
}

/// The gate/up and down launches of a feed-forward: the routed experts of a MoE (with
/// its optional shared expert), or a dense SwiGLU MLP run as a shared expert alone
/// (`k = 0`, no router).
struct FfnLaunch<'a> {
    /// Stacked routed gate and up `[E·I, H]` (None for a dense MLP).
    gate: Option<(&'a CudaWeight, &'a CudaWeight)>,
    /// Stacked routed down `[E·H, I]`.
    down: Option<&'a CudaWeight>,
    shared: Option<&'a [CudaWeight; 3]>,
    k: usize,
    inter: usize,
    hidden: usize,
    /// Router logits `[E]` and how gate/up turns them into ids/wts.
    logits: u64,
    routing: RoutingArg,
    ids: u64,
    wts: u64,
    /// `[k·I + S]` activated intermediate.
    h: u64,
    /// Fused RMSNorm of x: (weights or 0, eps).
    norm: (u64, f32),
    /// Prefetched by the down launch for whatever runs next.
    next: PfArg,
}

impl FfnLaunch<'_> {
    fn enqueue(
        &self,
        dev: &CudaDevice,
        x: u64,
        out: u64,
        parts: [bool; 2],
    ) -> Result<(), CudaError> {
        let (k, inter, h) = (self.k, self.inter, self.hidden);
        let ish = self.shared.map_or(0, |s| s[0].rows);
        let none = QwArg::default();
        let (sg, su, sd) = match self.shared {
            Some([g, u, d]) => (g.arg(dev), u.arg(dev), d.arg(dev)),
            None => (none, none, none),
        };
        let (g, u) = self
            .gate
            .map_or((none, none), |(g, u)| (g.arg(dev), u.arg(dev)));
        let gate_fmt = match (self.gate, self.shared) {
            (Some((g, _)), _) => g.format,
            (None, Some(s)) => s[0].format,
            (None, None) => return Err(shape("ffn", "neither experts nor a shared MLP")),
        };
        let down_w = self
            .down
            .or(self.shared.map(|s| &s[2]))
            .expect("checked above");
        let down_fmt = down_w.format;
        let (nw, eps) = self.norm;

        // Gate/up of the selected experts and the shared expert. Row blocking
        // (ROWS_MOE > 1): each lane streams R rows of gate and of up against one read of
        // x, so as many lanes per row as divide it; a warp's rpw*R items must not
        // straddle the routed/shared boundary (k*I a multiple of rpw*R).
        let rm_rows = rows_moe();
        let lpr_e = if rm_rows > 1 {
            lanes_per_row(h, 1)
        } else {
            lanes_per_row(h, gate_fmt.unroll())
        };
        let span_e = 32 / lpr_e as usize * rm_rows;
        if rm_rows > 1 && ish > 0 && !(k * inter).is_multiple_of(span_e) {
            return Err(CudaError::Unsupported(format!(
                "fused MoE with {rm_rows} rows per lane needs top_k*moe_intermediate ({}) to be a multiple of {span_e}; set ROOFTOP_ROWS_MOE=1",
                k * inter
            )));
        }
        let smem = stage_bytes(1, h);
        dev.check_smem("moe gate/up", smem)?;
        let m = ModuleSource::gemv(gate_fmt);
        let f = dev.function(&m, "moe_gate_up")?;
        let (ki, ii, si) = (k as i32, inter as i32, ish as i32);
        let items = k * inter + ish;
        let grid = dev.grid_for(&f, 256, smem, items.div_ceil(span_e).div_ceil(8));
        let (p_ids, p_h, p_wts) = (self.ids, self.h, self.wts);
        let (p_logits, rt) = (self.logits, self.routing);
        if parts[0] {
            launch!(
                dev,
                f,
                cfg((grid, 1), 256, smem),
                "moe_gate_up",
                g,
                u,
                sg,
                su,
                x,
                p_logits,
                rt,
                p_ids,
                p_wts,
                p_h,
                ki,
                ii,
                si,
                lpr_e,
                nw,
                eps
            )?;
        }

        // Down projection, weighted sum into the residual stream.
        let m = ModuleSource::gemv(down_fmt);
        let f = dev.function(&m, "moe_down")?;
        let d = self.down.map_or(none, |d| d.arg(dev));
        let min_cols = match (k, ish) {
            (0, s) => s,
            (_, 0) => inter,
            (_, s) => inter.min(s),
        };
        let lpr_d = if rm_rows > 1 {
            lanes_per_row(min_cols, 1)
        } else {
            lanes_per_row(min_cols, down_fmt.unroll())
        };
        // With row blocking a warp's rpw*R items must lie in one slot: H and each block's
        // range are multiples of that span.
        let span_d = 32 / lpr_d as usize * rm_rows;
        if rm_rows > 1 && !h.is_multiple_of(span_d) {
            return Err(CudaError::Unsupported(format!(
                "fused MoE with {rm_rows} rows per lane needs hidden ({h}) to be a multiple of {span_d}; set ROOFTOP_ROWS_MOE=1"
            )));
        }
        let hi = h as i32;
        let items = (k + (ish > 0) as usize) * h;
        // Blocks take contiguous item ranges; size the grid for full occupancy at the
        // shared memory of two staged slots, then stage what each range touches.
        let cm = inter.max(ish);
        let two = 2 * (cm * 4 + cm / 32 * 4);
        dev.check_smem("moe down", two)?;
        let grid = dev.grid_for(&f, 256, two, items.div_ceil(span_d).div_ceil(8));
        let per = items.div_ceil(grid as usize).next_multiple_of(span_d);
        let grid = items.div_ceil(per) as u32;
        let slots = (k + (ish > 0) as usize).min(per.div_ceil(h) + 1);
        let smem_d = slots * (cm * 4 + cm / 32 * 4);
        dev.check_smem("moe down", smem_d)?;
        let per_i = per as i32;
        let next = self.next;
        if parts[1] {
            launch!(
                dev,
                f,
                cfg((grid, 1), 256, smem_d),
                "moe_down",
                d,
                sd,
                p_h,
                p_ids,
                p_wts,
                out,
                ki,
                hi,
                ii,
                si,
                lpr_d,
                per_i,
                next
            )?;
        }
        Ok(())
    }
}

/// A dense SwiGLU MLP (`down(silu(gate x) * up x)`) on the MoE kernels: the MLP is a
/// shared expert with no routed ones, so it gets the same two fused launches.
pub struct CudaMlp {
    /// gate `[I, H]`, up `[I, H]`, down `[H, I]`.
    pub w: [CudaWeight; 3],
    /// `[I]` activated intermediate.
    h: CudaSlice<f32>,
}

impl CudaMlp {
    pub fn new(dev: &CudaDevice, w: [CudaWeight; 3]) -> Result<Self, CudaError> {
        let [g, u, d] = &w;
        if u.rows != g.rows || u.cols != g.cols || d.cols != g.rows || d.rows != g.cols {
            return Err(shape(
                "mlp",
                format!(
                    "gate [{}, {}], up [{}, {}], down [{}, {}]",
                    g.rows, g.cols, u.rows, u.cols, d.rows, d.cols
                ),
            ));
        }
        if u.format != g.format {
            return Err(CudaError::Unsupported(format!(
                "a fused MLP needs one format for gate and up; got {}, {}",
                g.format.name(),
                u.format.name()
            )));
        }
        let h = dev.alloc(g.rows)?;
        Ok(CudaMlp { w, h })
    }
    pub fn bytes(&self) -> usize {
        self.w.iter().map(|w| w.nbytes()).sum()
    }
    /// `out[H] += mlp(norm(x[H]))` on raw device addresses (norm: weights, eps).
    pub fn step_raw(
        &self,
        dev: &CudaDevice,
        x: u64,
        out: u64,
        norm: Option<(&CudaSlice<f32>, f32)>,
        next: Option<&CudaWeight>,
    ) -> Result<(), CudaError> {
        let ffn = FfnLaunch {
            gate: None,
            down: None,
            shared: Some(&self.w),
            k: 0,
            inter: 0,
            hidden: self.w[0].cols,
            logits: 0,
            routing: RoutingArg::default(),
            ids: 0,
            wts: 0,
            h: dev.ptr(&self.h),
            norm: norm.map_or((0, 0.0), |(w, e)| (dev.ptr(w), e)),
            next: PfArg::of(dev, next),
        };
        ffn.enqueue(dev, x, out, [true; 2])
    }
}
