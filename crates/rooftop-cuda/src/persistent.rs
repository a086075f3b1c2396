//! Host side of the streaming decode kernel (`kernels/decode.cu`): every layer of a
//! token in one launch, one CTA per SM, each with a producer warp that bulk-copies the
//! CTA's share of every weight (and KV-cache chunk) into a shared-memory ring ahead of
//! use, so HBM streams across every dependency between ops. For models whose layer
//! weights share one format (the kernel is compiled per format), on sm_90+.
//! Opt-in (`ROOFTOP_PERSISTENT=1`, see [`enabled`]): correct, but still slower than the
//! launch-per-op graph.

use crate::decoder::{CudaDecoder, CudaFfn};
use crate::device::{cfg, launch, CudaDevice};
use crate::error::DriverResult;
use crate::moe::RoutingArg;
use crate::nvrtc::{KernelFormat, ModuleSource};
use crate::weight::QwArg;
use crate::CudaError;
use cudarc::driver::{CudaSlice, DeviceRepr};

/// How a decode step runs its layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeKernel {
    /// A CUDA graph of one launch per op (kernels chained with PDL).
    PerOp,
    /// decode.cu: one launch, a producer warp per SM streaming weights into a ring.
    Stream,
    /// mega.cu: one launch, each op over the whole grid between grid barriers.
    Barrier,
}

static KERNEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Use `k` for decoder states made from now on, whatever `ROOFTOP_PERSISTENT` says
/// (checks run every path).
pub fn set_decode_kernel(k: DecodeKernel) {
    let v = match k {
        DecodeKernel::PerOp => 1,
        DecodeKernel::Stream => 2,
        DecodeKernel::Barrier => 3,
    };
    KERNEL.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// Back to what `ROOFTOP_PERSISTENT` (or the default) says.
pub fn clear_decode_kernel() {
    KERNEL.store(0, std::sync::atomic::Ordering::Relaxed);
}

/// The kernel decoder states made now use: [`set_decode_kernel`] if called, else
/// `ROOFTOP_PERSISTENT` (`1`/`stream`: the streaming kernel, `barrier`, `0`: per op).
pub fn decode_kernel() -> DecodeKernel {
    match KERNEL.load(std::sync::atomic::Ordering::Relaxed) {
        1 => DecodeKernel::PerOp,
        2 => DecodeKernel::Stream,
        3 => DecodeKernel::Barrier,
        _ => match std::env::var("ROOFTOP_PERSISTENT").as_deref() {
            Ok("1") | Ok("stream") => DecodeKernel::Stream,
            Ok("barrier") => DecodeKernel::Barrier,
            _ => DecodeKernel::PerOp,
        },
    }
}

/// `struct LayerDesc` in layer.cuh (field for field; 16-byte aligned there too, as mega.cu
/// bulk-copies entries).
#[repr(C, align(16))]
#[derive(Clone, Copy, Default)]
pub(crate) struct LayerDesc {
    qkv: QwArg,
    o: QwArg,
    router: QwArg,
    gate: QwArg,
    up: QwArg,
    down: QwArg,
    sg: QwArg,
    su: QwArg,
    sd: QwArg,
    rt: RoutingArg,
    attn_norm: u64,
    ffn_norm: u64,
    qkv_bias: u64,
    o_bias: u64,
    q_norm: u64,
    k_norm: u64,
    inv_freq: u64,
    kc: u64,
    vc: u64,
    eps: f32,
    qk_eps: f32,
    mscale: f32,
    scale: f32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    rot: i32,
    traditional: i32,
    inter: i32,
    inter_sh: i32,
    pad: i32,
}

/// `struct Step` in decode.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct StepArg {
    layers: u64,
    h: u64,
    qkv: u64,
    att: u64,
    logits: u64,
    act: u64,
    wts: u64,
    ids: u64,
    pos: u64,
    done: u64,
    dbg: u64,
    n_layers: i32,
    hidden: i32,
    max_seq: i32,
    slot_bytes: i32,
    nslots: i32,
    stage_bytes: i32,
    inflight: i32,
    pad: i32,
}
unsafe impl DeviceRepr for StepArg {}

/// Device buffers the streaming kernel works in, besides the decoder state's.
pub(crate) struct Persistent {
    format: KernelFormat,
    descs: CudaSlice<u8>,
    /// `[n_layers][8]` per-op completion counters (zeroed before each launch).
    done: CudaSlice<u32>,
    logits: CudaSlice<f32>,
    wts: CudaSlice<f32>,
    act: CudaSlice<f32>,
    ids: CudaSlice<i32>,
    n_layers: usize,
    slot_bytes: usize,
    nslots: usize,
    stage_bytes: usize,
    /// CTAs of the launch (one per SM).
    grid: usize,
    /// `[n_layers][grid][32]` timestamps (ROOFTOP_VERBOSE; see decode.cu's `stamp`).
    dbg: Option<CudaSlice<u64>>,
}

/// Consumer warps (`NCW` in decode.cu) and threads with the producer warp.
const CONSUMER_WARPS: usize = 15;
const THREADS: u32 = (CONSUMER_WARPS as u32 + 1) * 32;
/// decode.cu's `AttSm` (attention scratch, kept in the staging area).
const ATT_SM_BYTES: usize = (3 * 256 + 2 * CONSUMER_WARPS + CONSUMER_WARPS * 256) * 4;
/// Ring slots at most (`MAXS`) and rows of h one CTA may own (`MAX_DROWS`).
const MAX_SLOTS: usize = 16;
const MAX_DROWS: usize = 256;

/// Ring slot size (`ROOFTOP_SLOT_KB`, default 32 KiB): what one unit of work holds. On an
/// H200 32 KiB measured 274.6 tok/s, 16 KiB 260.5, 8 KiB 167 (fewer, larger units).
fn slot_bytes() -> usize {
    std::env::var("ROOFTOP_SLOT_KB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|v| (4..=64).contains(v))
        .unwrap_or(32)
        * 1024
}

/// Units the producer keeps in flight: `ROOFTOP_INFLIGHT_KB` (default 64) of copies per
/// SM, ~8 MB over an H200's 132 SMs — about twice what covers HBM latency at full rate;
/// more would only queue ahead of the dependent accesses on the critical path. (On an
/// H200, 16/32/64 KiB and no cap measured the same: the stream is not the limit yet.)
fn inflight_units(slot: usize, nslots: usize) -> usize {
    let kb = std::env::var("ROOFTOP_INFLIGHT_KB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|v| (1..=1024).contains(v))
        .unwrap_or(64);
    (kb * 1024).div_ceil(slot).clamp(1, nslots)
}

/// Bytes of one matrix row in a slot (codes, scales, biases), as decode.cu's `row_cost`.
fn row_cost(w: &crate::weight::CudaWeight) -> usize {
    w.nbytes() / w.rows
}

/// Shared bytes of one staged activation vector (decode.cu's `vec_bytes`).
fn vec_bytes(cols: usize, int8: bool) -> usize {
    let c = cols / 32;
    if int8 {
        (40 * c + 15) & !15
    } else {
        (132 * c + 15) & !15
    }
}

/// The single format of every layer weight, if there is one (and the shapes suit the
/// kernel: one stacked QKV, head_dim ≤ 256, top-k ≤ 64).
pub(crate) fn uniform_format(dec: &CudaDecoder) -> Option<KernelFormat> {
    let mut fmt = None;
    let mut same = |f: KernelFormat| match fmt {
        None => {
            fmt = Some(f);
            true
        }
        Some(g) => g == f,
    };
    for l in &dec.layers {
        let a = &l.attn;
        if a.qkv.len() != 1 || a.head_dim > 256 {
            return None;
        }
        if !same(a.qkv[0].format) || !same(a.o.format) {
            return None;
        }
        let ok = match &l.ffn {
            CudaFfn::Moe(m) => {
                m.routing.top_k <= 64
                    && same(m.router.format)
                    && same(m.gate.format)
                    && same(m.up.format)
                    && same(m.down.format)
                    && m.shared
                        .as_ref()
                        .is_none_or(|s| s.iter().all(|w| same(w.format)))
            }
            CudaFfn::Mlp(m) => m.w.iter().all(|w| same(w.format)),
        };
        if !ok {
            return None;
        }
    }
    fmt
}

/// Layer `l`'s table entry (KV caches `kc`/`vc`), with its expert width, shared-expert
/// (or dense MLP) width and top-k.
pub(crate) fn layer_desc(
    dev: &CudaDevice,
    l: &crate::decoder::CudaLayer,
    kc: &CudaSlice<u16>,
    vc: &CudaSlice<u16>,
) -> (LayerDesc, usize, usize, usize) {
    let a = &l.attn;
    let mut d = LayerDesc {
        qkv: a.qkv[0].arg(dev),
        o: a.o.arg(dev),
        attn_norm: dev.ptr(&l.attn_norm),
        ffn_norm: dev.ptr(&l.ffn_norm),
        qkv_bias: a.qkv_bias.as_ref().map_or(0, |b| dev.ptr(b)),
        o_bias: a.o_bias.as_ref().map_or(0, |b| dev.ptr(b)),
        q_norm: a.q_norm.as_ref().map_or(0, |b| dev.ptr(b)),
        k_norm: a.k_norm.as_ref().map_or(0, |b| dev.ptr(b)),
        inv_freq: dev.ptr(&a.rope.inv_freq),
        kc: dev.ptr(kc),
        vc: dev.ptr(vc),
        eps: l.eps,
        qk_eps: a.qk_eps,
        mscale: a.rope.mscale,
        scale: a.scale,
        heads: a.heads as i32,
        kv_heads: a.kv_heads as i32,
        head_dim: a.head_dim as i32,
        rot: a.rope.rot_dim as i32,
        traditional: a.rope.traditional as i32,
        ..Default::default()
    };
    let (inter, ish, k) = match &l.ffn {
        CudaFfn::Moe(m) => {
            d.router = m.router.arg(dev);
            d.gate = m.gate.arg(dev);
            d.up = m.up.arg(dev);
            d.down = m.down.arg(dev);
            d.rt = m.routing_arg(dev);
            if let Some([g, u, dd]) = &m.shared {
                (d.sg, d.su, d.sd) = (g.arg(dev), u.arg(dev), dd.arg(dev));
            }
            (m.inter, m.inter_shared(), m.routing.top_k)
        }
        CudaFfn::Mlp(m) => {
            let [g, u, dd] = &m.w;
            (d.sg, d.su, d.sd) = (g.arg(dev), u.arg(dev), dd.arg(dev));
            (0, g.rows, 0)
        }
    };
    d.inter = inter as i32;
    d.inter_sh = ish as i32;
    (d, inter, ish, k)
}

/// The layer table as device bytes.
pub(crate) fn desc_bytes(descs: &[LayerDesc]) -> Vec<u8> {
    descs
        .iter()
        .flat_map(|d| {
            // SAFETY: LayerDesc is repr(C) plain old data (ints, floats, addresses).
            unsafe {
                std::slice::from_raw_parts(
                    d as *const LayerDesc as *const u8,
                    std::mem::size_of::<LayerDesc>(),
                )
            }
            .to_vec()
        })
        .collect()
}

impl Persistent {
    /// Build the layer table for a state whose KV caches are `kc`/`vc` and whose layer
    /// weights are all in `format` (sm_90+ checked by [`Fused::new`]); `Err(why)` when
    /// the model's shapes do not suit the kernel.
    pub(crate) fn new(
        dec: &CudaDecoder,
        kc: &[CudaSlice<u16>],
        vc: &[CudaSlice<u16>],
        format: KernelFormat,
    ) -> Result<Result<Self, String>, CudaError> {
        let verbose = std::env::var("ROOFTOP_VERBOSE").is_ok();
        let skip = |why: String| Ok(Err(why));
        let dev = &dec.dev;
        let h = dec.hidden();
        if h > 8192 {
            return skip(format!("hidden size {h} > 8192"));
        }
        if h.div_ceil(dev.sms) > MAX_DROWS {
            return skip(format!("hidden size {h} too large for {} SMs", dev.sms));
        }
        let int8 = crate::nvrtc::int8_activations(format);
        let slot = slot_bytes();
        let mut descs = Vec::with_capacity(dec.layers.len());
        let (mut max_logits, mut max_act, mut max_k, mut stage) = (1, 1, 1, 0usize);
        // One row (two for gate/up) must fit a slot.
        let fits = |w: &crate::weight::CudaWeight, nm: usize| nm * (row_cost(w) + 96) <= slot;
        for (li, l) in dec.layers.iter().enumerate() {
            let a = &l.attn;
            if a.head_dim % 32 != 0 || a.head_dim > 256 || 4 * a.head_dim + 64 > slot {
                return skip(format!("head_dim {}", a.head_dim));
            }
            if !fits(&a.qkv[0], 1) || !fits(&a.o, 1) {
                return skip("an attention row does not fit a ring slot".into());
            }
            let ok = match &l.ffn {
                CudaFfn::Moe(m) => {
                    if m.n_experts > 512 {
                        return skip(format!("{} experts", m.n_experts));
                    }
                    fits(&m.router, 1)
                        && fits(&m.gate, 2)
                        && fits(&m.down, 1)
                        && m.shared
                            .as_ref()
                            .is_none_or(|[g, _, d]| fits(g, 2) && fits(d, 1))
                }
                CudaFfn::Mlp(m) => fits(&m.w[0], 2) && fits(&m.w[2], 1),
            };
            if !ok {
                return skip("an expert or MLP row does not fit a ring slot".into());
            }
            let (d, inter, ish, k) = layer_desc(dev, l, &kc[li], &vc[li]);
            stage = stage.max(vec_bytes(h, int8)).max(vec_bytes(a.o.cols, int8));
            if let CudaFfn::Moe(m) = &l.ffn {
                max_logits = max_logits.max(m.n_experts);
            }
            stage = stage.max(
                k * vec_bytes(inter.max(32), int8) + if ish > 0 { vec_bytes(ish, int8) } else { 0 },
            );
            max_act = max_act.max(k * inter + ish);
            max_k = max_k.max(k);
            descs.push(d);
        }
        // Shared memory: the ring gets what the stage area (which also holds the
        // attention scratch) and the kernel's static arrays leave.
        stage = stage.max(ATT_SM_BYTES);
        let f = dev.function(&ModuleSource::stream(format), "decode_layers")?;
        let fixed = f.shared_size_bytes().op("static shared memory size")? as usize;
        let avail = dev.max_smem.saturating_sub(1024 + fixed + stage);
        let nslots = (avail / slot).min(MAX_SLOTS);
        if nslots < 2 {
            return skip(format!(
                "{} B of shared memory leave fewer than 2 ring slots",
                dev.max_smem
            ));
        }
        let bytes = desc_bytes(&descs);
        let n = dec.layers.len();
        Ok(Ok(Persistent {
            format,
            descs: dev.upload(&bytes)?,
            done: dev.alloc(n * 8)?,
            logits: dev.alloc(max_logits)?,
            wts: dev.alloc(max_k)?,
            act: dev.alloc(max_act)?,
            ids: dev.alloc(max_k)?,
            n_layers: n,
            slot_bytes: slot,
            nslots,
            stage_bytes: stage,
            grid: dev.sms,
            dbg: if verbose {
                Some(dev.alloc(n * dev.sms * 32)?)
            } else {
                None
            },
        }))
    }

    /// Mean microseconds of each phase over the layers of the last step (CTA 0's view),
    /// when ROOFTOP_VERBOSE was set.
    pub(crate) fn phase_report(&self, dev: &CudaDevice) -> Result<Option<String>, CudaError> {
        let Some(d) = &self.dbg else { return Ok(None) };
        let t = dev.download(d)?;
        let g = self.grid;
        let names = ["qkv", "attention", "o_proj", "router", "gate/up", "down"];
        // Per op: critical-path time (last CTA done minus the previous op's last CTA
        // done), and means over CTAs of wait, staging and units.
        let (mut crit, mut wait, mut stage, mut units, mut umax) =
            ([0f64; 6], [0f64; 6], [0f64; 6], [0f64; 6], [0f64; 6]);
        let (mut route, mut lag, mut issue) = (0f64, 0f64, 0f64);
        let mut rparts = [0f64; 3];
        let mut layers = 0usize;
        let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
        // Layer 0 has no previous op; a dense layer's router stamps are meaningless.
        for l in 1..self.n_layers {
            let row = |c: usize, i: usize| t[(l * g + c) * 32 + i];
            let prev_end = (0..g)
                .map(|c| t[((l - 1) * g + c) * 32 + 23])
                .max()
                .unwrap_or(0);
            let mut last = prev_end;
            for o in 0..6 {
                let end = (0..g).map(|c| row(c, 4 * o + 3)).max().unwrap_or(0);
                crit[o] += us(last, end);
                last = end;
                let mut m = 0f64;
                for c in 0..g {
                    wait[o] += us(row(c, 4 * o), row(c, 4 * o + 1)) / g as f64;
                    stage[o] += us(row(c, 4 * o + 1), row(c, 4 * o + 2)) / g as f64;
                    let u = us(row(c, 4 * o + 2), row(c, 4 * o + 3));
                    units[o] += u / g as f64;
                    m = m.max(u);
                }
                umax[o] += m;
            }
            let rend = (0..g).map(|c| row(c, 15)).max().unwrap_or(0);
            for c in 0..g {
                route += us(row(c, 24), row(c, 25)) / g as f64;
                rparts[0] += us(row(c, 24), row(c, 27)) / g as f64;
                rparts[1] += us(row(c, 27), row(c, 28)) / g as f64;
                rparts[2] += us(row(c, 28), row(c, 29)) / g as f64;
                lag += us(rend, row(c, 24)) / g as f64;
                issue += us(row(c, 25), row(c, 26)) / g as f64;
            }
            layers += 1;
        }
        let n = layers.max(1) as f64;
        let mut out: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(o, name)| {
                format!(
                    "{name} {:.1} us (wait {:.1}, stage {:.1}, units {:.1}, slowest {:.1})",
                    crit[o] / n,
                    wait[o] / n,
                    stage[o] / n,
                    units[o] / n,
                    umax[o] / n
                )
            })
            .collect();
        out.push(format!(
            "producer: router seen {:.1} us after the last CTA, routing {:.1} us (logits {:.1}, scores {:.1}, top-k {:.1}), issuing {:.1} us",
            lag / n,
            route / n,
            rparts[0] / n,
            rparts[1] / n,
            rparts[2] / n,
            issue / n
        ));
        Ok(Some(out.join("\n  ")))
    }

    /// The experts the last MoE layer chose.
    pub(crate) fn ids(&self) -> &CudaSlice<i32> {
        &self.ids
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
        let f = dev.function(&ModuleSource::stream(self.format), "decode_layers")?;
        dev.zero(&mut self.done)?;
        let smem = self.nslots * self.slot_bytes + self.stage_bytes;
        // Every CTA must be resident at once (they wait on each other): one per SM.
        let grid = dev.grid_for(&f, THREADS, smem, dev.sms);
        if (grid as usize) < dev.sms {
            return Err(CudaError::Unsupported(format!(
                "the streaming decode kernel needs one CTA per SM ({}) but only {grid} fit; unset ROOFTOP_PERSISTENT",
                dev.sms
            )));
        }
        if std::env::var("ROOFTOP_VERBOSE").is_ok() {
            eprintln!(
                "streaming decode: grid {grid} x {THREADS} threads, {} slots x {} B + {} B stage, {} regs/thread",
                self.nslots,
                self.slot_bytes,
                self.stage_bytes,
                f.num_regs().unwrap_or(-1)
            );
        }
        let arg = StepArg {
            layers: dev.ptr(&self.descs),
            h,
            qkv,
            att,
            logits: dev.ptr(&self.logits),
            act: dev.ptr(&self.act),
            wts: dev.ptr(&self.wts),
            ids: dev.ptr(&self.ids),
            pos,
            done: dev.ptr(&self.done),
            dbg: self.dbg.as_ref().map_or(0, |d| dev.ptr(d)),
            n_layers: self.n_layers as i32,
            hidden: hidden as i32,
            max_seq: max_seq as i32,
            slot_bytes: self.slot_bytes as i32,
            nslots: self.nslots as i32,
            stage_bytes: self.stage_bytes as i32,
            inflight: inflight_units(self.slot_bytes, self.nslots) as i32,
            pad: 0,
        };
        launch!(dev, f, cfg((grid, 1), THREADS, smem), "decode_layers", arg)
    }
}

/// All layers of a decode step in one launch: the streaming or the barrier kernel.
pub(crate) enum Fused {
    Stream(Persistent),
    Barrier(crate::mega::Mega),
}

impl Fused {
    /// The kernel [`decode_kernel`] asks for, if the model suits it (None: the per-op
    /// graph; why not is printed with ROOFTOP_VERBOSE). Both single-launch kernels need
    /// sm_90+ (bulk copies, mbarriers) and one weight format for every layer (they are
    /// compiled per format).
    pub(crate) fn new(
        dec: &CudaDecoder,
        kc: &[CudaSlice<u16>],
        vc: &[CudaSlice<u16>],
    ) -> Result<Option<Self>, CudaError> {
        let kind = decode_kernel();
        let cc = dec.dev.cc;
        let made = if kind == DecodeKernel::PerOp {
            return Ok(None);
        } else if cc.0 < 9 {
            Err(format!("needs sm_90+, this GPU is sm_{}{}", cc.0, cc.1))
        } else if let Some(f) = uniform_format(dec) {
            match kind {
                DecodeKernel::Stream => Persistent::new(dec, kc, vc, f)?.map(Fused::Stream),
                _ => crate::mega::Mega::new(dec, kc, vc, f)?.map(Fused::Barrier),
            }
        } else {
            Err("layer weights are not all in one format".into())
        };
        match made {
            Ok(f) => Ok(Some(f)),
            Err(why) => {
                if std::env::var("ROOFTOP_VERBOSE").is_ok() {
                    eprintln!("{kind:?} decode kernel not used: {why}");
                }
                Ok(None)
            }
        }
    }
    pub(crate) fn ids(&self) -> &CudaSlice<i32> {
        match self {
            Fused::Stream(p) => p.ids(),
            Fused::Barrier(m) => m.ids(),
        }
    }
    pub(crate) fn phase_report(&self, dev: &CudaDevice) -> Result<Option<String>, CudaError> {
        match self {
            Fused::Stream(p) => p.phase_report(dev),
            Fused::Barrier(m) => m.phase_report(dev),
        }
    }
    /// Which kernel this is.
    pub(crate) fn kind(&self) -> DecodeKernel {
        match self {
            Fused::Stream(_) => DecodeKernel::Stream,
            Fused::Barrier(_) => DecodeKernel::Barrier,
        }
    }
    /// Enqueue all layers (see [`Persistent::enqueue`]).
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
        match self {
            Fused::Stream(p) => p.enqueue(dev, h, qkv, att, pos, hidden, max_seq),
            Fused::Barrier(m) => m.enqueue(dev, h, qkv, att, pos, hidden, max_seq),
        }
    }
}
