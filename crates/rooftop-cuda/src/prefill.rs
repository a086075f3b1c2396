//! Prompt prefill in chunks of up to [`CHUNK`] tokens: every weight row is loaded once
//! per chunk instead of once per token (gemv8_epi; the MoE as one routing, one gate/up
//! and one down launch for all the chunk's tokens), attention is causal within the
//! chunk, and each chunk size is one captured CUDA graph. Only the last token's logits
//! are computed. Where a chunk does not apply (split q/k/v projections, shared memory
//! too small for 8 staged activations), tokens are fed one decode step at a time.

use crate::decoder::{CudaDecoder, CudaFfn, CudaState, EpiArg, Gemv};
use crate::device::{cfg, cfg3, launch};
use crate::error::DriverResult;
use crate::nvrtc::ModuleSource;
use crate::weight::{lanes_per_row, stage_bytes, CudaWeight, QwArg};
use crate::{CudaError, CudaGraph};
use cudarc::driver::CudaSlice;

/// Tokens per chunk (the `gemv8_epi` batch).
pub(crate) const CHUNK: usize = 8;

/// Device buffers of a prefill chunk (`[CHUNK, …]` each) and one graph per chunk size.
pub(crate) struct ChunkBufs {
    h: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    att: CudaSlice<f32>,
    part: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    ids: CudaSlice<i32>,
    wts: CudaSlice<f32>,
    act: CudaSlice<f32>,
    tok: CudaSlice<i32>,
    graphs: Vec<Option<CudaGraph>>,
}

impl CudaDecoder {
    /// Whether this model's layers suit prefill chunks (one stacked QKV per layer, and
    /// 8 staged activation vectors fit a block's shared memory).
    pub(crate) fn chunk_ok(&self) -> bool {
        let smem = |cols: usize| stage_bytes(CHUNK, cols) + 1024 <= self.dev.max_smem;
        self.layers.iter().all(|l| {
            l.attn.qkv.len() == 1
                && smem(l.attn.qkv[0].cols)
                && smem(l.attn.o.cols)
                && match &l.ffn {
                    CudaFfn::Moe(m) => m.routing.top_k <= 32 && smem(m.router.cols),
                    CudaFfn::Mlp(m) => smem(m.w[0].cols),
                }
        })
    }

    fn chunk_bufs(&self, s: &CudaState) -> Result<ChunkBufs, CudaError> {
        let dev = &self.dev;
        let (mut qkv, mut att, mut part, mut e, mut k, mut act) = (1, 1, 1, 1, 1, 1);
        for l in &self.layers {
            let a = &l.attn;
            qkv = qkv.max((a.heads + 2 * a.kv_heads) * a.head_dim);
            att = att.max(a.heads * a.head_dim);
            part = part.max(a.heads * s.splits * (a.head_dim + 2));
            match &l.ffn {
                CudaFfn::Moe(m) => {
                    e = e.max(m.n_experts);
                    k = k.max(m.routing.top_k);
                    act = act.max(m.routing.top_k * m.inter + m.inter_shared());
                }
                CudaFfn::Mlp(m) => act = act.max(m.w[0].rows),
            }
        }
        Ok(ChunkBufs {
            h: dev.alloc(CHUNK * self.hidden())?,
            qkv: dev.alloc(CHUNK * qkv)?,
            att: dev.alloc(CHUNK * att)?,
            part: dev.alloc(CHUNK * part)?,
            logits: dev.alloc(CHUNK * e)?,
            ids: dev.alloc(CHUNK * k)?,
            wts: dev.alloc(CHUNK * k)?,
            act: dev.alloc(CHUNK * act)?,
            tok: dev.alloc(CHUNK)?,
            graphs: (0..CHUNK).map(|_| None).collect(),
        })
    }

    /// Feed a prompt (or any run of host-chosen tokens) in chunks of up to 8; the logits
    /// of the last token stay on the device ([`CudaDecoder::logits`]), as after
    /// [`CudaDecoder::feed`] of each token in turn. No host synchronization.
    pub fn prefill(&self, s: &mut CudaState, tokens: &[u32]) -> Result<(), CudaError> {
        self.check_room(s, tokens.len())?;
        for &t in tokens {
            self.check_token(t)?;
        }
        // Long prompts: tensor-core chunks (tc.rs), all but a tail too short for them.
        let tc = match crate::tc::tc_min() {
            Some(m) if self.tc_ok(tokens.len()) && self.tc_ready(s)? => Some(m),
            _ => None,
        };
        let tokens = match tc {
            Some(min) => {
                let full = crate::tc::tc_tokens(tokens.len(), min, crate::tc::tc_chunk());
                self.prefill_tc(s, &tokens[..full])?;
                &tokens[full..]
            }
            None => tokens,
        };
        if !self.chunk_ok() {
            return tokens.iter().try_for_each(|&t| self.feed(s, t));
        }
        if s.chunk.is_none() {
            s.chunk = Some(self.chunk_bufs(s)?);
        }
        for c in tokens.chunks(CHUNK) {
            let n = c.len();
            let ids: Vec<i32> = c.iter().map(|&t| t as i32).collect();
            let bufs = s.chunk.as_mut().expect("made above");
            self.dev.write(&mut bufs.tok, &ids)?;
            if bufs.graphs[n - 1].is_none() {
                // Load every kernel outside the capture (running the chunk once: it
                // writes the same KV entries the replay will), then capture.
                let save_pos = self.dev.download(&s.pos)?;
                self.enqueue_chunk(s, n)?;
                self.dev.synchronize()?;
                self.dev.write(&mut s.pos, &save_pos)?;
                let g = self.dev.capture(|| self.enqueue_chunk(s, n))?;
                s.chunk.as_mut().expect("made above").graphs[n - 1] = Some(g);
            }
            let bufs = s.chunk.as_ref().expect("made above");
            bufs.graphs[n - 1]
                .as_ref()
                .expect("captured above")
                .launch()
                .op("cuGraphLaunch")?;
            s.len += n;
        }
        Ok(())
    }

    /// Router logits of n tokens' rows at `ph` (f32, RMS-normalized by the FFN norm), then
    /// each token's top-k experts and weights: `[logits, ids, wts]` device pointers.
    pub(crate) fn route_chunk(
        &self,
        l: &crate::decoder::CudaLayer,
        m: &crate::moe::CudaMoe,
        ph: u64,
        n: usize,
        [pl, pids, pwts]: [u64; 3],
    ) -> Result<(), CudaError> {
        let dev = &self.dev;
        let o = Gemv {
            norm: Some((&l.ffn_norm, l.eps)),
            exact: true,
            ..Default::default()
        };
        self.gemv8(&m.router, ph, n, pl, o)?;
        let f = dev.function(&ModuleSource::gemv(m.router.format), "moe_route_n")?;
        let rt = m.routing_arg(dev);
        launch!(
            dev,
            f,
            cfg((n as u32, 1), 32, 0),
            "moe_route_n",
            pl,
            rt,
            pids,
            pwts
        )
    }

    /// `y[t] (+)= W · norm(x[t]) (+ bias)` for n tokens (rows W.rows apart): each CTA row
    /// (grid y) takes 8 tokens, so any n runs in one launch.
    fn gemv8(&self, w: &CudaWeight, x: u64, n: usize, y: u64, o: Gemv) -> Result<(), CudaError> {
        let dev = &self.dev;
        let f = dev.function(&ModuleSource::gemv_for(w.format, o.exact), "gemv8_epi")?;
        let smem = stage_bytes(CHUNK, w.cols);
        dev.check_smem("prefill gemv", smem)?;
        let lpr = lanes_per_row(w.cols, w.format.unroll());
        let grid = dev.grid_for(
            &f,
            256,
            smem,
            w.rows.div_ceil(32 / lpr as usize).div_ceil(8),
        );
        let e = EpiArg {
            nw: o.norm.map_or(0, |(nw, _)| dev.ptr(nw)),
            eps: o.norm.map_or(0.0, |(_, e)| e),
            add: o.add as i32,
            bias: o.bias.map_or(0, |b| dev.ptr(b)),
        };
        let (arg, ni) = (w.arg(dev), n as i32);
        launch!(
            dev,
            f,
            cfg((grid, n.div_ceil(CHUNK) as u32), 256, smem),
            "gemv8_epi",
            arg,
            x,
            ni,
            y,
            lpr,
            e
        )
    }

    /// Enqueue one chunk of n tokens (ids in the chunk's `tok`) at the state's position:
    /// every layer for all n, lm_head for the last, position += n.
    fn enqueue_chunk(&self, s: &CudaState, n: usize) -> Result<(), CudaError> {
        let dev = &self.dev;
        let c = s.chunk.as_ref().expect("allocated by prefill");
        let (ph, pq, patt, ppart, ppos, ptok) = (
            dev.ptr(&c.h),
            dev.ptr(&c.qkv),
            dev.ptr(&c.att),
            dev.ptr(&c.part),
            dev.ptr(&s.pos),
            dev.ptr(&c.tok),
        );
        self.embed_chunk(ptok, n, ph)?;
        for (li, l) in self.layers.iter().enumerate() {
            let a = &l.attn;
            let norm = Some((&l.attn_norm, l.eps));
            let o = Gemv {
                norm,
                ..Default::default()
            };
            self.gemv8(&a.qkv[0], ph, n, pq, o)?;
            self.chunk_attention(s, li, n, [pq, patt, ppart, ppos])?;
            let o = Gemv {
                add: true,
                bias: a.o_bias.as_ref(),
                ..Default::default()
            };
            self.gemv8(&a.o, patt, n, ph, o)?;
            self.chunk_ffn(c, l, n, ph)?;
        }
        self.chunk_head(s, ph, n)
    }

    /// The embeddings (times the model's scale) of n token ids at `ptok` into rows at `ph`.
    pub(crate) fn embed_chunk(&self, ptok: u64, n: usize, ph: u64) -> Result<(), CudaError> {
        let dev = &self.dev;
        let f = dev.function(&ModuleSource::gemv(self.embed.format), "embed_rows")?;
        let (earg, escale) = (self.embed.arg(dev), self.embed_scale);
        let grid = (self.embed.cols / 32).div_ceil(256) as u32;
        launch!(
            dev,
            f,
            cfg3((grid, n as u32, 1), 256, 0),
            "embed_rows",
            earg,
            ptok,
            ph,
            escale
        )
    }

    /// Final norm + lm_head of the last of the n token rows at `ph`, then position += n.
    pub(crate) fn chunk_head(&self, s: &CudaState, ph: u64, n: usize) -> Result<(), CudaError> {
        let dev = &self.dev;
        let ppos = dev.ptr(&s.pos);
        let hd_all = self.hidden();
        let lm = self.lm_head.as_ref().unwrap_or(&self.embed);
        let o = Gemv {
            norm: Some((&self.norm, self.eps)),
            ..Default::default()
        };
        let last = ph + ((n - 1) * hd_all * 4) as u64;
        self.gemv(lm, last, dev.ptr(&s.logits), o)?;
        let f = dev.function(&ModuleSource::ops(), "advance_pos")?;
        let ni = n as i32;
        launch!(dev, f, cfg((1, 1), 32, 0), "advance_pos", ppos, ni)
    }

    /// q/k/v post-processing and KV append of the chunk's n tokens, then causal
    /// split-K attention (token t sees positions up to pos + t).
    pub(crate) fn chunk_attention(
        &self,
        s: &CudaState,
        li: usize,
        n: usize,
        [pq, patt, ppart, ppos]: [u64; 4],
    ) -> Result<(), CudaError> {
        self.chunk_qkv_post(s, li, n, pq, ppos)?;
        let a = &self.layers[li].attn;
        let (pkc, pvc) = (self.dev.ptr(&s.kc[li]), self.dev.ptr(&s.vc[li]));
        self.dev.attention_raw(
            [pq, pkc, pvc, ppos, ppart, patt, self.dev.ptr(&s.att_cnt)],
            &a.shape(s),
            a.scale,
            n,
            None,
        )
    }

    /// q/k norm, RoPE and the KV-cache append of the chunk's n tokens (qkv rows at `pq`).
    pub(crate) fn chunk_qkv_post(
        &self,
        s: &CudaState,
        li: usize,
        n: usize,
        pq: u64,
        ppos: u64,
    ) -> Result<(), CudaError> {
        let dev = &self.dev;
        let a = &self.layers[li].attn;
        let nn = n as u32;
        let (pkc, pvc) = (dev.ptr(&s.kc[li]), dev.ptr(&s.vc[li]));
        let f = dev.function(&ModuleSource::ops(), "qkv_post_n")?;
        let arg = crate::decoder::qkv_post_arg(dev, a, s.max_seq);
        launch!(
            dev,
            f,
            cfg3(((a.heads + a.kv_heads) as u32, nn, 1), a.head_dim as u32, 0),
            "qkv_post_n",
            pq,
            ppos,
            pkc,
            pvc,
            arg
        )
    }

    /// The feed-forward of the chunk's n tokens, added into their residual streams.
    fn chunk_ffn(
        &self,
        c: &ChunkBufs,
        l: &crate::decoder::CudaLayer,
        n: usize,
        ph: u64,
    ) -> Result<(), CudaError> {
        let dev = &self.dev;
        let h = self.hidden();
        let (pl, pids, pwts, pact) = (
            dev.ptr(&c.logits),
            dev.ptr(&c.ids),
            dev.ptr(&c.wts),
            dev.ptr(&c.act),
        );
        let none = QwArg::default();
        // (gate, up, down) of the routed experts, of the shared expert / dense MLP.
        let (routed, shared, k, inter) = match &l.ffn {
            CudaFfn::Moe(m) => {
                self.route_chunk(l, m, ph, n, [pl, pids, pwts])?;
                (
                    Some([&m.gate, &m.up, &m.down]),
                    m.shared.as_ref().map(|[g, u, d]| [g, u, d]),
                    m.routing.top_k,
                    m.inter,
                )
            }
            CudaFfn::Mlp(m) => (None, Some([&m.w[0], &m.w[1], &m.w[2]]), 0, 0),
        };
        let ish = shared.map_or(0, |s| s[0].rows);
        let arg = |w: Option<&CudaWeight>| w.map_or(none, |w| w.arg(dev));
        let (g, u, d) = (
            arg(routed.map(|r| r[0])),
            arg(routed.map(|r| r[1])),
            arg(routed.map(|r| r[2])),
        );
        let (sg, su, sd) = (
            arg(shared.map(|s| s[0])),
            arg(shared.map(|s| s[1])),
            arg(shared.map(|s| s[2])),
        );
        let gw = routed.map_or_else(|| shared.expect("an ffn")[0], |r| r[0]);
        let dw = routed.map_or_else(|| shared.expect("an ffn")[2], |r| r[2]);
        // Gate/up: items (token, row of its slots).
        let smem = stage_bytes(CHUNK, h);
        dev.check_smem("prefill gate/up", smem)?;
        let f = dev.function(&ModuleSource::gemv(gw.format), "moe_gate_up_n")?;
        let lpr_e = lanes_per_row(h, gw.format.unroll());
        let items = n * (k * inter + ish);
        let grid = dev.grid_for(
            &f,
            256,
            smem,
            items.div_ceil(32 / lpr_e as usize).div_ceil(8),
        );
        let (ni, ki, ii, si, eps) = (n as i32, k as i32, inter as i32, ish as i32, l.eps);
        let nw = dev.ptr(&l.ffn_norm);
        launch!(
            dev,
            f,
            cfg((grid, 1), 256, smem),
            "moe_gate_up_n",
            g,
            u,
            sg,
            su,
            ph,
            ni,
            pids,
            ki,
            ii,
            si,
            pact,
            lpr_e,
            nw,
            eps
        )?;
        // Down: items (token, slot, row); blocks take contiguous ranges.
        let ns = k + (ish > 0) as usize;
        let min_cols = match (k, ish) {
            (0, s) => s,
            (_, 0) => inter,
            (_, s) => inter.min(s),
        };
        let lpr_d = lanes_per_row(min_cols, dw.format.unroll());
        let f = dev.function(&ModuleSource::gemv(dw.format), "moe_down_n")?;
        let cm = inter.max(ish);
        let slot_bytes = cm * 4 + cm / 32 * 4;
        let items = n * ns * h;
        let grid = dev.grid_for(
            &f,
            256,
            2 * slot_bytes,
            items.div_ceil(32 / lpr_d as usize).div_ceil(8),
        );
        let per = items.div_ceil(grid as usize);
        let grid = items.div_ceil(per) as u32;
        let slots = (n * ns).min(per.div_ceil(h) + 1);
        let smem_d = slots * slot_bytes;
        dev.check_smem("prefill down", smem_d)?;
        let (hi, per_i) = (h as i32, per as i32);
        launch!(
            dev,
            f,
            cfg((grid, 1), 256, smem_d),
            "moe_down_n",
            d,
            sd,
            pact,
            pids,
            pwts,
            ph,
            ni,
            ki,
            hi,
            ii,
            si,
            lpr_d,
            per_i
        )
    }
}
