//! Prefill of long prompts on tensor cores (mma.cu): chunks of up to [`tc_chunk`] tokens
//! (default 1024) where every projection is one bf16 `mma.sync` GEMM over the chunk's
//! tokens, with each weight tile dequantized once per CTA. The MoE runs per expert: the
//! chunk's (token, slot) pairs are grouped by expert on the device (`moe_sort`), and
//! each expert's weights are read once for all the tokens that chose it — the cost of a
//! chunk is one pass over the layer's weights, not one per token or per 8 tokens.
//!
//! Attention is on tensor cores too (`attn_prefill`, flash-attention style, f16 inputs,
//! f32 softmax and accumulation). Exact-f32 pieces stay where precision decides discrete
//! choices: the router logits (top-k) come from the f32 GEMV (`gemv8_epi`, 8 tokens per
//! CTA row); the residual stream, norms and f16 KV cache are the chunk path's. Matrix
//! inputs are bf16 (the rows normalized once per chunk), accumulation f32.
//!
//! Shorter prompts (fewer than [`tc_min`] tokens, default 64) and the tail of a long one
//! use the 8-token chunks of prefill.rs, which read each weight once per 8 tokens.

use crate::decoder::{CudaDecoder, CudaFfn, CudaLayer, CudaState};
use crate::device::{cfg, cfg3, launch};
use crate::nvrtc::{env_usize, ModuleSource};
use crate::weight::{stage_bytes, CudaWeight};
use crate::CudaError;
use cudarc::driver::{CudaSlice, DeviceRepr};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Items per CTA of `tc_gemm` (`TN`) and weight rows per CTA (`TM`).
const TN: usize = 64;
const TM: usize = 64;

static MIN_OVERRIDE: AtomicUsize = AtomicUsize::new(0);
static CHUNK_OVERRIDE: AtomicUsize = AtomicUsize::new(0);

/// Force the tensor-core prefill's thresholds (checks run it on short prompts): prompts
/// of at least `min` tokens, chunks of at most `chunk`. `None`: back to the environment.
pub fn set_prefill_tc(v: Option<(usize, usize)>) {
    let (m, c) = v.map_or((0, 0), |(m, c)| (m.max(1), c.max(1)));
    MIN_OVERRIDE.store(m, Ordering::Relaxed);
    CHUNK_OVERRIDE.store(c, Ordering::Relaxed);
}

/// Fewest prompt tokens sent to the tensor cores (`ROOFTOP_TC_MIN`, default 64;
/// `ROOFTOP_TC=0` turns the path off). Below it the 8-token chunks serve: a 64-item
/// tile would be mostly padding.
pub(crate) fn tc_min() -> Option<usize> {
    match MIN_OVERRIDE.load(Ordering::Relaxed) {
        0 if std::env::var("ROOFTOP_TC").as_deref() == Ok("0") => None,
        0 => Some(env_usize("ROOFTOP_TC_MIN", 1..=1 << 20).unwrap_or(64)),
        m => Some(m),
    }
}

/// Most tokens per tensor-core chunk (`ROOFTOP_TC_CHUNK`, default 1024): each chunk
/// reads every expert once, so longer chunks read less per token; buffers grow with it.
pub(crate) fn tc_chunk() -> usize {
    match CHUNK_OVERRIDE.load(Ordering::Relaxed) {
        0 => env_usize("ROOFTOP_TC_CHUNK", 1..=8192).unwrap_or(1024),
        c => c,
    }
}

/// How many of `len` prompt tokens go to tensor-core chunks of `chunk`: all, unless the
/// last chunk would be shorter than `min` (that tail takes the 8-token chunks).
pub(crate) fn tc_tokens(len: usize, min: usize, chunk: usize) -> usize {
    let r = len % chunk;
    if r >= min {
        len
    } else {
        len - r
    }
}

/// Whether a layer's prefill attention runs on tensor cores (`attn_prefill_{32,64,128}`;
/// else the per-query split-K kernels). `ROOFTOP_TC_ATTN=0` forces the latter (A/B).
fn tc_attention(a: &crate::decoder::CudaAttention) -> bool {
    matches!(a.head_dim, 32 | 64 | 128)
        && a.heads.is_multiple_of(a.kv_heads)
        && std::env::var("ROOFTOP_TC_ATTN").as_deref() != Ok("0")
}

/// `struct TcIn` in mma.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct TcIn {
    x: u64,
    list: u64,
    cnt: u64,
    off: u64,
    work: u64,
    ldx: i32,
    xdiv: i32,
    n: i32,
    pad: i32,
}
unsafe impl DeviceRepr for TcIn {}

/// `struct TcOut` in mma.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct TcOut {
    y: u64,
    a: u64,
    bias: u64,
    wts: u64,
    ldy: i32,
    lda: i32,
    ydiv: i32,
    mode: i32,
}
unsafe impl DeviceRepr for TcOut {}

const STORE: i32 = 0;
const ADD: i32 = 1;
const ATOMIC: i32 = 2;
const SWIGLU: i32 = 3;

/// Device buffers of one tensor-core chunk (`cap` tokens).
pub(crate) struct TcBufs {
    cap: usize,
    h: CudaSlice<f32>,
    xb: CudaSlice<u16>,
    qkv: CudaSlice<f32>,
    att: CudaSlice<f32>,
    part: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    ids: CudaSlice<i32>,
    wts: CudaSlice<f32>,
    cnt: CudaSlice<i32>,
    off: CudaSlice<i32>,
    list: CudaSlice<i32>,
    work: CudaSlice<i32>,
    act: CudaSlice<u16>,
    tok: CudaSlice<i32>,
}

impl CudaDecoder {
    /// Whether prompts of `n` tokens go to the tensor cores: bf16 `mma.sync` needs
    /// sm_80+; the router GEMV stages 8 activation vectors in shared memory, routing
    /// keeps ≤ 32 experts per token, and `moe_sort` counts ≤ 512 experts. Split q/k/v
    /// projections are fine (one GEMM each).
    pub(crate) fn tc_ok(&self, n: usize) -> bool {
        let smem =
            |cols: usize| stage_bytes(crate::prefill::CHUNK, cols) + 1024 <= self.dev.max_smem;
        tc_min().is_some_and(|m| n >= m)
            && self.dev.cc.0 >= 8
            && self.layers.iter().all(|l| match &l.ffn {
                CudaFfn::Moe(m) => {
                    m.routing.top_k <= 32 && m.n_experts <= 512 && smem(m.router.cols)
                }
                CudaFfn::Mlp(_) => true,
            })
    }

    fn tc_bufs(&self, s: &CudaState, cap: usize) -> Result<TcBufs, CudaError> {
        let dev = &self.dev;
        let h = self.hidden();
        let (mut xw, mut qkv, mut att, mut part, mut e, mut pairs, mut act) = (h, 1, 1, 1, 1, 1, 1);
        for l in &self.layers {
            let a = &l.attn;
            qkv = qkv.max((a.heads + 2 * a.kv_heads) * a.head_dim);
            xw = xw.max(a.heads * a.head_dim);
            // f32 attention output and split-K partials: only for the per-query kernels
            // (attn_prefill writes o_proj's bf16 input directly).
            if !tc_attention(a) {
                att = att.max(a.heads * a.head_dim);
                part = part.max(a.heads * s.splits * (a.head_dim + 2));
            }
            match &l.ffn {
                CudaFfn::Moe(m) => {
                    e = e.max(m.n_experts);
                    pairs = pairs.max(m.routing.top_k);
                    act = act.max(m.routing.top_k * m.inter).max(m.inter_shared());
                }
                CudaFfn::Mlp(m) => act = act.max(m.w[0].rows),
            }
        }
        Ok(TcBufs {
            cap,
            h: dev.alloc(cap * h)?,
            xb: dev.alloc(cap * xw)?,
            qkv: dev.alloc(cap * qkv)?,
            att: dev.alloc(cap * att)?,
            part: dev.alloc(cap * part)?,
            logits: dev.alloc(cap * e)?,
            ids: dev.alloc(cap * pairs)?,
            wts: dev.alloc(cap * pairs)?,
            cnt: dev.alloc(e)?,
            off: dev.alloc(e)?,
            list: dev.alloc(cap * pairs)?,
            work: dev.alloc(1 + 2 * (cap * pairs / TN + e + 1))?,
            act: dev.alloc(cap * act)?,
            tok: dev.alloc(cap)?,
        })
    }

    /// How [`CudaDecoder::prefill`] feeds a run of `n` tokens, for reports: tensor-core
    /// chunks (unless their buffers do not fit beside the weights), chunks of 8, or one
    /// decode step per token.
    pub fn prefill_path(&self, n: usize) -> String {
        if self.tc_ok(n) {
            format!("tensor-core chunks of <= {}", tc_chunk())
        } else if self.chunk_ok() {
            "chunks of 8".into()
        } else {
            "one decode step per token".into()
        }
    }

    /// Make the chunk buffers where missing (or made for another chunk size); false when
    /// they do not fit in the device memory the weights left (the caller then prefills in
    /// 8-token chunks, whose buffers are ~128× smaller).
    pub(crate) fn tc_ready(&self, s: &mut CudaState) -> Result<bool, CudaError> {
        let cap = tc_chunk();
        if s.tc.as_ref().is_some_and(|b| b.cap == cap) {
            return Ok(true);
        }
        s.tc = None;
        match self.tc_bufs(s, cap) {
            Ok(b) => {
                s.tc = Some(b);
                Ok(true)
            }
            Err(CudaError::OutOfMemory { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Feed `tokens` (at least [`tc_min`]) in tensor-core chunks; logits of the last
    /// token stay on the device. Launched eagerly (no graph: a chunk's hundreds of
    /// launches take less host time than its GPU time).
    /// Needs the buffers [`CudaDecoder::tc_ready`] made.
    pub(crate) fn prefill_tc(&self, s: &mut CudaState, tokens: &[u32]) -> Result<(), CudaError> {
        for c in tokens.chunks(tc_chunk()) {
            let ids: Vec<i32> = c.iter().map(|&t| t as i32).collect();
            let b = s.tc.as_mut().expect("made by tc_ready");
            self.dev.write(&mut b.tok, &ids)?;
            self.enqueue_tc(s, c.len())?;
            s.len += c.len();
        }
        Ok(())
    }

    /// `tc_gemm` over `experts` × row tiles of `rpe` rows (B: up for SwiGLU).
    #[allow(clippy::too_many_arguments)]
    fn tc_gemm(
        &self,
        a: &CudaWeight,
        b: Option<&CudaWeight>,
        rpe: usize,
        experts: usize,
        item_tiles: usize,
        input: TcIn,
        out: TcOut,
    ) -> Result<(), CudaError> {
        let dev = &self.dev;
        let f = dev.function(&ModuleSource::mma(a.format), "tc_gemm")?;
        let (aa, ba) = (a.arg(dev), b.unwrap_or(a).arg(dev));
        let rpe_i = rpe as i32;
        let grid = (
            rpe.div_ceil(TM) as u32,
            item_tiles.max(1) as u32,
            experts as u32,
        );
        launch!(
            dev,
            f,
            // TC_THREADS in mma.cu: 8 warps, each 16 rows x half the pass's n-tiles.
            cfg3(grid, 256, 0),
            "tc_gemm",
            aa,
            ba,
            rpe_i,
            input,
            out
        )
    }

    /// `out (+)= W · in` for the chunk's n token rows (dense projections).
    #[allow(clippy::too_many_arguments)]
    fn tc_dense(
        &self,
        w: &CudaWeight,
        x: u64,
        n: usize,
        y: u64,
        ldy: usize,
        mode: i32,
        bias: u64,
    ) -> Result<(), CudaError> {
        let input = TcIn {
            x,
            ldx: w.cols as i32,
            xdiv: 1,
            n: n as i32,
            ..Default::default()
        };
        let out = TcOut {
            y,
            bias,
            ldy: ldy as i32,
            ydiv: 1,
            mode,
            ..Default::default()
        };
        self.tc_gemm(w, None, w.rows, 1, n.div_ceil(TN), input, out)
    }

    /// bf16 rows of `x` (`d` wide), RMS-normalized with `norm` when given.
    fn to_bf16(
        &self,
        x: u64,
        n: usize,
        d: usize,
        norm: Option<(&CudaSlice<f32>, f32)>,
        out: u64,
    ) -> Result<(), CudaError> {
        let dev = &self.dev;
        let f = dev.function(&ModuleSource::ops(), "rows_bf16")?;
        let (nw, eps) = norm.map_or((0u64, 0f32), |(w, e)| (dev.ptr(w), e));
        let di = d as i32;
        launch!(
            dev,
            f,
            cfg((n as u32, 1), 256, 0),
            "rows_bf16",
            x,
            nw,
            out,
            di,
            eps
        )
    }

    /// One chunk of n tokens (ids in the buffers' `tok`) at the state's position.
    fn enqueue_tc(&self, s: &CudaState, n: usize) -> Result<(), CudaError> {
        let dev = &self.dev;
        let b = s.tc.as_ref().expect("made by tc_ready");
        let hd = self.hidden();
        let (ph, pxb, pq, patt, ppart, ppos, ptok) = (
            dev.ptr(&b.h),
            dev.ptr(&b.xb),
            dev.ptr(&b.qkv),
            dev.ptr(&b.att),
            dev.ptr(&b.part),
            dev.ptr(&s.pos),
            dev.ptr(&b.tok),
        );
        self.embed_chunk(ptok, n, ph)?;
        for (li, l) in self.layers.iter().enumerate() {
            let a = &l.attn;
            self.to_bf16(ph, n, hd, Some((&l.attn_norm, l.eps)), pxb)?;
            let width: usize = a.qkv.iter().map(|w| w.rows).sum();
            let mut col = 0;
            for w in &a.qkv {
                self.tc_dense(w, pxb, n, pq + (col * 4) as u64, width, STORE, 0)?;
                col += w.rows;
            }
            if tc_attention(a) {
                // Tensor-core attention straight into o_proj's bf16 input.
                self.chunk_qkv_post(s, li, n, pq, ppos)?;
                let f = dev.function(
                    &ModuleSource::ops(),
                    &format!("attn_prefill_{}", a.head_dim),
                )?;
                let (pkc, pvc) = (dev.ptr(&s.kc[li]), dev.ptr(&s.vc[li]));
                let rows = n * (a.heads / a.kv_heads);
                let (ni, nh, nkv, ms, sc) = (
                    n as i32,
                    a.heads as i32,
                    a.kv_heads as i32,
                    s.max_seq as i32,
                    a.scale,
                );
                launch!(
                    dev,
                    f,
                    cfg((rows.div_ceil(64) as u32, a.kv_heads as u32), 128, 0),
                    "attn_prefill",
                    pq,
                    pkc,
                    pvc,
                    ppos,
                    pxb,
                    ni,
                    nh,
                    nkv,
                    ms,
                    sc
                )?;
            } else {
                self.chunk_attention(s, li, n, [pq, patt, ppart, ppos])?;
                self.to_bf16(patt, n, a.o.cols, None, pxb)?;
            }
            let bias = a.o_bias.as_ref().map_or(0, |x| dev.ptr(x));
            self.tc_dense(&a.o, pxb, n, ph, hd, ADD, bias)?;
            self.tc_ffn(b, l, n)?;
        }
        self.chunk_head(s, ph, n)
    }

    /// The feed-forward of the chunk's n tokens, added into their residual rows.
    fn tc_ffn(&self, b: &TcBufs, l: &CudaLayer, n: usize) -> Result<(), CudaError> {
        let dev = &self.dev;
        let hd = self.hidden();
        let (ph, pxb, pact) = (dev.ptr(&b.h), dev.ptr(&b.xb), dev.ptr(&b.act));
        let dense_mlp = |[g, u, d]: [&CudaWeight; 3]| -> Result<(), CudaError> {
            let input = TcIn {
                x: pxb,
                ldx: hd as i32,
                xdiv: 1,
                n: n as i32,
                ..Default::default()
            };
            let out = TcOut {
                a: pact,
                lda: g.rows as i32,
                ydiv: 1,
                mode: SWIGLU,
                ..Default::default()
            };
            self.tc_gemm(g, Some(u), g.rows, 1, n.div_ceil(TN), input, out)?;
            self.tc_dense(d, pact, n, ph, hd, ADD, 0)
        };
        // The normalized input of every FFN matrix (the router's GEMV normalizes its own
        // f32 copy).
        self.to_bf16(ph, n, hd, Some((&l.ffn_norm, l.eps)), pxb)?;
        let m = match &l.ffn {
            CudaFfn::Mlp(m) => {
                let [g, u, d] = &m.w;
                return dense_mlp([g, u, d]);
            }
            CudaFfn::Moe(m) => m,
        };
        // Router logits in f32 (8 tokens per CTA row, all rows of 8 at once), routing.
        let (pl, pids, pwts) = (dev.ptr(&b.logits), dev.ptr(&b.ids), dev.ptr(&b.wts));
        self.route_chunk(l, m, ph, n, [pl, pids, pwts])?;
        let k = m.routing.top_k;
        let (pcnt, poff, plist, pwork) = (
            dev.ptr(&b.cnt),
            dev.ptr(&b.off),
            dev.ptr(&b.list),
            dev.ptr(&b.work),
        );
        {
            let f = dev.function(&ModuleSource::ops(), "moe_sort")?;
            let (pairs, ne, tile) = ((n * k) as i32, m.n_experts as i32, TN as i32);
            launch!(
                dev,
                f,
                cfg((1, 1), 1024, 0),
                "moe_sort",
                pids,
                pairs,
                ne,
                pcnt,
                poff,
                plist,
                pwork,
                tile
            )?;
        }
        // A CTA per (row tile, item tile, expert), sized for the worst case (an expert
        // holds at most n pairs) so that a hot expert's tiles run side by side — one CTA
        // walking them in turn was the launch's tail under skewed routing (1.78 → 0.68
        // ms for gate/up of a 1024-token chunk); CTAs past their expert's count exit at
        // once. Default: one CTA per tile of moe_sort's tile list instead (no empty CTAs;
        // 1.04x for the whole 2048-token prefill on an H200). ROOFTOP_TC_WORK=0: the grid
        // over every expert.
        let listed = std::env::var("ROOFTOP_TC_WORK").as_deref() != Ok("0");
        let (experts, tiles) = if listed {
            (1, (n * k).div_ceil(TN) + m.n_experts)
        } else {
            (m.n_experts, n.div_ceil(TN))
        };
        let gate_up = TcIn {
            x: pxb,
            list: plist,
            cnt: pcnt,
            off: poff,
            work: if listed { pwork } else { 0 },
            ldx: hd as i32,
            xdiv: k as i32,
            ..Default::default()
        };
        let act = TcOut {
            a: pact,
            lda: m.inter as i32,
            ydiv: 1,
            mode: SWIGLU,
            ..Default::default()
        };
        self.tc_gemm(&m.gate, Some(&m.up), m.inter, experts, tiles, gate_up, act)?;
        let down = TcIn {
            x: pact,
            ldx: m.inter as i32,
            xdiv: 1,
            ..gate_up
        };
        let res = TcOut {
            y: ph,
            wts: pwts,
            ldy: hd as i32,
            ydiv: k as i32,
            mode: ATOMIC,
            ..Default::default()
        };
        self.tc_gemm(&m.down, None, hd, experts, tiles, down, res)?;
        if let Some([g, u, d]) = &m.shared {
            dense_mlp([g, u, d])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::tc_tokens;

    #[test]
    fn a_short_last_chunk_goes_to_the_8_token_path() {
        assert_eq!(tc_tokens(100, 64, 1024), 100); // one partial chunk, long enough
        assert_eq!(tc_tokens(1100, 64, 1024), 1100); // 1024 + 76
        assert_eq!(tc_tokens(1050, 64, 1024), 1024); // 1024, then 26 in chunks of 8
        assert_eq!(tc_tokens(2048, 64, 1024), 2048);
        assert_eq!(tc_tokens(19, 2, 16), 19); // the checks' pieces: 16 + 3
        assert_eq!(tc_tokens(17, 2, 16), 16); // 16, then 1 token
    }
}
