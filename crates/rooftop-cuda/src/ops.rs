//! The decode ops around the MoE (RMSNorm, RoPE, KV append, decode attention) and the
//! read-bandwidth probe that serves as the roofline.

use crate::decoder::QkvPostArg;
use crate::device::{cfg, cfg3, launch, CudaDevice};
use crate::error::{shape, DriverResult};
use crate::nvrtc::ModuleSource;
use crate::CudaError;
use cudarc::driver::CudaSlice;

/// Positions per shared-memory tile of `attn_group` (`ATG_TP` in ops.cu).
const ATG_TP: usize = 32;

/// Which decode-attention kernel [`CudaDevice::attention`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// `attn_partial`: one CTA per (head, split).
    PerHead,
    /// `attn_group`: one CTA per (kv head, split) for its whole q-head group, each K/V
    /// tile read once for the group (long contexts, opt-in); needs
    /// [`AttnShape::group_fits`].
    Grouped,
}

/// Attention geometry for one layer's decode step.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Multiple of 32, at most 256.
    pub head_dim: usize,
    /// Cache capacity in positions.
    pub max_seq: usize,
    /// Split-K parts (flash-decoding); more splits keep SMs busy on long contexts.
    pub splits: usize,
}

impl AttnShape {
    /// Scratch floats `attention` needs: `[heads, splits, head_dim + 2]` partials, then
    /// one arrival counter per head (see [`CudaDevice::attention`]).
    pub fn partial_len(&self) -> usize {
        self.n_heads * self.splits * (self.head_dim + 2) + self.n_heads
    }
    /// Whether the long-context kernel (`attn_group`) takes this shape: head_dim ≤ 128,
    /// at most 8 q heads per kv head, at most 64 splits.
    pub fn group_fits(&self) -> bool {
        self.head_dim <= 128
            && self.n_kv_heads > 0
            && self.n_heads.is_multiple_of(self.n_kv_heads)
            && self.n_heads / self.n_kv_heads <= 8
            && self.splits <= 64
    }
    /// Dynamic shared memory of `attn_group` for this shape: two buffers of K and V
    /// tiles, then the group's scaled q.
    pub(crate) fn group_smem(&self) -> usize {
        let g = self.n_heads / self.n_kv_heads.max(1);
        4 * ATG_TP * (2 * self.head_dim + 16) + g * self.head_dim * 4
    }
    /// Elements of one K (or V) cache: `[n_kv, max_seq, head_dim]` f16.
    pub fn cache_len(&self) -> usize {
        self.n_kv_heads * self.max_seq * self.head_dim
    }
    fn check(&self) -> Result<(), CudaError> {
        if self.head_dim == 0
            || !self.head_dim.is_multiple_of(32)
            || self.head_dim > 256
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
            || self.splits == 0
        {
            return Err(CudaError::Unsupported(format!(
                "attention needs head_dim a multiple of 32 up to 256 and heads divisible by kv heads; got {self:?}"
            )));
        }
        Ok(())
    }
}

/// Rotary embedding of one token's heads.
#[derive(Clone, Copy, Debug)]
pub struct Rope {
    pub heads: usize,
    pub head_dim: usize,
    /// Leading dimensions rotated (partial RoPE when < head_dim).
    pub rot_dim: usize,
    pub theta: f32,
    /// Rotate adjacent pairs (2i, 2i+1) rather than halves (i, i + rot_dim/2).
    pub traditional: bool,
}

impl CudaDevice {
    /// `y[r] = x[r] · rsqrt(mean(x[r]²) + eps) · w` for `rows` rows of `d`.
    pub fn rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let d = w.len();
        if x.len() < rows * d || y.len() < rows * d {
            return Err(shape(
                "rmsnorm",
                format!("{rows} rows of {d}: x {}, y {}", x.len(), y.len()),
            ));
        }
        let f = self.function(&ModuleSource::ops(), "rmsnorm")?;
        let (px, pw, py, di) = (self.ptr(x), self.ptr(w), self.ptr(y), d as i32);
        launch!(
            self,
            f,
            cfg((rows as u32, 1), 256, 0),
            "rmsnorm",
            px,
            pw,
            py,
            di,
            eps
        )
    }

    /// Rotate `x[heads, head_dim]` in place at position `pos[0]` (device memory).
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        pos: &CudaSlice<i32>,
        r: &Rope,
    ) -> Result<(), CudaError> {
        let Rope {
            heads,
            head_dim,
            rot_dim,
            theta,
            traditional,
        } = *r;
        if x.len() < heads * head_dim
            || rot_dim > head_dim
            || !rot_dim.is_multiple_of(2)
            || rot_dim > 2048
        {
            return Err(shape(
                "rope",
                format!("x {} for {heads}x{head_dim}, rot_dim {rot_dim}", x.len()),
            ));
        }
        let f = self.function(&ModuleSource::ops(), "rope")?;
        let (px, pp) = (self.ptr(x), self.ptr(pos));
        let (hd, rd, tr) = (head_dim as i32, rot_dim as i32, traditional as i32);
        let block = (rot_dim as u32 / 2).div_ceil(32) * 32;
        launch!(
            self,
            f,
            cfg((heads as u32, 1), block, 0),
            "rope",
            px,
            pp,
            hd,
            rd,
            theta,
            tr
        )
    }

    /// Store `k, v [n_kv, head_dim]` at position `pos[0]` of the f16 caches.
    pub fn kv_append(
        &self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        k_cache: &mut CudaSlice<u16>,
        v_cache: &mut CudaSlice<u16>,
        pos: &CudaSlice<i32>,
        s: &AttnShape,
    ) -> Result<(), CudaError> {
        s.check()?;
        if k.len() < s.n_kv_heads * s.head_dim
            || v.len() < s.n_kv_heads * s.head_dim
            || k_cache.len() < s.cache_len()
            || v_cache.len() < s.cache_len()
        {
            return Err(shape("kv_append", format!("{s:?}")));
        }
        let f = self.function(&ModuleSource::ops(), "kv_append")?;
        let (pk, pv, pkc, pvc, pp) = (
            self.ptr(k),
            self.ptr(v),
            self.ptr(k_cache),
            self.ptr(v_cache),
            self.ptr(pos),
        );
        let (hd, ms) = (s.head_dim as i32, s.max_seq as i32);
        launch!(
            self,
            f,
            cfg((s.n_kv_heads as u32, 1), s.head_dim as u32, 0),
            "kv_append",
            pk,
            pv,
            pkc,
            pvc,
            pp,
            hd,
            ms
        )
    }

    /// `out[h] = softmax(q[h]·K[kv(h)]ᵀ · scale) V[kv(h)]` over positions `0..=pos[0]`,
    /// one launch by `kernel`: split-K partials with each head's (or group's) last split
    /// merging them. `partial` holds [`AttnShape::partial_len`]: the partials, then the
    /// heads' arrival counters (zeroed here first, so any buffer will do).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &CudaSlice<f32>,
        k_cache: &CudaSlice<u16>,
        v_cache: &CudaSlice<u16>,
        pos: &CudaSlice<i32>,
        partial: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        s: &AttnShape,
        scale: f32,
        kernel: AttnKernel,
    ) -> Result<(), CudaError> {
        if kernel == AttnKernel::Grouped && !s.group_fits() {
            return Err(shape("grouped attention", format!("{s:?}")));
        }
        s.check()?;
        if q.len() < s.n_heads * s.head_dim
            || out.len() < s.n_heads * s.head_dim
            || partial.len() < s.partial_len()
            || k_cache.len() < s.cache_len()
            || v_cache.len() < s.cache_len()
        {
            return Err(shape("attention", format!("{s:?}")));
        }
        let parts = s.partial_len() - s.n_heads;
        self.stream()
            .memset_zeros(&mut partial.slice_mut(parts..s.partial_len()))
            .op("cuMemsetD8Async")?;
        let (pq, pk, pv, pp, ppart, po) = (
            self.ptr(q),
            self.ptr(k_cache),
            self.ptr(v_cache),
            self.ptr(pos),
            self.ptr(partial),
            self.ptr(out),
        );
        let pcnt = ppart + 4 * parts as u64;
        let buf = [pq, pk, pv, pp, ppart, po, pcnt];
        match kernel {
            AttnKernel::Grouped => self.attention_group_raw(buf, s, scale),
            AttnKernel::PerHead => self.attention_raw(buf, s, scale, 1, None),
        }
    }

    /// [`AttnKernel::Grouped`] attention on raw device addresses `[q, k_cache, v_cache,
    /// pos, partial, out, counters]` (one token; `counters`: `n_kv_heads` zeroed arrival
    /// counters, left zero). The caller guarantees the sizes and [`AttnShape::group_fits`].
    pub(crate) fn attention_group_raw(
        &self,
        [pq, pk, pv, pp, ppart, po, pcnt]: [u64; 7],
        s: &AttnShape,
        scale: f32,
    ) -> Result<(), CudaError> {
        let f = self.function(&ModuleSource::ops(), "attn_group")?;
        let g = s.n_heads / s.n_kv_heads;
        let smem = s.group_smem();
        self.check_smem("grouped attention", smem)?;
        let (nh, nkv, hd, ms) = (
            s.n_heads as i32,
            s.n_kv_heads as i32,
            s.head_dim as i32,
            s.max_seq as i32,
        );
        launch!(
            self,
            f,
            cfg3(
                (s.n_kv_heads as u32, s.splits as u32, 1),
                (32 * g) as u32,
                smem
            ),
            "attn_group",
            pq,
            pk,
            pv,
            pp,
            ppart,
            nh,
            nkv,
            hd,
            ms,
            scale,
            pcnt,
            po
        )
    }

    /// [`CudaDevice::attention`] on raw device addresses `[q, k_cache, v_cache, pos,
    /// partial, out, counters]` (the decoder's carved buffers); the caller guarantees the
    /// sizes. `counters` (one token only): `n_heads` zeroed arrival counters, left zero —
    /// each head's last split merges the splits; 0: an `attn_combine` launch merges them.
    /// `tokens` > 1: a prefill chunk's tokens at positions pos, pos + 1, … (causal), with
    /// q, partial and out `tokens` rows deep (the `_n` kernels; decode keeps its own).
    /// `post` (decode only): q/k/v are the raw QKV output, post-processed by the attention
    /// launch itself (`attn_decode`: no qkv_post launch).
    pub(crate) fn attention_raw(
        &self,
        [pq, pk, pv, pp, ppart, po, pcnt]: [u64; 7],
        s: &AttnShape,
        scale: f32,
        tokens: usize,
        post: Option<QkvPostArg>,
    ) -> Result<(), CudaError> {
        s.check()?;
        if post.is_some() && tokens > 1 {
            return Err(shape("attention", "qkv_post folded in only for one token"));
        }
        let ops = ModuleSource::ops();
        let chunk = tokens > 1;
        let (partial, combine) = if chunk {
            ("attn_partial_n", "attn_combine_n")
        } else {
            ("attn_partial", "attn_combine")
        };
        let (nh, nkv, hd, ms) = (
            s.n_heads as i32,
            s.n_kv_heads as i32,
            s.head_dim as i32,
            s.max_seq as i32,
        );
        let t = tokens.max(1) as u32;
        if let Some(a) = post {
            // Decode with qkv_post folded in (attn_decode).
            let f = self.function(&ops, "attn_decode")?;
            launch!(
                self,
                f,
                cfg3((s.n_heads as u32, s.splits as u32, 1), 128, 0),
                "attn_decode",
                pq,
                pk,
                pv,
                pp,
                ppart,
                a,
                scale,
                pcnt,
                po
            )?;
        } else if !chunk {
            let f = self.function(&ops, partial)?;
            launch!(
                self,
                f,
                cfg3((s.n_heads as u32, s.splits as u32, 1), 128, 0),
                partial,
                pq,
                pk,
                pv,
                pp,
                ppart,
                nh,
                nkv,
                hd,
                ms,
                scale,
                pcnt,
                po
            )?;
        } else {
            let f = self.function(&ops, partial)?;
            launch!(
                self,
                f,
                cfg3((s.n_heads as u32, s.splits as u32, t), 128, 0),
                partial,
                pq,
                pk,
                pv,
                pp,
                ppart,
                nh,
                nkv,
                hd,
                ms,
                scale
            )?;
        }
        if !chunk && pcnt != 0 {
            return Ok(());
        }
        let f = self.function(&ops, combine)?;
        let sp = s.splits as i32;
        launch!(
            self,
            f,
            cfg3((s.n_heads as u32, t, 1), s.head_dim as u32, 0),
            combine,
            ppart,
            po,
            sp,
            hd
        )
    }

    /// Enqueue one streaming read of `buf` (the bandwidth probe).
    pub fn stream_read(
        &self,
        buf: &CudaSlice<u8>,
        sink: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        let f = self.function(&ModuleSource::ops(), "stream_read")?;
        let (pb, ps, n16) = (self.ptr(buf), self.ptr(sink), (buf.len() / 16) as u64);
        let grid = self.grid_for(&f, 256, 0, usize::MAX);
        launch!(self, f, cfg((grid, 1), 256, 0), "stream_read", pb, n16, ps)
    }

    /// The card's streaming-read bandwidth in GB/s: median of `iters` timed reads of a
    /// `bytes` buffer (make it many times the L2) with the GEMV's own load instruction.
    pub fn read_bandwidth(&self, bytes: usize, iters: usize) -> Result<f64, CudaError> {
        let mut raw: CudaSlice<u8> = self.alloc(bytes)?;
        self.fill_random(&mut raw, 1)?;
        let mut sink: CudaSlice<u32> = self.alloc(1)?;
        let t = self.timer()?;
        self.stream_read(&raw, &mut sink)?;
        let mut ms = Vec::with_capacity(iters);
        for _ in 0..iters.max(1) {
            t.start(self)?;
            self.stream_read(&raw, &mut sink)?;
            ms.push(t.stop_ms(self)? as f64);
        }
        ms.sort_by(f64::total_cmp);
        Ok(bytes as f64 / (ms[ms.len() / 2] * 1e-3) / 1e9)
    }

    /// Fill a buffer with random bytes on the device (benchmark data; never zeros).
    pub fn fill_random(&self, buf: &mut CudaSlice<u8>, seed: u32) -> Result<(), CudaError> {
        let f = self.function(&ModuleSource::ops(), "fill_u32")?;
        let (p, n) = (self.ptr(buf), (buf.len() / 4) as u64);
        launch!(
            self,
            f,
            cfg((self.sms as u32 * 8, 1), 256, 0),
            "fill_u32",
            p,
            n,
            seed
        )
    }
}
