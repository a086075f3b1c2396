//! Host side of the barrier decode kernel (`kernels/mega.cu`): every layer of a token in
//! one launch, each op spread over the whole (co-resident) grid, grid-wide barriers
//! between ops, and each CTA's share of an op's weight rows bulk-copied into its shared
//! memory an op ahead. For models whose layer weights share one format (the kernel is
//! compiled per format), on sm_90+. Opt-in (`ROOFTOP_PERSISTENT=barrier`, see
//! [`crate::persistent::decode_kernel`]): correct on every GPU check, but on an H200 it
//! decodes qwen3-30b-a3b affine4 at ~290 tok/s against ~420 for the launch-per-op graph
//! (docs/PERFORMANCE-cuda.md, session 5: each op's chain of dependent steps costs
//! 5-20 us even with its weights on chip).

use crate::decoder::{CudaDecoder, CudaFfn};
use crate::device::{cfg, launch, CudaDevice};
use crate::nvrtc::{KernelFormat, ModuleSource};
use crate::persistent::{desc_bytes, layer_desc};
use crate::weight::{stage_bytes, CudaWeight};
use crate::CudaError;
use cudarc::driver::{CudaSlice, DeviceRepr};

/// `struct MegaStep` in mega.cu (field for field).
#[repr(C)]
#[derive(Clone, Copy)]
struct MegaArg {
    layers: u64,
    h: u64,
    qkv: u64,
    att: u64,
    part: u64,
    logits: u64,
    act: u64,
    wts: u64,
    ids: u64,
    pos: u64,
    bar: u64,
    dbg: u64,
    n_layers: i32,
    hidden: i32,
    max_seq: i32,
    splits: i32,
    stage_bytes: i32,
    qg_bytes: i32,
    od_bytes: i32,
    pad: i32,
}
unsafe impl DeviceRepr for MegaArg {}

/// Dynamic shared memory of one CTA (mega.cu): the staged activations (also the
/// attention scratch), then the QG (QKV, gate/up), OD (o_proj, down) and R (router)
/// weight buffers, each sized for the largest share any layer gives one CTA.
#[derive(Clone, Copy, Debug, Default)]
struct SmemPlan {
    stage: usize,
    qg: usize,
    od: usize,
    r: usize,
}

impl SmemPlan {
    fn total(&self) -> usize {
        self.stage + self.qg + self.od + self.r
    }
}

/// Bytes of `nr` rows of `w` in a buffer: codes, scales, biases, each piece widened to
/// 16-byte alignment at both ends (mega.cu mg_rows).
fn rows_bytes(w: &CudaWeight, nr: usize) -> usize {
    nr * (w.nbytes() / w.rows.max(1)) + 3 * 32
}

/// The shared memory each CTA needs when the grid has `grid` CTAs.
fn smem_plan(dec: &CudaDecoder, grid: usize) -> SmemPlan {
    let h = dec.hidden();
    let share = |n: usize| n.div_ceil(grid);
    let a128 = |n: usize| n.next_multiple_of(128);
    let mut p = SmemPlan {
        stage: stage_bytes(1, h),
        ..Default::default()
    };
    for l in &dec.layers {
        let a = &l.attn;
        p.stage = p.stage.max(stage_bytes(1, a.heads * a.head_dim));
        // Attention scratch: q, k, v, one output row per warp, (m, l) per warp.
        p.stage = p.stage.max(((3 + 8) * a.head_dim + 16) * 4);
        p.qg = p.qg.max(rows_bytes(&a.qkv[0], share(a.qkv[0].rows)));
        p.od = p.od.max(rows_bytes(&a.o, share(a.o.rows)));
        // Feed-forward slots: routed experts (gate, up, down), then the shared expert or
        // dense MLP. A CTA's item range crosses at most ceil(range / slot rows) + 1 slots.
        let (k, inter, gate, down, shared) = match &l.ffn {
            CudaFfn::Moe(m) => {
                p.r = p.r.max(rows_bytes(&m.router, share(m.router.rows)));
                (
                    m.routing.top_k,
                    m.inter,
                    Some(&m.gate),
                    Some(&m.down),
                    m.shared.as_ref(),
                )
            }
            CudaFfn::Mlp(m) => (0, 0, None, None, Some(&m.w)),
        };
        let ish = shared.map_or(0, |s| s[0].rows);
        let nslots = k + (ish > 0) as usize;
        let min_rows = match (k, ish) {
            (0, s) => s,
            (_, 0) => inter,
            (_, s) => inter.min(s),
        }
        .max(1);
        let per_gu = share(k * inter + ish);
        let segs = nslots.min(per_gu.div_ceil(min_rows) + 1);
        let g = gate
            .or(shared.map(|s| &s[0]))
            .expect("a feed-forward has gate rows");
        p.qg = p.qg.max(2 * (rows_bytes(g, per_gu) + segs * 96));
        let per_d = share(nslots * h);
        let segs_d = nslots.min(per_d.div_ceil(h) + 1);
        let d = down
            .or(shared.map(|s| &s[2]))
            .expect("a feed-forward has down rows");
        let dmax = shared.map_or(rows_bytes(d, per_d), |s| {
            rows_bytes(d, per_d).max(rows_bytes(&s[2], per_d))
        });
        p.od = p.od.max(dmax + segs_d * 96);
        let cm = inter.max(ish);
        p.stage = p.stage.max(segs_d * (cm * 4 + cm / 32 * 4));
    }
    SmemPlan {
        stage: a128(p.stage),
        qg: a128(p.qg),
        od: a128(p.od),
        r: a128(p.r),
    }
}

/// `MG_THREADS` in mega.cu.
const THREADS: u32 = 256;
/// `MAX_TOPK` in gemv.cu (routed experts kept in shared memory).
const MAX_TOPK: usize = 32;

/// Blocks per SM the kernel is compiled for (`ROOFTOP_MEGA_BLOCKS`). Default 1: on an
/// H200 (qwen3-30b-a3b affine4) 1 block of 190 registers decoded 292 tok/s, 2 blocks
/// (128 registers, ~500 B of spills) 274.
pub(crate) fn mega_blocks() -> usize {
    std::env::var("ROOFTOP_MEGA_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| (1..=8).contains(v))
        .unwrap_or(1)
}

/// Device buffers and launch shape of the barrier kernel, besides the decoder state's.
pub(crate) struct Mega {
    format: KernelFormat,
    descs: CudaSlice<u8>,
    /// Grid-barrier count, then one split-arrival count per head (zeroed per launch).
    bar: CudaSlice<u32>,
    part: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    wts: CudaSlice<f32>,
    act: CudaSlice<f32>,
    ids: CudaSlice<i32>,
    n_layers: usize,
    grid: u32,
    smem: usize,
    plan: SmemPlan,
    splits: usize,
    /// `[n_layers][32]` timestamps (ROOFTOP_VERBOSE; mega.cu mg_stamp).
    dbg: Option<CudaSlice<u64>>,
}

impl Mega {
    /// The layer table for a state whose KV caches are `kc`/`vc` and whose layer weights
    /// are all in `format` (sm_90+ checked by [`crate::persistent::Fused::new`]);
    /// `Err(why)` when the model's shapes do not suit the kernel.
    pub(crate) fn new(
        dec: &CudaDecoder,
        kc: &[CudaSlice<u16>],
        vc: &[CudaSlice<u16>],
        format: KernelFormat,
    ) -> Result<Result<Self, String>, CudaError> {
        let verbose = std::env::var("ROOFTOP_VERBOSE").is_ok();
        let skip = |why: String| Ok(Err(why));
        let dev = &dec.dev;
        let (mut max_heads, mut max_hd, mut max_logits, mut max_act, mut max_k) = (1, 32, 1, 1, 1);
        for l in &dec.layers {
            let a = &l.attn;
            if a.head_dim % 32 != 0 || a.head_dim > 256 {
                return skip(format!("head_dim {}", a.head_dim));
            }
            max_heads = max_heads.max(a.heads);
            max_hd = max_hd.max(a.head_dim);
            if let CudaFfn::Moe(m) = &l.ffn {
                if m.n_experts > 512 || m.routing.top_k > MAX_TOPK {
                    return skip(format!("{} experts, top-{}", m.n_experts, m.routing.top_k));
                }
                max_logits = max_logits.max(m.n_experts);
                max_k = max_k.max(m.routing.top_k);
                max_act = max_act.max(m.routing.top_k * m.inter + m.inter_shared());
            } else if let CudaFfn::Mlp(m) = &l.ffn {
                max_act = max_act.max(m.w[0].rows);
            }
        }
        let f = dev.function(&ModuleSource::mega(format), "mega_layers")?;
        // Every CTA must be resident at once (they wait on each other), and each CTA's
        // share of every op must fit its buffers: try the most blocks per SM first.
        let mut chosen = None;
        for b in (1..=mega_blocks()).rev() {
            let grid = dev.sms * b;
            let sz = smem_plan(dec, grid);
            if sz.total() <= dev.max_smem
                && dev.grid_for(&f, THREADS, sz.total(), grid) as usize == grid
            {
                chosen = Some((grid, sz));
                break;
            }
        }
        let Some((grid, sz)) = chosen else {
            let need = smem_plan(dec, dev.sms).total();
            return skip(format!(
                "one CTA per SM would need {need} B of shared memory ({} B available)",
                dev.max_smem
            ));
        };
        let smem = sz.total();
        let grid = grid as u32;
        let splits = (grid as usize / max_heads).clamp(1, 32);
        let descs: Vec<_> = dec
            .layers
            .iter()
            .enumerate()
            .map(|(li, l)| layer_desc(dev, l, &kc[li], &vc[li]).0)
            .collect();
        if verbose {
            eprintln!(
                "barrier decode: grid {grid} x {THREADS} threads ({} per SM), smem {} B stage + {} B QG + {} B OD + {} B R, {} regs/thread, {splits} attention splits",
                grid as usize / dev.sms.max(1),
                sz.stage,
                sz.qg,
                sz.od,
                sz.r,
                f.num_regs().unwrap_or(-1)
            );
        }
        let n = dec.layers.len();
        Ok(Ok(Mega {
            format,
            descs: dev.upload(&desc_bytes(&descs))?,
            bar: dev.alloc(64 + max_heads)?,
            part: dev.alloc(max_heads * splits * (max_hd + 2))?,
            logits: dev.alloc(max_logits)?,
            wts: dev.alloc(max_k)?,
            act: dev.alloc(max_act)?,
            ids: dev.alloc(max_k)?,
            n_layers: n,
            grid,
            smem,
            plan: sz,
            splits,
            dbg: if verbose {
                Some(dev.alloc(n * 32)?)
            } else {
                None
            },
        }))
    }

    /// The experts the last MoE layer chose.
    pub(crate) fn ids(&self) -> &CudaSlice<i32> {
        &self.ids
    }

    /// Mean microseconds per op over the layers of the last step (CTA 0's barrier exits),
    /// when ROOFTOP_VERBOSE was set.
    pub(crate) fn phase_report(&self, dev: &CudaDevice) -> Result<Option<String>, CudaError> {
        let Some(d) = &self.dbg else { return Ok(None) };
        let t = dev.download(d)?;
        let names = ["qkv", "attention", "o_proj", "router", "gate/up", "down"];
        // Per op: work (from the previous barrier's exit to this op's end on CTA 0) and
        // the wait in its barrier (for the slowest CTA, plus the barrier itself).
        let (mut work, mut wait) = ([0f64; 6], [0f64; 6]);
        // Inside ops (CTA 0): QKV issue/stage/wait/compute, O stage/wait/compute,
        // GU route/issue/wait/compute, DOWN stage/wait/compute.
        let mut fine = [0f64; 14];
        let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
        for l in 1..self.n_layers {
            let r = |i: usize| t[l * 32 + i];
            let mut prev = t[(l - 1) * 32 + 5];
            let start = prev;
            for o in 0..6 {
                let (done, exit) = (r(8 + o), r(o));
                work[o] += us(prev, done);
                wait[o] += us(done, exit);
                prev = exit;
            }
            let d = [
                us(start, r(16)),
                us(r(16), r(17)),
                us(r(17), r(18)),
                us(r(18), r(8)),
                us(r(1), r(22)),
                us(r(22), r(23)),
                us(r(23), r(10)),
                us(r(3), r(19)),
                us(r(19), r(20)),
                us(r(20), r(21)),
                us(r(21), r(12)),
                us(r(4), r(24)),
                us(r(24), r(25)),
                us(r(25), r(13)),
            ];
            for (f, v) in fine.iter_mut().zip(d) {
                *f += v;
            }
        }
        let n = self.n_layers.saturating_sub(1).max(1) as f64;
        let ops: Vec<String> = (0..6)
            .map(|o| format!("{} {:.1}+{:.1}", names[o], work[o] / n, wait[o] / n))
            .collect();
        let f: Vec<String> = fine.iter().map(|v| format!("{:.1}", v / n)).collect();
        let inside = format!(
            "\n  inside (us): qkv issue {} stage {} wait {} compute {} | o stage {} wait {} compute {} | gu route {} issue {} wait {} compute {} | down stage {} wait {} compute {}",
            f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], f[12], f[13]
        );
        let bartest = if t[6] > 0 {
            format!("; empty barrier {} ns", t[6])
        } else {
            String::new()
        };
        Ok(Some(format!(
            "barrier kernel, grid {} x {THREADS}, {} B smem, {} splits{bartest}; us per layer (work+barrier): {}{inside}",
            self.grid,
            self.smem,
            self.splits,
            ops.join(", ")
        )))
    }

    /// Enqueue all layers: h (+)= layers(h) at position `pos`. `qkv`, `att` are the
    /// state's scratch buffers.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn enqueue(
        &mut self,
        dev: &CudaDevice,
        h: u64,
        qkv: u64,
        att: u64,
        pos: u64,
        hidden: usize,
        max_seq: usize,
    ) -> Result<(), CudaError> {
        let f = dev.function(&ModuleSource::mega(self.format), "mega_layers")?;
        dev.zero(&mut self.bar)?;
        let arg = MegaArg {
            layers: dev.ptr(&self.descs),
            h,
            qkv,
            att,
            part: dev.ptr(&self.part),
            logits: dev.ptr(&self.logits),
            act: dev.ptr(&self.act),
            wts: dev.ptr(&self.wts),
            ids: dev.ptr(&self.ids),
            pos,
            bar: dev.ptr(&self.bar),
            dbg: self.dbg.as_ref().map_or(0, |d| dev.ptr(d)),
            n_layers: self.n_layers as i32,
            hidden: hidden as i32,
            max_seq: max_seq as i32,
            splits: self.splits as i32,
            stage_bytes: self.plan.stage as i32,
            qg_bytes: self.plan.qg as i32,
            od_bytes: self.plan.od as i32,
            pad: 0,
        };
        launch!(
            dev,
            f,
            cfg((self.grid, 1), THREADS, self.smem),
            "mega_layers",
            arg
        )
    }
}
