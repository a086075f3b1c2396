//! A whole decoder-only transformer on the GPU, batch-1 decode: embedding → layers
//! (GQA attention, MoE or dense MLP) → final norm → lm_head → greedy token, all
//! enqueued without host synchronization and replayed as one CUDA graph per token.
//!
//! Launches per layer (RMSNorms are fused into the launches that read the residual):
//! ```text
//! qkv gemv (+norm) · qkv_post (bias, q/k norm, rope, KV append) · attention (split-K;
//! each head's last split merges, or a merge launch when there are few splits)
//! · o gemv (+= residual) · router (+norm) · gate/up (+ top-k) · down (+= residual)
//! ```
//! The architecture mapping (which tensors, which norms) lives in the engine; this
//! module only knows shapes and device weights.

use crate::device::{cfg, launch, CudaDevice};
use crate::error::{shape, DriverResult};
use crate::moe::{CudaMlp, CudaMoe, MoeScratch};
use crate::nvrtc::{KernelFormat, ModuleSource};
use crate::persistent::{DecodeKernel, Fused};
use crate::weight::{lanes_per_row, stage_bytes, CudaWeight, PfArg};
use crate::{AttnShape, CudaError, CudaGraph};
use cudarc::driver::{CudaSlice, DeviceRepr};
use std::sync::Arc;

/// Rotary embedding of one layer: per-pair angular frequencies (scaling folded in).
pub struct CudaRope {
    pub inv_freq: CudaSlice<f32>,
    /// Features rotated (≤ head_dim).
    pub rot_dim: usize,
    pub traditional: bool,
    /// Yarn's scale of the rotated features (1 otherwise).
    pub mscale: f32,
}

/// Grouped-query attention with optional biases and q/k RMSNorm.
pub struct CudaAttention {
    /// q, k, v projections: one stacked `[(H + 2KV)·hd, D]` weight when they share a
    /// format (one launch), else three.
    pub qkv: Vec<CudaWeight>,
    pub qkv_bias: Option<CudaSlice<f32>>,
    pub o: CudaWeight,
    pub o_bias: Option<CudaSlice<f32>>,
    pub q_norm: Option<CudaSlice<f32>>,
    pub k_norm: Option<CudaSlice<f32>>,
    pub qk_eps: f32,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Score scale (`head_dim^-0.5` unless the model says otherwise).
    pub scale: f32,
    pub rope: CudaRope,
}

// One per layer, built once: the variants' size difference is irrelevant.
#[allow(clippy::large_enum_variant)]
pub enum CudaFfn {
    Moe(CudaMoe),
    Mlp(CudaMlp),
}

/// Pre-norm block: `h += attn(norm(h)); h += ffn(norm(h))`.
pub struct CudaLayer {
    pub attn_norm: CudaSlice<f32>,
    pub attn: CudaAttention,
    pub ffn_norm: CudaSlice<f32>,
    pub ffn: CudaFfn,
    pub eps: f32,
}

/// The model's weights on one device.
pub struct CudaDecoder {
    pub dev: Arc<CudaDevice>,
    pub embed: CudaWeight,
    pub embed_scale: f32,
    pub layers: Vec<CudaLayer>,
    pub norm: CudaSlice<f32>,
    pub eps: f32,
    /// None = tied to the embedding.
    pub lm_head: Option<CudaWeight>,
}

/// Bytes one decode token streams, by component.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepBytes {
    pub attention: usize,
    pub router: usize,
    pub experts: usize,
    pub dense_mlp: usize,
    pub lm_head: usize,
    pub embed_row: usize,
}

impl StepBytes {
    pub fn total(&self) -> usize {
        self.attention + self.router + self.experts + self.dense_mlp + self.lm_head + self.embed_row
    }
}

impl CudaAttention {
    /// This layer's attention geometry over a sequence state's caches and splits.
    pub(crate) fn shape(&self, s: &CudaState) -> AttnShape {
        AttnShape {
            n_heads: self.heads,
            n_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            max_seq: s.max_seq,
            splits: s.splits,
        }
    }
}

/// qkv_post's arguments for attention `a` with caches of `max_seq` positions.
pub(crate) fn qkv_post_arg(dev: &CudaDevice, a: &CudaAttention, max_seq: usize) -> QkvPostArg {
    QkvPostArg {
        bias: a.qkv_bias.as_ref().map_or(0, |b| dev.ptr(b)),
        qn: a.q_norm.as_ref().map_or(0, |b| dev.ptr(b)),
        kn: a.k_norm.as_ref().map_or(0, |b| dev.ptr(b)),
        inv_freq: dev.ptr(&a.rope.inv_freq),
        eps: a.qk_eps,
        mscale: a.rope.mscale,
        rot: a.rope.rot_dim as i32,
        traditional: a.rope.traditional as i32,
        n_heads: a.heads as i32,
        n_kv: a.kv_heads as i32,
        head_dim: a.head_dim as i32,
        max_seq: max_seq as i32,
    }
}

/// `struct QkvPost` in ops.cu.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct QkvPostArg {
    bias: u64,
    qn: u64,
    kn: u64,
    inv_freq: u64,
    eps: f32,
    mscale: f32,
    rot: i32,
    traditional: i32,
    n_heads: i32,
    n_kv: i32,
    head_dim: i32,
    max_seq: i32,
}
unsafe impl DeviceRepr for QkvPostArg {}

/// `struct Epi` in gemv.cu.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct EpiArg {
    pub(crate) nw: u64,
    pub(crate) eps: f32,
    pub(crate) add: i32,
    pub(crate) bias: u64,
}
unsafe impl DeviceRepr for EpiArg {}

/// Epilogue options of one decoder GEMV.
#[derive(Clone, Copy, Default)]
pub(crate) struct Gemv<'a> {
    pub(crate) norm: Option<(&'a CudaSlice<f32>, f32)>,
    pub(crate) add: bool,
    pub(crate) bias: Option<&'a CudaSlice<f32>>,
    pub(crate) next: Option<&'a CudaWeight>,
    /// A decode launch that may preload its weights (`gemv_pre`): its
    /// name for [`preload_of`], or "".
    pub(crate) pre: &'static str,
    /// Exact f32 activations whatever the format ([`ModuleSource::gemv_router`]).
    pub(crate) exact: bool,
}

/// Whether decode launch `what` ("qkv", "o", "router") over weights of format `f`
/// copies its weights on chip before waiting for the previous kernel (`gemv_pre` in
/// gemv.cu). Default: for formats with int8 activations (4-bit affine, nvfp4, mxfp4),
/// where it measured 406 -> 451 tok/s on an H200 (qwen3-30b-a3b affine4; nvfp4 406 ->
/// 419); with the f32-activation kernels one CTA per SM has too few warps for their
/// decode work (nvfp4 with f32 activations: 354 -> 342). Override:
/// `ROOFTOP_PRELOAD=0` (off), `1` (every format), or a comma list of launch names (every
/// format). Read once.
pub(crate) fn preload_of(what: &str, f: KernelFormat) -> bool {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let v = V.get_or_init(|| std::env::var("ROOFTOP_PRELOAD").unwrap_or_default());
    match v.as_str() {
        "" => crate::nvrtc::int8_activations(f),
        "0" => false,
        "1" => true,
        l => l.split(',').any(|p| p == what),
    }
}

/// Whether decode attention post-processes q/k/v itself (`attn_decode`, one launch less
/// per layer) instead of a `qkv_post` launch. Opt-in (`ROOFTOP_ATTN_FUSED=1`): on an H200
/// it gains ~2% at short contexts (qwen3-30b-a3b affine4 485.5 -> 495.1 tok/s) and loses
/// ~2% after a 4096-token prompt (328.0 -> 321.5). Its first version ran the attention
/// 1.8x slower there: each position chose between a load and the new k/v in shared
/// memory, which held loads behind branch joins; the substitution now happens once per
/// batch after the loads are issued.
fn attn_fused() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("ROOFTOP_ATTN_FUSED").as_deref() == Ok("1"))
}

/// Whether each head's last decode-attention split merges the `splits` splits (no
/// `attn_combine` launch): where there are at least 8. On an H200, qwen3-30b-a3b (32
/// heads, 9 splits) decode 475.3 -> 495.6 tok/s (affine4), 414.9 -> 430.2 (nvfp4),
/// 292.3 -> 294.2 (affine3), after an 8192-token prompt (32 splits) 260.6 -> 276.0;
/// glm-4.5-air (96 heads, 3 splits) lost: mixed_3_4 128.5 -> 120.1 (118.6 with the merge
/// at 9 splits; not understood), affine4 184.9 -> 183.6. `ROOFTOP_ATTN_LAST=1` / `0`:
/// always / never (A/B).
fn attn_last(splits: usize) -> bool {
    static V: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    V.get_or_init(|| match std::env::var("ROOFTOP_ATTN_LAST").as_deref() {
        Ok("1") => Some(true),
        Ok("0") => Some(false),
        _ => None,
    })
    .unwrap_or(splits >= 8)
}

/// Decode contexts of at least CTX_LONG positions are long: their attention takes one
/// wave of resident CTAs in splits, short ones two CTAs per SM; each bucket has its own
/// captured graph. On an H200 (qwen3-30b-a3b affine4: 32 heads, 4 attention CTAs per
/// SM = 528 at once), decode tok/s by splits — short context: 4 / 8 / 16 / 32 splits
/// 483.2 / 485.7 / 481.8 / 430.5; after a 4096-token prompt: 9 / 16 / 17 / 32 splits
/// 328.6 / 375.1 / 303.5 / 328.7 (17: 544 CTAs, a tail wave of 16); after 8192: 9 / 16 /
/// 17 / 32 splits 245.9 / 304.5 / 228.4 / 276.5.
/// `ROOFTOP_CTX_LONG=N` moves the threshold (tests run tiny models in the long bucket).
const CTX_LONG: usize = 2048;
fn ctx_bucket(len: usize) -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let long = *V.get_or_init(|| {
        crate::nvrtc::env_usize("ROOFTOP_CTX_LONG", 0..=usize::MAX).unwrap_or(CTX_LONG)
    });
    (len >= long) as usize
}

/// Whether long decode contexts use the grouped kernel (`attn_group`: each K/V tile
/// read once per q-head group instead of once per q head). Opt-in
/// (`ROOFTOP_ATTN_GROUP=1`): correct, but slower on an H200 (qwen3-30b-a3b affine4 after
/// a 4096-token prompt 340.6 / 352.3 / 342.0 tok/s at 64 / 32 / 16 splits against 376.6
/// per head; after 8192 299.9 vs 305.9): each warp walks its split's positions alone,
/// one tile at a time, where the per-head kernel spreads them over 4 warps.
fn attn_group() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("ROOFTOP_ATTN_GROUP").as_deref() == Ok("1"))
}

/// Lanes per row and chunk slots per lane of a preloading launch over rows of `cols`
/// weights (`lpr * slots >= cols / 32`, at most `KPRE` slots: 128 bytes at 4 bits); None
/// where a row is too long for 32 lanes. `exact` (f32 activations): as many lanes per
/// row as there are chunks, up to 32 — its dequantize-and-FMA dot costs several times
/// the int8 one per chunk, and the router's few rows leave most SMs idle anyway (on an
/// H200: qwen3-30b-a3b affine4 469 -> 477 tok/s; a warp-per-row kernel reading x from
/// L1 without staging was slower still, 439–457: its per-lane chunk loads do not coalesce).
fn pre_lanes(f: KernelFormat, cols: usize, exact: bool) -> Option<(usize, usize)> {
    let c = cols / 32;
    let kpre = (32 / f.bits as usize).max(1);
    let mut lpr = 1;
    while lpr * kpre < c || (exact && lpr < 32 && lpr < c) {
        lpr *= 2;
    }
    (lpr <= 32).then(|| (lpr, c.div_ceil(lpr)))
}

/// `y (+)= W · norm(x)` as one `gemv_pre` launch; false (nothing launched) where `w`
/// does not suit it (rows too long or too many for one preloaded wave). `exact`: f32
/// activations whatever the format ([`ModuleSource::gemv_router`]).
pub(crate) fn gemv_pre(
    dev: &CudaDevice,
    w: &CudaWeight,
    exact: bool,
    x: u64,
    y: u64,
    e: EpiArg,
) -> Result<bool, CudaError> {
    let Some((lpr, nk)) = pre_lanes(w.format, w.cols, exact) else {
        return Ok(false);
    };
    // One CTA per SM of at most 16 warps (so that the next launch fits beside it), at
    // least 4 (or all).
    let warps = w.rows.div_ceil(32 / lpr);
    let wpc = warps.div_ceil(dev.sms).max(warps.min(4));
    if wpc > 16 {
        return Ok(false);
    }
    let threads = wpc * 32;
    let smem = stage_bytes(1, w.cols).next_multiple_of(16) + threads * nk * w.format.chunk_bytes();
    if smem + 1024 > dev.max_smem {
        return Ok(false);
    }
    let f = dev.function(&ModuleSource::gemv_for(w.format, exact), "gemv_pre")?;
    let grid = warps.div_ceil(wpc) as u32;
    let (arg, lpr) = (w.arg(dev), lpr as i32);
    launch!(
        dev,
        f,
        cfg((grid, 1), threads as u32, smem),
        "gemv_pre",
        arg,
        x,
        y,
        lpr,
        e
    )?;
    Ok(true)
}

/// Per-sequence device state: residual stream, scratch, KV caches, the token and
/// position the captured graph reads, and the graph itself.
pub struct CudaState {
    pub(crate) h: CudaSlice<f32>,
    pub(crate) qkv: CudaSlice<f32>,
    pub(crate) att: CudaSlice<f32>,
    pub(crate) partial: CudaSlice<f32>,
    /// Decode attention's arrival counter per head (zero between launches).
    pub(crate) att_cnt: CudaSlice<u32>,
    pub(crate) logits: CudaSlice<f32>,
    pub(crate) moe: Option<MoeScratch>,
    pub(crate) kc: Vec<CudaSlice<u16>>,
    pub(crate) vc: Vec<CudaSlice<u16>>,
    /// `[1]` the token the next step embeds (the greedy step writes its choice here).
    pub(crate) tok: CudaSlice<i32>,
    /// `[1]` the position of the next token.
    pub(crate) pos: CudaSlice<i32>,
    amax_val: CudaSlice<f32>,
    amax_idx: CudaSlice<i32>,
    amax_cnt: CudaSlice<u32>,
    /// Attention splits of prefill chunks (and of short decode contexts).
    pub(crate) splits: usize,
    /// Decode attention's splits for short and long contexts ([`ctx_bucket`]).
    decode_splits: [usize; 2],
    pub(crate) max_seq: usize,
    pub(crate) len: usize,
    /// The decode step's graphs per context bucket, plain and greedy.
    graphs: [[Option<CudaGraph>; 2]; 2],
    /// All layers in one launch (the streaming kernel, persistent.rs), when asked for
    /// and the model suits it.
    persistent: Option<Fused>,
    /// Prefill-chunk buffers and graphs (prefill.rs), made on the first prefill.
    pub(crate) chunk: Option<crate::prefill::ChunkBufs>,
    /// Tensor-core prefill buffers (tc.rs), made on the first long prompt.
    pub(crate) tc: Option<crate::tc::TcBufs>,
}

impl CudaState {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.max_seq
    }
    /// The experts the last MoE layer of the last step chose (None without MoE layers).
    pub fn moe_ids(&self, dev: &CudaDevice) -> Result<Option<Vec<i32>>, CudaError> {
        if let (Some(p), Some(_)) = (&self.persistent, &self.moe) {
            return Ok(Some(dev.download(p.ids())?));
        }
        self.moe.as_ref().map(|m| dev.download(&m.ids)).transpose()
    }
    /// Per-op timing of the streaming kernel's last step (ROOFTOP_VERBOSE only).
    pub fn phase_report(&self, dev: &CudaDevice) -> Result<Option<String>, CudaError> {
        match &self.persistent {
            Some(p) => p.phase_report(dev),
            None => Ok(None),
        }
    }
    /// Whether decode steps run as one persistent launch for all layers.
    pub fn persistent(&self) -> bool {
        self.persistent.is_some()
    }
    /// The kernel that runs this state's layers.
    pub fn decode_kernel(&self) -> DecodeKernel {
        self.persistent
            .as_ref()
            .map_or(DecodeKernel::PerOp, |p| p.kind())
    }
}

/// Which launches of a step to enqueue (all for decoding; subsets time components).
#[derive(Clone, Copy, Debug)]
pub struct Parts {
    pub embed: bool,
    pub attention: bool,
    pub ffn: bool,
    /// Final norm, lm_head, and the greedy pick / position advance.
    pub head: bool,
}

impl Parts {
    pub const ALL: Parts = Parts {
        embed: true,
        attention: true,
        ffn: true,
        head: true,
    };
    const NONE: Parts = Parts {
        embed: false,
        attention: false,
        ffn: false,
        head: false,
    };
}

/// Device time of one decode step and of its components alone (each replayed as its
/// own graph), in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepTimes {
    pub step: f64,
    pub attention: f64,
    pub ffn: f64,
    pub head: f64,
}

/// Argmax partial blocks.
const AMAX_BLOCKS: usize = 128;

impl CudaDecoder {
    pub fn vocab(&self) -> usize {
        self.lm_head.as_ref().unwrap_or(&self.embed).rows
    }
    pub fn hidden(&self) -> usize {
        self.embed.cols
    }

    /// Weight bytes resident on the device.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed.nbytes() + self.lm_head.as_ref().map_or(0, |w| w.nbytes());
        for l in &self.layers {
            n += l.attn.qkv.iter().map(|w| w.nbytes()).sum::<usize>() + l.attn.o.nbytes();
            n += match &l.ffn {
                CudaFfn::Moe(m) => {
                    m.router.nbytes()
                        + m.gate.nbytes()
                        + m.up.nbytes()
                        + m.down.nbytes()
                        + m.shared
                            .as_ref()
                            .map_or(0, |s| s.iter().map(|w| w.nbytes()).sum())
                }
                CudaFfn::Mlp(m) => m.bytes(),
            };
        }
        n
    }

    /// Weight bytes one decode token reads (KV-cache reads excluded: they depend on the
    /// context; see [`CudaDecoder::kv_bytes_per_position`]).
    pub fn step_bytes(&self) -> StepBytes {
        let lm = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut b = StepBytes {
            lm_head: lm.nbytes(),
            embed_row: self.embed.rows_nbytes(1),
            ..Default::default()
        };
        for l in &self.layers {
            b.attention += l.attn.qkv.iter().map(|w| w.nbytes()).sum::<usize>() + l.attn.o.nbytes();
            match &l.ffn {
                CudaFfn::Moe(m) => {
                    let [r, gu, d] = m.part_bytes();
                    b.router += r;
                    b.experts += gu + d;
                }
                CudaFfn::Mlp(m) => b.dense_mlp += m.bytes(),
            }
        }
        b
    }

    /// KV-cache bytes attention reads per cached position (f16 K and V, all layers).
    pub fn kv_bytes_per_position(&self) -> usize {
        self.layers
            .iter()
            .map(|l| 2 * 2 * l.attn.kv_heads * l.attn.head_dim)
            .sum()
    }

    /// Allocate the state of one sequence of up to `max_seq` tokens (fails with the
    /// bytes needed when the KV cache does not fit).
    pub fn new_state(&self, max_seq: usize) -> Result<CudaState, CudaError> {
        let dev = &self.dev;
        if max_seq == 0 || max_seq > i32::MAX as usize {
            return Err(shape("decoder", format!("max_seq {max_seq}")));
        }
        let kv_bytes = self.kv_bytes_per_position() * max_seq;
        dev.check_fits(&format!("the KV cache for {max_seq} tokens"), kv_bytes)?;
        let d = self.hidden();
        let (mut qkv, mut att, mut partial) = (0, 0, 0);
        let mut moe = None;
        // Attention splits (heads x splits CTAs): two per SM for prefill chunks and short
        // decode contexts; for long ones (CTX_LONG) as many as fit at once on the GPU —
        // one whole wave: one CTA past it leaves a tail wave, two waves were slower too.
        // ROOFTOP_SPLITS overrides both (tuning).
        let heads = self.layers.iter().map(|l| l.attn.heads).max().unwrap_or(1);
        let wave = {
            let f = dev.function(&ModuleSource::ops(), "attn_partial")?;
            dev.grid_for(&f, 128, 0, usize::MAX) as usize
        };
        let short = (2 * dev.sms).div_ceil(heads).clamp(1, 32);
        let mut long = (wave / heads).clamp(short, 32);
        // The grouped kernel (long contexts): as many splits as its CTAs fit at once
        // (kv heads x splits), at most 64. ROOFTOP_SPLITS_G overrides it.
        let group_shape = self
            .layers
            .first()
            .map(|l| AttnShape {
                n_heads: l.attn.heads,
                n_kv_heads: l.attn.kv_heads,
                head_dim: l.attn.head_dim,
                max_seq,
                splits: 64,
            })
            .filter(|g| {
                g.group_fits()
                    && self
                        .layers
                        .iter()
                        .all(|l| l.attn.heads == g.n_heads && l.attn.kv_heads == g.n_kv_heads)
            });
        if let Some(g) = group_shape.filter(|_| attn_group()) {
            let f = dev.function(&ModuleSource::ops(), "attn_group")?;
            let threads = 32 * g.n_heads / g.n_kv_heads;
            let cap = dev.grid_for(&f, threads as u32, g.group_smem(), usize::MAX) as usize;
            long = crate::nvrtc::env_usize("ROOFTOP_SPLITS_G", 1..=64)
                .unwrap_or((cap / g.n_kv_heads).clamp(1, 64));
        }
        let decode_splits = [short, long].map(|n| {
            crate::nvrtc::env_usize("ROOFTOP_SPLITS", 1..=64)
                .unwrap_or(n)
                .min(max_seq)
        });
        let splits = decode_splits[0];
        let most = decode_splits.iter().copied().max().unwrap_or(splits);
        for l in &self.layers {
            let a = &l.attn;
            qkv = qkv.max((a.heads + 2 * a.kv_heads) * a.head_dim);
            att = att.max(a.heads * a.head_dim);
            partial = partial.max(a.heads * most * (a.head_dim + 2));
            if let (CudaFfn::Moe(m), None) = (&l.ffn, &moe) {
                moe = Some(m.scratch(dev)?);
            }
        }
        let mut kc = Vec::with_capacity(self.layers.len());
        let mut vc = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let n = l.attn.kv_heads * max_seq * l.attn.head_dim;
            kc.push(dev.alloc::<u16>(n)?);
            vc.push(dev.alloc::<u16>(n)?);
        }
        let persistent = Fused::new(self, &kc, &vc)?;
        Ok(CudaState {
            persistent,
            h: dev.alloc(d)?,
            qkv: dev.alloc(qkv)?,
            att: dev.alloc(att)?,
            partial: dev.alloc(partial)?,
            att_cnt: dev.alloc(heads)?,
            logits: dev.alloc(self.vocab())?,
            moe,
            kc,
            vc,
            tok: dev.alloc(1)?,
            pos: dev.alloc(1)?,
            amax_val: dev.alloc(AMAX_BLOCKS)?,
            amax_idx: dev.alloc(AMAX_BLOCKS)?,
            amax_cnt: dev.alloc(1)?,
            splits,
            decode_splits,
            max_seq,
            len: 0,
            graphs: Default::default(),
            chunk: None,
            tc: None,
        })
    }

    /// Forget the sequence (keeps allocations and graphs).
    pub fn reset(&self, s: &mut CudaState) -> Result<(), CudaError> {
        s.len = 0;
        self.dev.write(&mut s.pos, &[0])
    }

    /// `y (+)= W · norm(x) (+ bias)`, prefetching `next` for a later launch.
    pub(crate) fn gemv(&self, w: &CudaWeight, x: u64, y: u64, o: Gemv) -> Result<(), CudaError> {
        let Gemv {
            norm,
            add,
            bias,
            next,
            pre,
            exact,
        } = o;
        let dev = &self.dev;
        let m = ModuleSource::gemv_for(w.format, exact);
        let e = EpiArg {
            nw: norm.map_or(0, |(n, _)| dev.ptr(n)),
            eps: norm.map_or(0.0, |(_, e)| e),
            add: add as i32,
            bias: bias.map_or(0, |b| dev.ptr(b)),
        };
        if !pre.is_empty() && preload_of(pre, w.format) && gemv_pre(dev, w, exact, x, y, e)? {
            return Ok(());
        }
        let f = dev.function(&m, "gemv1_epi")?;
        let smem = stage_bytes(1, w.cols);
        dev.check_smem("gemv", smem)?;
        let (lpr, rows_per_slot) = match w.format.rows_gemv() {
            r if r > 1 => (lanes_per_row(w.cols, 1), r),
            _ => (lanes_per_row(w.cols, w.format.unroll()), 1),
        };
        let warps = w.rows.div_ceil(32 / lpr as usize * rows_per_slot);
        let grid = dev.grid_for(&f, 256, smem, warps.div_ceil(8));
        let arg = w.arg(dev);
        let pf = PfArg::of(dev, next);
        launch!(
            dev,
            f,
            cfg((grid, 1), 256, smem),
            "gemv1_epi",
            arg,
            x,
            y,
            lpr,
            e,
            pf
        )
    }

    /// Enqueue one decode step: embed `tok`, run every layer at `pos`, and leave the
    /// logits in the state. `greedy`: also pick the argmax into `tok` and advance `pos`;
    /// otherwise only advance `pos`.
    fn enqueue_step(&self, s: &mut CudaState, greedy: bool, parts: Parts) -> Result<(), CudaError> {
        let dev = &self.dev;
        let ops = ModuleSource::ops();
        let (ph, ptok, ppos) = (dev.ptr(&s.h), dev.ptr(&s.tok), dev.ptr(&s.pos));
        if parts.embed {
            let f = dev.function(&ModuleSource::gemv(self.embed.format), "embed_row")?;
            let (earg, escale) = (self.embed.arg(dev), self.embed_scale);
            let grid = (self.embed.cols / 32).div_ceil(256) as u32;
            launch!(
                dev,
                f,
                cfg((grid, 1), 256, 0),
                "embed_row",
                earg,
                ptok,
                ph,
                escale
            )?;
        }

        let fused = parts.attention && parts.ffn && s.persistent.is_some();
        if fused {
            let (pq, patt) = (dev.ptr(&s.qkv), dev.ptr(&s.att));
            let (max_seq, hidden) = (s.max_seq, self.hidden());
            let p = s.persistent.as_mut().expect("checked");
            p.enqueue(dev, ph, pq, patt, ppos, hidden, max_seq)?;
        }
        for (li, l) in self.layers.iter().enumerate() {
            if fused {
                break;
            }
            if parts.attention {
                self.enqueue_attention(s, li)?;
            }
            if parts.ffn {
                // Feed-forward (+ fused post-attention norm), added into the residual.
                let norm = Some((&l.ffn_norm, l.eps));
                // While the down projection runs, fetch the next layer's QKV.
                let next = self.layers.get(li + 1).map(|n| &n.attn.qkv[0]);
                match &l.ffn {
                    CudaFfn::Moe(m) => {
                        let sc = s.moe.as_mut().expect("allocated with the state");
                        m.step_raw(dev, sc, ph, ph, norm, next)?
                    }
                    CudaFfn::Mlp(m) => m.step_raw(dev, ph, ph, norm, next)?,
                }
            }
        }
        if !parts.head {
            return Ok(());
        }
        // Final norm + lm_head.
        let lm = self.lm_head.as_ref().unwrap_or(&self.embed);
        let plog = dev.ptr(&s.logits);
        let norm = Some((&self.norm, self.eps));
        let o = Gemv {
            norm,
            ..Default::default()
        };
        self.gemv(lm, ph, plog, o)?;
        if greedy {
            let f = dev.function(&ops, "argmax_step")?;
            let (pv, pi, pc, n) = (
                dev.ptr(&s.amax_val),
                dev.ptr(&s.amax_idx),
                dev.ptr(&s.amax_cnt),
                lm.rows as i32,
            );
            launch!(
                dev,
                f,
                cfg((AMAX_BLOCKS as u32, 1), 256, 0),
                "argmax_step",
                plog,
                n,
                pv,
                pi,
                pc,
                ptok,
                ppos
            )
        } else {
            let f = dev.function(&ops, "advance_pos")?;
            let one = 1i32;
            launch!(dev, f, cfg((1, 1), 32, 0), "advance_pos", ppos, one)
        }
    }

    /// Layer `li`'s attention: QKV (+ input norm), qkv_post, split-K attention, and the
    /// output projection added into the residual stream.
    fn enqueue_attention(&self, s: &mut CudaState, li: usize) -> Result<(), CudaError> {
        let dev = &self.dev;
        let ops = ModuleSource::ops();
        let (ph, pq, patt, ppart, ppos) = (
            dev.ptr(&s.h),
            dev.ptr(&s.qkv),
            dev.ptr(&s.att),
            dev.ptr(&s.partial),
            dev.ptr(&s.pos),
        );
        let l = &self.layers[li];
        {
            let a = &l.attn;
            // QKV (+ fused input norm).
            let mut off = 0u64;
            for w in &a.qkv {
                // The QKV launch prefetches the output projection for later.
                let o = Gemv {
                    norm: Some((&l.attn_norm, l.eps)),
                    next: Some(&a.o),
                    pre: "qkv",
                    ..Default::default()
                };
                self.gemv(w, ph, pq + off * 4, o)?;
                off += w.rows as u64;
            }
            // Bias, q/k norm, rope, KV append (or, ROOFTOP_ATTN_FUSED=1, folded into the
            // attention launch: attn_decode).
            let arg = qkv_post_arg(dev, a, s.max_seq);
            let (pkc, pvc) = (dev.ptr(&s.kc[li]), dev.ptr(&s.vc[li]));
            let fused = attn_fused();
            if !fused {
                let f = dev.function(&ops, "qkv_post")?;
                launch!(
                    dev,
                    f,
                    cfg(((a.heads + a.kv_heads) as u32, 1), a.head_dim as u32, 0),
                    "qkv_post",
                    pq,
                    ppos,
                    pkc,
                    pvc,
                    arg
                )?;
            }
            // Attention (split-K partials; each head's last split merges them), with as
            // many splits as this context length wants.
            let shape = AttnShape {
                splits: s.decode_splits[ctx_bucket(s.len)],
                ..a.shape(s)
            };
            let long = ctx_bucket(s.len) == 1;
            if long && !fused && attn_group() && shape.group_fits() {
                let buf = [pq, pkc, pvc, ppos, ppart, patt, dev.ptr(&s.att_cnt)];
                dev.attention_group_raw(buf, &shape, a.scale)?;
            } else {
                let pcnt = if attn_last(shape.splits) {
                    dev.ptr(&s.att_cnt)
                } else {
                    0
                };
                let buf = [pq, pkc, pvc, ppos, ppart, patt, pcnt];
                dev.attention_raw(buf, &shape, a.scale, 1, fused.then_some(arg))?;
            }
            // Output projection into the residual stream.
            let o = Gemv {
                add: true,
                bias: a.o_bias.as_ref(),
                pre: "o",
                ..Default::default()
            };
            self.gemv(&a.o, patt, ph, o)?;
        }
        Ok(())
    }

    pub(crate) fn check_room(&self, s: &CudaState, n: usize) -> Result<(), CudaError> {
        if s.len + n > s.max_seq {
            return Err(CudaError::Unsupported(format!(
                "context full: {} + {n} tokens exceed the {} the state was made for",
                s.len, s.max_seq
            )));
        }
        Ok(())
    }

    /// Replay (capturing on first use) the step graph.
    fn replay(&self, s: &mut CudaState, greedy: bool) -> Result<(), CudaError> {
        let (b, gi) = (ctx_bucket(s.len), greedy as usize);
        if s.graphs[b][gi].is_none() {
            // Compile and load every kernel outside the capture, then capture.
            let save_pos = self.dev.download(&s.pos)?;
            let save_tok = self.dev.download(&s.tok)?;
            self.enqueue_step(s, greedy, Parts::ALL)?;
            self.dev.synchronize()?;
            self.dev.write(&mut s.pos, &save_pos)?;
            self.dev.write(&mut s.tok, &save_tok)?;
            let g = self
                .dev
                .capture(|| self.enqueue_step(s, greedy, Parts::ALL))?;
            s.graphs[b][gi] = Some(g);
        }
        s.graphs[b][gi]
            .as_ref()
            .expect("captured above")
            .launch()
            .op("cuGraphLaunch")
    }

    /// Feed `token` (prefill or a host-sampled token); the logits of the next position
    /// stay on the device ([`CudaDecoder::logits`]). No host synchronization.
    pub fn feed(&self, s: &mut CudaState, token: u32) -> Result<(), CudaError> {
        self.check_room(s, 1)?;
        self.check_token(token)?;
        self.dev.write(&mut s.tok, &[token as i32])?;
        self.replay(s, false)?;
        s.len += 1;
        Ok(())
    }

    /// Feed `token` and return the greedy next token (one graph launch, one 4-byte read).
    pub fn feed_greedy(&self, s: &mut CudaState, token: u32) -> Result<u32, CudaError> {
        self.check_room(s, 1)?;
        self.check_token(token)?;
        self.dev.write(&mut s.tok, &[token as i32])?;
        self.replay(s, true)?;
        s.len += 1;
        Ok(self.dev.download(&s.tok)?[0] as u32)
    }

    /// `n` greedy steps back to back from the token already in the state (the one the
    /// last greedy step chose), without reading anything back: the benchmark loop.
    pub fn run_greedy(&self, s: &mut CudaState, n: usize) -> Result<(), CudaError> {
        self.check_room(s, n)?;
        for _ in 0..n {
            self.replay(s, true)?;
            s.len += 1;
        }
        Ok(())
    }

    /// Device time of a greedy step and of its parts alone (attention of every layer,
    /// feed-forward of every layer, final norm + lm_head + argmax), each the median of
    /// `iters` graph replays. The parts re-run the current position without advancing.
    pub fn time_parts(&self, s: &mut CudaState, iters: usize) -> Result<StepTimes, CudaError> {
        let dev = &self.dev;
        let timer = dev.timer()?;
        let time = |parts: Parts, s: &mut CudaState| -> Result<f64, CudaError> {
            let g = dev.capture(|| self.enqueue_step(s, true, parts))?;
            g.launch().op("cuGraphLaunch")?;
            let mut ms = Vec::with_capacity(iters);
            for _ in 0..iters.max(1) {
                timer.start(dev)?;
                g.launch().op("cuGraphLaunch")?;
                ms.push(timer.stop_ms(dev)? as f64);
            }
            ms.sort_by(f64::total_cmp);
            Ok(ms[ms.len() / 2])
        };
        // The head advances the position: time it last and restore.
        let pos = dev.download(&s.pos)?;
        let tok = dev.download(&s.tok)?;
        let t = StepTimes {
            attention: time(
                Parts {
                    attention: true,
                    ..Parts::NONE
                },
                s,
            )?,
            ffn: time(
                Parts {
                    ffn: true,
                    ..Parts::NONE
                },
                s,
            )?,
            head: time(
                Parts {
                    head: true,
                    ..Parts::NONE
                },
                s,
            )?,
            step: {
                dev.write(&mut s.pos, &pos)?;
                time(Parts::ALL, s)?
            },
        };
        dev.write(&mut s.pos, &pos)?;
        dev.write(&mut s.tok, &tok)?;
        Ok(t)
    }

    /// The tokens chosen so far by greedy steps are only on the device; read the last.
    pub fn last_token(&self, s: &CudaState) -> Result<u32, CudaError> {
        Ok(self.dev.download(&s.tok)?[0] as u32)
    }

    /// Logits `[V]` of the last step (synchronizes).
    pub fn logits(&self, s: &CudaState) -> Result<Vec<f32>, CudaError> {
        self.dev.download(&s.logits)
    }

    pub(crate) fn check_token(&self, token: u32) -> Result<(), CudaError> {
        if token as usize >= self.embed.rows {
            return Err(CudaError::Unsupported(format!(
                "token {token} is outside the vocabulary of {}",
                self.embed.rows
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(mode: u32, bits: u32) -> KernelFormat {
        KernelFormat { mode, bits, sdt: 2 }
    }

    #[test]
    fn preload_lanes_cover_each_row_with_at_most_128_bytes_per_lane() {
        // qwen3-30b-a3b at 4 bits: QKV/router rows of 2048, o_proj rows of 4096.
        assert_eq!(pre_lanes(fmt(1, 4), 2048, false), Some((8, 8)));
        assert_eq!(pre_lanes(fmt(1, 4), 2048, true), Some((32, 2)));
        assert_eq!(pre_lanes(fmt(2, 4), 256, true), Some((8, 1)));
        assert_eq!(pre_lanes(fmt(1, 4), 16384, true), None);
        assert_eq!(pre_lanes(fmt(1, 4), 4096, false), Some((16, 8)));
        // 768 = 24 chunks: 4 lanes of 6.
        assert_eq!(pre_lanes(fmt(1, 4), 768, false), Some((4, 6)));
        // 8-bit chunks are twice as long: half as many per lane.
        assert_eq!(pre_lanes(fmt(4, 8), 2048, false), Some((16, 4)));
        // Dense bf16 (64-byte chunks): two per lane.
        assert_eq!(pre_lanes(fmt(0, 16), 2048, false), Some((32, 2)));
        // Rows that need more than 32 lanes take the streaming kernel.
        assert_eq!(pre_lanes(fmt(1, 4), 16384, false), None);
        assert_eq!(pre_lanes(fmt(1, 4), 8192, false), Some((32, 8)));
        for (f, cols, spread) in [(fmt(1, 3), 1408), (fmt(2, 4), 12288), (fmt(1, 4), 64)]
            .into_iter()
            .flat_map(|(f, c)| [(f, c, false), (f, c, true)])
        {
            if let Some((lpr, nk)) = pre_lanes(f, cols, spread) {
                assert!(lpr * nk >= cols / 32 && nk <= (32 / f.bits as usize).max(1));
            }
        }
    }
}
