//! Host side of the persistent decode kernel (`kernels/decode.cu`): every layer of a
//! token in one launch, for models whose layer weights share one format (the kernel is
//! compiled per format). Opt-in (`ROOFTOP_PERSISTENT=1`): on an H200 it is still slower
//! than the launch-per-op path (5.3 vs 3.5 ms per qwen3-30b-a3b token; its per-phase
//! timing, `ROOFTOP_VERBOSE=1`, shows the attention and gate/up phases dominate).

use crate::decoder::{CudaDecoder, CudaFfn};
use crate::device::{cfg, launch, CudaDevice};
use crate::moe::RoutingArg;
use crate::nvrtc::{KernelFormat, ModuleSource};
use crate::weight::{lanes_per_row, QwArg};
use crate::CudaError;
use cudarc::driver::{CudaSlice, DeviceRepr};

static PERSISTENT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Use (or not) the persistent kernel for decoder states made from now on, whatever
/// `ROOFTOP_PERSISTENT` says (checks run both paths).
pub fn set_persistent(on: bool) {
    PERSISTENT.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// `struct LayerDesc` in decode.cu (field for field).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LayerDesc {
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
    lpr_qkv: i32,
    lpr_o: i32,
    lpr_router: i32,
    lpr_gu: i32,
    lpr_down: i32,
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
    wts: u64,
    act: u64,
    ids: u64,
    pos: u64,
    bar: u64,
    dbg: u64,
    n_layers: i32,
    hidden: i32,
    max_seq: i32,
    prefetch: i32,
}
unsafe impl DeviceRepr for StepArg {}

/// Device buffers the persistent kernel works in, besides the decoder state's.
pub(crate) struct Persistent {
    format: KernelFormat,
    descs: CudaSlice<u8>,
    bar: CudaSlice<u32>,
    logits: CudaSlice<f32>,
    wts: CudaSlice<f32>,
    act: CudaSlice<f32>,
    ids: CudaSlice<i32>,
    n_layers: usize,
    smem: usize,
    prefetch: bool,
    max_heads: usize,
    /// `[n_layers][8]` phase timestamps (ROOFTOP_VERBOSE).
    dbg: Option<CudaSlice<u64>>,
}

/// The single format of every layer weight, if there is one (and the shapes suit the
/// kernel: one stacked QKV, head_dim ≤ 256, top-k ≤ 64).
fn uniform_format(dec: &CudaDecoder) -> Option<KernelFormat> {
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

impl Persistent {
    /// Build the layer table for a state whose KV caches are `kc`/`vc`. None when the
    /// model does not suit the kernel, or it is not asked for (`ROOFTOP_PERSISTENT=1`
    /// or [`set_persistent`]).
    pub(crate) fn new(
        dec: &CudaDecoder,
        kc: &[CudaSlice<u16>],
        vc: &[CudaSlice<u16>],
    ) -> Result<Option<Self>, CudaError> {
        // Opt-in until it beats the launch-per-op path (docs/PERFORMANCE-cuda.md).
        let on = match PERSISTENT.load(std::sync::atomic::Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => std::env::var("ROOFTOP_PERSISTENT").is_ok_and(|v| v == "1"),
        };
        if !on {
            return Ok(None);
        }
        let Some(format) = uniform_format(dec) else {
            return Ok(None);
        };
        let dev = &dec.dev;
        let h = dec.hidden();
        let none = QwArg::default();
        let mut descs = Vec::with_capacity(dec.layers.len());
        let (mut max_logits, mut max_act, mut max_k, mut smem) = (1, 1, 1, 0usize);
        let stage = |floats: usize| floats * 4 + floats / 32 * 4;
        for (li, l) in dec.layers.iter().enumerate() {
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
                kc: dev.ptr(&kc[li]),
                vc: dev.ptr(&vc[li]),
                eps: l.eps,
                qk_eps: a.qk_eps,
                mscale: a.rope.mscale,
                scale: a.scale,
                heads: a.heads as i32,
                kv_heads: a.kv_heads as i32,
                head_dim: a.head_dim as i32,
                rot: a.rope.rot_dim as i32,
                traditional: a.rope.traditional as i32,
                lpr_qkv: lanes_per_row(h, format.unroll()),
                lpr_o: lanes_per_row(a.o.cols, format.unroll()),
                lpr_router: 1,
                lpr_gu: lanes_per_row(h, format.unroll()),
                ..Default::default()
            };
            smem = smem
                .max(stage(h))
                .max(stage(a.o.cols))
                .max((4 * 256 + 64 + 2048 + 256) * 4);
            let (inter, ish, k) = match &l.ffn {
                CudaFfn::Moe(m) => {
                    d.router = m.router.arg(dev);
                    d.gate = m.gate.arg(dev);
                    d.up = m.up.arg(dev);
                    d.down = m.down.arg(dev);
                    d.rt = m.routing_arg(dev);
                    d.lpr_router = lanes_per_row(h, format.unroll());
                    if let Some([g, u, dd]) = &m.shared {
                        (d.sg, d.su, d.sd) = (g.arg(dev), u.arg(dev), dd.arg(dev));
                    }
                    max_logits = max_logits.max(m.n_experts);
                    (m.inter, m.inter_shared(), m.routing.top_k)
                }
                CudaFfn::Mlp(m) => {
                    let [g, u, dd] = &m.w;
                    (d.sg, d.su, d.sd) = (g.arg(dev), u.arg(dev), dd.arg(dev));
                    d.router = none;
                    (0, g.rows, 0)
                }
            };
            d.inter = inter as i32;
            d.inter_sh = ish as i32;
            let min_cols = match (k, ish) {
                (0, s) => s,
                (_, 0) => inter,
                (_, s) => inter.min(s),
            };
            d.lpr_down = lanes_per_row(min_cols, format.unroll());
            let slots = k + (ish > 0) as usize;
            smem = smem.max(slots * stage(inter.max(ish)));
            max_act = max_act.max(k * inter + ish);
            max_k = max_k.max(k);
            descs.push(d);
        }
        dev.check_smem("persistent decode", smem)?;
        let bytes: Vec<u8> = descs
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
            .collect();
        Ok(Some(Persistent {
            format,
            descs: dev.upload(&bytes)?,
            bar: dev.alloc(1)?,
            logits: dev.alloc(max_logits)?,
            wts: dev.alloc(max_k)?,
            act: dev.alloc(max_act)?,
            ids: dev.alloc(max_k)?,
            n_layers: dec.layers.len(),
            smem,
            prefetch: crate::nvrtc::prefetch(),
            max_heads: dec.layers.iter().map(|l| l.attn.heads).max().unwrap_or(1),
            dbg: if std::env::var("ROOFTOP_VERBOSE").is_ok() {
                Some(dev.alloc(dec.layers.len() * 8)?)
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
        let names = ["qkv", "attention", "o_proj", "router", "gate/up", "down"];
        let mut sum = [0f64; 6];
        let n = self.n_layers;
        for l in 0..n {
            let row = &t[l * 8..l * 8 + 8];
            // Stamps: 0 start, 1..=6 after each barrier (router's is 4; a dense layer
            // skips it and leaves the previous step's value, so clamp at 0).
            for (i, s) in sum.iter_mut().enumerate() {
                let (a, b) = (row[i], row[i + 1]);
                *s += b.saturating_sub(a) as f64 / 1e3;
            }
        }
        Ok(Some(
            names
                .iter()
                .zip(sum)
                .map(|(n_, s)| format!("{n_} {:.1} us", s / n as f64))
                .collect::<Vec<_>>()
                .join(", "),
        ))
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
        let m = ModuleSource::gemv(self.format);
        let f = dev.function(&m, "decode_layers")?;
        dev.stream()
            .memset_zeros(&mut self.bar)
            .map_err(|e| CudaError::Driver {
                op: "cuMemsetD8Async".into(),
                source: e,
            })?;
        // Every CTA must be resident at once (grid barriers): the occupancy bound.
        let grid = dev.grid_for(&f, 256, self.smem, usize::MAX);
        if (grid as usize) < self.max_heads {
            return Err(CudaError::Unsupported(format!(
                "persistent decode needs one CTA per head ({}) but only {grid} fit; unset ROOFTOP_PERSISTENT",
                self.max_heads
            )));
        }
        if std::env::var("ROOFTOP_VERBOSE").is_ok() {
            eprintln!(
                "persistent decode: grid {grid} x 256 threads, {} B shared, {} regs/thread",
                self.smem,
                f.num_regs().unwrap_or(-1)
            );
        }
        let arg = StepArg {
            layers: dev.ptr(&self.descs),
            h,
            qkv,
            att,
            logits: dev.ptr(&self.logits),
            wts: dev.ptr(&self.wts),
            act: dev.ptr(&self.act),
            ids: dev.ptr(&self.ids),
            pos,
            bar: dev.ptr(&self.bar),
            dbg: self.dbg.as_ref().map_or(0, |d| dev.ptr(d)),
            n_layers: self.n_layers as i32,
            hidden: hidden as i32,
            max_seq: max_seq as i32,
            prefetch: self.prefetch as i32,
        };
        launch!(dev, f, cfg((grid, 1), 256, self.smem), "decode_layers", arg)
    }
}
