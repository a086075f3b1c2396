// The barrier decode kernel: every layer of one token in ONE launch. Each op runs over
// the whole grid (a few CTAs per SM, all resident), a grid-wide barrier separates it
// from the next, and each CTA's share of an op's weights is already in its shared
// memory when the op starts: bulk copies (TMA) issued one op or more AHEAD.
//
// Why: at batch 1 an op moves only 0.3-14 MB, so what it costs is its dependency
// chain, not its bytes: the launch-per-op graph pays a kernel boundary plus a DRAM
// round trip (with ramp and tail) per op — ~51 us per qwen3-30b-a3b layer on an H200
// against ~8 us of HBM traffic. Weights do not depend on activations (only which
// experts to read does), so they can be on chip before their op's input exists.
//
// Per layer (MoE; a dense-MLP layer has no ROUTER). Each CTA owns a contiguous slice
// of every op's rows (rows * c / grid); "load" = its bulk copy into one of three
// shared-memory buffers (QG, OD, R), completing on that buffer's mbarrier:
//   QKV     load O -> OD, router -> R; qkv = W_qkv · rmsnorm(h) from QG     | barrier
//   ATT     per (q head, split): the new token's q/k/v (bias, norm, rope; each item
//           redundantly), KV append, online softmax · V; last split merges | barrier
//   O       h += W_o · att from OD (rows owned: no atomics)                 | barrier
//   ROUTER  logits = R · rmsnorm(h) from R; rmsnorm(h) stays staged for GU  | barrier
//   GU      every CTA routes (one warp); load its gate/up rows -> QG and its down
//           rows -> OD; act = silu(G x) * (U x) once QG lands               | barrier
//   DOWN    load the next layer's QKV -> QG; h += Σ w_k D_k act_k from OD (atomics) | barrier
// Activations written inside the launch are read with ld.cg (L1 is not coherent).
// Compiled with W_SMEM=1: gemv.cu's loaders read the shared-memory copies.

#ifndef MEGA_MIN_BLOCKS
#define MEGA_MIN_BLOCKS 2
#endif
#define MG_WARPS 8
#ifndef HD_MAX
#define HD_MAX 256  // head_dim at most (as ops.cu)
#endif
#define MG_THREADS (MG_WARPS * 32)

struct MegaStep {
  const LayerDesc* layers;
  float *h, *qkv, *att, *part, *logits, *act, *wts_out;
  int* ids_out;
  const int* pos;
  u32* bar;  // [64 + max heads]: grid-barrier count, per-head split arrivals (bar[64 + h]); zero at launch
  u64* dbg;  // null, or [n_layers][32] global-timer stamps by CTA 0 (mg_stamp)
  int n_layers, hidden, max_seq, splits;
  int stage_bytes, qg_bytes, od_bytes, pad;  // dynamic smem: stage area, then the QG, OD, R buffers
};

#if __CUDA_ARCH__ >= 900  // bulk copies and mbarriers; the host never launches it on older GPUs

// Wait for every CTA to arrive (the `n`th barrier of this launch). The writes before it
// are visible to every CTA after it: bar.sync orders the CTA's writes before thread 0's
// release arrival; thread 0 polls with relaxed loads (an acquire load per poll costs a
// fence each time) and fences once when the count is complete, then bar.sync again.
// (H200, 264 CTAs: 1.46 us per empty barrier; a flag bumped by the last arriver, so
// that polls do not share a line with the arrivals, measured 1.50 us.)
__device__ __forceinline__ void grid_sync(u32* bar, u32 n) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
    const u32 target = n * gridDim.x;
    u32 v;
    u64 t0 = 0;
    for (int i = 0;; i++) {
      asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
      if (v >= target) break;
      check_stuck(i, t0);
    }
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
  }
  __syncthreads();
}

// Lanes per row as the host picks them for the per-op kernels (weight.rs lanes_per_row).
__device__ __forceinline__ int mg_lpr(int cols, int unroll) {
  const int c = cols / 32, want = max((unroll * 3 + 3) / 4, 1);
  int l = 32;
  while (l > 1 && (c % l != 0 || c / l < want)) l >>= 1;
  return l;
}

// Stage rmsnorm(x) * nw (nw null: x as is) of x[cols], read through L2, into xs/xsum.
// Returns the norm's 1/rms (1 without nw).
__device__ float mg_stage(const float* x, int cols, float4* xs, float* xsum, const float* nw, float eps) {
  __shared__ float red[32];
  const int C = cols / 32;
  float inv = 1.f;
  if (nw) {
    float ss = 0.f;
    for (int u = threadIdx.x; u < 8 * C; u += blockDim.x) {
      const float4 v = __ldcg((const float4*)x + u);
      ss += (v.x * v.x + v.y * v.y) + (v.z * v.z + v.w * v.w);
    }
    inv = 1.f / sqrtf(block_sum(ss, red) / cols + eps);
  }
#if INT8_ACT
  stage_int8(x, cols, xs, nw, inv, true);
#else
  for (int u = threadIdx.x; u < 8 * C; u += blockDim.x) {
    float4 v = __ldcg((const float4*)x + u);
    if (nw) {
      const float4 w = __ldg((const float4*)nw + u);
      v.x = v.x * inv * w.x; v.y = v.y * inv * w.y; v.z = v.z * inv * w.z; v.w = v.w * inv * w.w;
    }
    v.x *= X_PRESCALE; v.y *= X_PRESCALE; v.z *= X_PRESCALE; v.w *= X_PRESCALE;
    xs[(u & 7) * C + (u >> 3)] = v;
  }
#endif
  __syncthreads();
  sum_vec(cols, xs, xsum);
  __syncthreads();
  return inv;
}

// Rows [r0, r0 + nr) of W copied to dst (shared memory) as codes, scales, biases, each
// piece widened to 16-byte alignment (bulk copies need it; allocations are 256-byte
// aligned, so the widening never leaves them). Returns the local view (row 0 = r0) and
// advances `off` past the pieces. Every thread computes the same view; thread 0 issues
// the copies (issue = true) on `bar`.
__device__ __forceinline__ QW mg_rows(const QW& W, int r0, int nr, unsigned char* dst, u32& off, u64* bar,
                                      bool issue) {
  QW v = W;
  v.rows = nr;
  if (nr <= 0) return v;
  const unsigned char* src[3] = {W.w + (u64)r0 * wrow_bytes(W), W.s + (u64)r0 * srow_bytes(W), W.b + (u64)r0 * brow_bytes(W)};
  const u32 len[3] = {(u32)nr * wrow_bytes(W), (u32)nr * srow_bytes(W), (u32)nr * brow_bytes(W)};
  const unsigned char** out[3] = {&v.w, &v.s, &v.b};
#pragma unroll
  for (int i = 0; i < 3; i++) {
    if (len[i] == 0) continue;
    const u64 a = (u64)src[i] & ~15ull, e = ((u64)src[i] + len[i] + 15) & ~15ull;
    *out[i] = dst + off + ((u64)src[i] - a);
    if (issue) {
      mb_expect_tx(bar, (u32)(e - a));
      bulk_g2s(dst + off, (const void*)a, (u32)(e - a), bar);
    }
    off += (u32)(e - a);
  }
  return v;
}

// A shared-memory buffer with its mbarrier; `n` counts its loads (the wait parity).
struct MgBuf {
  unsigned char* p;
  u64* bar;
  u32 n;
};
// Start a load into b (thread 0 arrives once all its copies are issued; the phase then
// completes when the bytes land). Returns the parity to wait for.
__device__ __forceinline__ u32 mg_begin(MgBuf& b) { return b.n++ & 1; }
__device__ __forceinline__ void mg_end(MgBuf& b) {
  if (threadIdx.x == 0) mb_arrive(b.bar);
}

// y[r0 + r] (+)= V[r] · x (+ bias) for the local view V of this CTA's rows.
__device__ void mg_gemv_local(const QW& V, int r0, const float4* xs, const float* xsum, float* y, bool add,
                              const float* bias) {
  if (V.rows <= 0) return;
  const int lpr = mg_lpr(V.cols, UNROLL);
  gemv_rows<1, 1>(V, lpr, threadIdx.x >> 5, MG_WARPS, xs, xsum, [&](int, int row, float v) {
    const int r = r0 + row;
    if (bias) v += bias[r];
    y[r] = add ? __ldcg(y + r) + v : v;
  });
}

// The (slot, row) segments of an item range [lo, hi) over slots of `rows_of(slot)` rows:
// calls f(slot, a, b) for each slot's rows [a, b) in the range.
template <class Rows, class F>
__device__ __forceinline__ void mg_segments(int lo, int hi, int nslots, Rows rows_of, F f) {
  int base = 0;
  for (int s = 0; s < nslots && base < hi; s++) {
    const int n = rows_of(s), a = max(lo, base), b = min(hi, base + n);
    if (a < b) f(s, a - base, b - base);
    base += n;
  }
}

// Sums of a and of b over the block (every thread gets both), in one pass.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
  __shared__ float2 red2[MG_WARPS];
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // red2 may still be read from a previous call
  if ((threadIdx.x & 31) == 0) red2[threadIdx.x >> 5] = make_float2(a, b);
  __syncthreads();
  float2 t = make_float2(0.f, 0.f);
#pragma unroll
  for (int w = 0; w < MG_WARPS; w++) { t.x += red2[w].x; t.y += red2[w].y; }
  return t;
}

// The new token's q (head hh), k and v (kv head kvh) into qs/ks/vs (smem): rows of qkv
// (+ bias), q/k RMSNorm, mscale and RoPE on the first rot dims — what ops.cu's qkv_post
// does, for one q head and its kv head, all three rows loaded at once.
__device__ void mg_new_qkv(const MegaStep& st, const LayerDesc& L, int hh, int kvh, int p, float* qs, float* ks,
                           float* vs) {
  const int d = threadIdx.x, hd = L.head_dim, H = L.heads, KV = L.kv_heads;
  const int rq = hh, rk = H + kvh, rv = H + KV + kvh;
  float xq = 0.f, xk = 0.f, xv = 0.f;
  if (d < hd) {
    xq = __ldcg(st.qkv + (size_t)rq * hd + d);
    xk = __ldcg(st.qkv + (size_t)rk * hd + d);
    xv = __ldcg(st.qkv + (size_t)rv * hd + d);
    if (L.qkv_bias) { xq += L.qkv_bias[rq * hd + d]; xk += L.qkv_bias[rk * hd + d]; xv += L.qkv_bias[rv * hd + d]; }
  }
  if (L.q_norm || L.k_norm) {
    const float2 ss = block_sum2(xq * xq, xk * xk);
    if (L.q_norm && d < hd) xq = xq * (1.f / sqrtf(ss.x / hd + L.qk_eps)) * L.q_norm[d];
    if (L.k_norm && d < hd) xk = xk * (1.f / sqrtf(ss.y / hd + L.qk_eps)) * L.k_norm[d];
  }
  if (d < L.rot) { xq *= L.mscale; xk *= L.mscale; }
  if (d < hd) { qs[d] = xq; ks[d] = xk; vs[d] = xv; }
  __syncthreads();
  if (d < L.rot) {
    const RopePair rp = rope_pair(d, L.rot, L.traditional);
    float sn, cs;
    sincosf((float)p * L.inv_freq[rp.i], &sn, &cs);
    xq = rope_rotate(xq, qs[rp.partner], sn, cs, rp.first);
    xk = rope_rotate(xk, ks[rp.partner], sn, cs, rp.first);
  }
  __syncthreads();
  if (d < hd) { qs[d] = xq; ks[d] = xk; }
  __syncthreads();
}

// Cached positions a warp loads at once (its K and V rows in flight together).
#define ATT_NP 4

// Attention of q head `hh`, split `sp` of `S`, over the cached positions plus the new
// token's k/v (taken from smem, rounded through f16 as the cache holds it). The warps'
// first K/V rows are loaded before the new token's q/k/v are computed (they do not
// depend on them). sm: scratch of (3 + MG_WARPS) * hd + 2 * MG_WARPS floats.
__device__ void mg_attention(const MegaStep& st, const LayerDesc& L, int hh, int sp, int S, float* sm) {
  __shared__ int last;
  const int hd = L.head_dim, H = L.heads, KV = L.kv_heads, kvh = hh / (H / KV);
  const int p = *st.pos;
  float *qs = sm, *ks = sm + hd, *vs = sm + 2 * hd, *so = sm + 3 * hd, *sm_m = so + MG_WARPS * hd,
        *sm_l = sm_m + MG_WARPS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nd = hd / 32;
  const int len = min(p + 1, st.max_seq);
  const int per = (len + S - 1) / S, start = sp * per, end = min(len, start + per);
  const unsigned short* kb = L.kc + (size_t)kvh * st.max_seq * hd;
  const unsigned short* vb = L.vc + (size_t)kvh * st.max_seq * hd;
  // Warp w takes positions t0 + w + MG_WARPS * i, i < ATT_NP, per round.
  unsigned short kr[ATT_NP][HD_MAX / 32], vr[ATT_NP][HD_MAX / 32];
  auto load = [&](int t0) {
#pragma unroll
    for (int i = 0; i < ATT_NP; i++) {
      const int t = t0 + MG_WARPS * i;
#pragma unroll
      for (int j = 0; j < HD_MAX / 32; j++) {
        const bool ok = j < nd && t < end && t != p;
        kr[i][j] = ok ? kb[(size_t)t * hd + lane + 32 * j] : 0;
        vr[i][j] = ok ? vb[(size_t)t * hd + lane + 32 * j] : 0;
      }
    }
  };
  load(start + warp);
  mg_new_qkv(st, L, hh, kvh, p, qs, ks, vs);
  const int d = threadIdx.x;
  if (d < hd) {
    const unsigned short kh = f32_to_f16(ks[d]), vh = f32_to_f16(vs[d]);
    if (sp == 0 && hh % (H / KV) == 0 && p >= 0 && p < st.max_seq) {
      const size_t o = ((size_t)kvh * st.max_seq + p) * hd + d;
      L.kc[o] = kh;
      L.vc[o] = vh;
    }
    ks[d] = f16_to_f32(kh);
    vs[d] = f16_to_f32(vh);
  }
  __syncthreads();
  float qr[HD_MAX / 32], o[HD_MAX / 32];
#pragma unroll
  for (int j = 0; j < HD_MAX / 32; j++) {
    qr[j] = j < nd ? qs[lane + 32 * j] * L.scale : 0.f;
    o[j] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int t0 = start + warp; t0 < end; t0 += MG_WARPS * ATT_NP) {
    float s[ATT_NP];
#pragma unroll
    for (int i = 0; i < ATT_NP; i++) {
      const bool now = t0 + MG_WARPS * i == p;  // written by this launch: from smem
      float a = 0.f;
#pragma unroll
      for (int j = 0; j < HD_MAX / 32; j++)
        if (j < nd) a += qr[j] * (now ? ks[lane + 32 * j] : f16_to_f32(kr[i][j]));
      s[i] = a;
    }
#pragma unroll
    for (int i = 0; i < ATT_NP; i++) s[i] = warp_sum(s[i]);
#pragma unroll
    for (int i = 0; i < ATT_NP; i++) {
      const int t = t0 + MG_WARPS * i;
      if (t >= end) break;
      const bool now = t == p;
      const float mn = fmaxf(m, s[i]), corr = expf(m - mn), pw = expf(s[i] - mn);
      l = l * corr + pw;
#pragma unroll
      for (int j = 0; j < HD_MAX / 32; j++)
        if (j < nd) o[j] = o[j] * corr + pw * (now ? vs[lane + 32 * j] : f16_to_f32(vr[i][j]));
      m = mn;
    }
    if (t0 + MG_WARPS * ATT_NP < end) load(t0 + MG_WARPS * ATT_NP);
  }
  if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
#pragma unroll
  for (int j = 0; j < HD_MAX / 32; j++)
    if (j < nd) so[warp * hd + lane + 32 * j] = o[j];
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < MG_WARPS; w++) M = fmaxf(M, sm_m[w]);
  float acc = 0.f, Lsum = 0.f;
  if (M != -INFINITY)
    for (int w = 0; w < MG_WARPS; w++) {
      const float e = expf(sm_m[w] - M);
      Lsum += e * sm_l[w];
      if (d < hd) acc += e * so[w * hd + d];
    }
  if (S == 1) {
    if (d < hd) st.att[hh * hd + d] = acc / Lsum;
    __syncthreads();
    return;
  }
  // Split partial (o, m, l) as ops.cu's attn_partial; the last split to arrive merges.
  float* out = st.part + ((size_t)hh * S + sp) * (hd + 2);
  if (d < hd) out[d] = acc;
  if (d == 0) { out[hd] = M; out[hd + 1] = Lsum; }
  __threadfence();
  __syncthreads();
  if (d == 0) last = atomicAdd(st.bar + 64 + hh, 1u) == (u32)S - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (d < hd) st.att[hh * hd + d] = merge_dim(st.part + (size_t)hh * S * (hd + 2), S, hd, d);
  if (d == 0) st.bar[64 + hh] = 0;  // for the next layer (every split has arrived)
  __syncthreads();
}

// Slots 0-5: after op o's barrier; 8 + o: op o's work done (before its barrier). Slot 6
// of layer 0: ns per barrier of MEGA_BARTEST barriers run first.
__device__ __forceinline__ void mg_stamp(const MegaStep& st, int li, int slot) {
  if (st.dbg && blockIdx.x == 0 && threadIdx.x == 0) st.dbg[li * 32 + slot] = globaltimer();
}

// Issue thread 0's copies of this CTA's share of W's rows into b (see mg_rows).
__device__ __forceinline__ void mg_load_share(const QW& W, MgBuf& b) {
  if (threadIdx.x == 0 && W.rows > 0) {
    // The buffer's last contents were read through the generic proxy.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    int r0, r1;
    share(W.rows, r0, r1);
    u32 off = 0;
    mg_rows(W, r0, r1 - r0, b.p, off, b.bar, true);
  }
}
// The local view of this CTA's share of W's rows in b, and its first row.
__device__ __forceinline__ QW mg_view_share(const QW& W, const MgBuf& b, int& r0) {
  int r1;
  share(W.rows, r0, r1);
  u32 off = 0;
  return mg_rows(W, r0, r1 - r0, b.p, off, nullptr, false);
}

// GU's item segments: slot s < k is expert ids[s] (inter rows of G/U), slot k the
// shared expert / dense MLP (inter_sh rows of SG/SU). The view of rows [a, b) of slot s
// of the gate (m = 0) or up (m = 1) projection, placed at `off` in `dst`.
__device__ __forceinline__ QW mg_gu_view(const LayerDesc& L, const int* ids, int s, int a, int b, int m,
                                         unsigned char* dst, u32& off, u64* bar, bool issue) {
  const bool routed = s < L.rt.k;
  const QW W = routed ? (m ? L.up : L.gate) : (m ? L.su : L.sg);
  const int r0 = routed ? ids[s] * L.inter + a : a;
  return mg_rows(W, r0, b - a, dst, off, bar, issue);
}
__device__ __forceinline__ QW mg_down_view(const LayerDesc& L, const int* ids, int H, int s, int a, int b,
                                           unsigned char* dst, u32& off, u64* bar, bool issue) {
  const bool routed = s < L.rt.k;
  return mg_rows(routed ? L.down : L.sd, routed ? ids[s] * H + a : a, b - a, dst, off, bar, issue);
}

#endif  // __CUDA_ARCH__ >= 900

extern "C" __global__ void __launch_bounds__(MG_THREADS, MEGA_MIN_BLOCKS) mega_layers(const MegaStep st) {
#if __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) u64 mbar[4];
  // The layer table lives in global memory, where the weights streaming through L2
  // evict it between uses: every field read there was a DRAM round trip on the
  // critical path. Each layer's entry is bulk-copied here one layer ahead.
  __shared__ LayerDesc sdesc[2];
  __shared__ int ids[MAX_TOPK];
  __shared__ float wts[MAX_TOPK];
  float4* xs = (float4*)smem;
  MgBuf QG{smem + st.stage_bytes, &mbar[0], 0};
  MgBuf OD{QG.p + st.qg_bytes, &mbar[1], 0};
  MgBuf RB{OD.p + st.od_bytes, &mbar[2], 0};
  if (threadIdx.x == 0) {
    for (int i = 0; i < 4; i++) mb_init(&mbar[i], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  MgBuf DB{nullptr, &mbar[3], 0};
  auto load_desc = [&](int li) {
    mg_begin(DB);
    if (threadIdx.x == 0) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      mb_expect_tx(DB.bar, sizeof(LayerDesc));
      bulk_g2s(&sdesc[li & 1], st.layers + li, sizeof(LayerDesc), DB.bar);
    }
    mg_end(DB);
  };
  load_desc(0);
  mb_wait(DB.bar, 0);
  if (st.n_layers > 1) load_desc(1);
  // Layer 0's QKV rows: weights need nothing from the previous launch.
  u32 par_qg = mg_begin(QG), par_od = 0, par_r = 0;
  mg_load_share(sdesc[0].qkv, QG);
  mg_end(QG);
  pdl_wait();
  u32 nbar = 0;
#ifdef MEGA_BARTEST
  {
    const u64 t0 = globaltimer();
    for (int i = 0; i < MEGA_BARTEST; i++) grid_sync(st.bar, ++nbar);
    if (st.dbg && blockIdx.x == 0 && threadIdx.x == 0) st.dbg[6] = (globaltimer() - t0) / MEGA_BARTEST;
  }
#endif
  const int H = st.hidden, C = H / 32;
  for (int li = 0; li < st.n_layers; li++) {
    const LayerDesc& L = sdesc[li & 1];
    const int k = L.rt.k, ish = L.inter_sh, nslots = k + (ish > 0);
    if (li >= 1 && li + 1 < st.n_layers) load_desc(li + 1);  // into the entry of layer li - 1
    // ---- QKV (O and router rows start loading) ----
    par_od = mg_begin(OD);
    mg_load_share(L.o, OD);
    mg_end(OD);
    if (k > 0) {
      par_r = mg_begin(RB);
      mg_load_share(L.router, RB);
      mg_end(RB);
    }
    mg_stamp(st, li, 16);
    {
      float* xsum = (float*)(xs + 8 * C);
      mg_stage(st.h, H, xs, xsum, L.attn_norm, L.eps);
      mg_stamp(st, li, 17);
      int r0;
      const QW V = mg_view_share(L.qkv, QG, r0);
      mb_wait(QG.bar, par_qg);
      mg_stamp(st, li, 18);
      mg_gemv_local(V, r0, xs, xsum, st.qkv, false, nullptr);
    }
    mg_stamp(st, li, 8);
    grid_sync(st.bar, ++nbar);
    mg_stamp(st, li, 0);
    // ---- ATT ----
    {
      const int S = st.splits;
      for (int it = blockIdx.x; it < L.heads * S; it += gridDim.x) mg_attention(st, L, it / S, it % S, S, (float*)smem);
    }
    mg_stamp(st, li, 9);
    grid_sync(st.bar, ++nbar);
    mg_stamp(st, li, 1);
    // ---- O ----
    {
      const int cols = L.heads * L.head_dim;
      float* xsum = (float*)(xs + 8 * (cols / 32));
      mg_stage(st.att, cols, xs, xsum, nullptr, 0.f);
      mg_stamp(st, li, 22);
      int r0;
      const QW V = mg_view_share(L.o, OD, r0);
      mb_wait(OD.bar, par_od);
      mg_stamp(st, li, 23);
      mg_gemv_local(V, r0, xs, xsum, st.h, true, L.o_bias);
    }
    mg_stamp(st, li, 10);
    grid_sync(st.bar, ++nbar);
    mg_stamp(st, li, 2);
    // ---- ROUTER (the staged rmsnorm(h) is kept for GU) ----
    float* xsum = (float*)(xs + 8 * C);
    const float inv = mg_stage(st.h, H, xs, xsum, L.ffn_norm, L.eps);
    if (k > 0) {
      int r0;
      const QW V = mg_view_share(L.router, RB, r0);
      mb_wait(RB.bar, par_r);
      // Exact f32 x (rows_exact): int8 noise would flip near-ties between experts.
      if (V.rows > 0) rows_exact(V, mg_lpr(V.cols, 1), threadIdx.x >> 5, MG_WARPS, st.h, L.ffn_norm, inv, st.logits + r0);
      mg_stamp(st, li, 11);
      grid_sync(st.bar, ++nbar);
    }
    mg_stamp(st, li, 3);
    // ---- GU: route, then this CTA's gate/up rows -> QG and down rows -> OD ----
    const int items_gu = k * L.inter + ish, items_d = nslots * H;
    int glo, ghi, dlo, dhi;
    share(items_gu, glo, ghi);
    share(items_d, dlo, dhi);
    auto gu_rows = [&](int s) { return s < k ? L.inter : ish; };
    auto d_rows = [&](int) { return H; };
    {
      if (k > 0) {
        if (threadIdx.x < 32) route(st.logits, L.rt, ids, wts);
        __syncthreads();
        if (blockIdx.x == 0 && threadIdx.x < k) {
          st.ids_out[threadIdx.x] = ids[threadIdx.x];
          st.wts_out[threadIdx.x] = wts[threadIdx.x];
        }
      }
      mg_stamp(st, li, 19);
      par_qg = mg_begin(QG);
      par_od = mg_begin(OD);
      if (threadIdx.x == 0) {
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        u32 off = 0;
        mg_segments(glo, ghi, nslots, gu_rows, [&](int s, int a, int b) {
          mg_gu_view(L, ids, s, a, b, 0, QG.p, off, QG.bar, true);
          mg_gu_view(L, ids, s, a, b, 1, QG.p, off, QG.bar, true);
        });
        off = 0;
        mg_segments(dlo, dhi, nslots, d_rows,
                    [&](int s, int a, int b) { mg_down_view(L, ids, H, s, a, b, OD.p, off, OD.bar, true); });
      }
      mg_end(QG);
      mg_end(OD);
      const int lpr = mg_lpr(H, UNROLL), rpw = 32 / lpr;
      const int lane = threadIdx.x & 31, sub = lane & (lpr - 1), rsub = lane / lpr, warp = threadIdx.x >> 5;
      mg_stamp(st, li, 20);
      mb_wait(QG.bar, par_qg);
      mg_stamp(st, li, 21);
      u32 off = 0;
      mg_segments(glo, ghi, nslots, gu_rows, [&](int s, int a, int b) {
        const QW G = mg_gu_view(L, ids, s, a, b, 0, QG.p, off, nullptr, false);
        const QW U = mg_gu_view(L, ids, s, a, b, 1, QG.p, off, nullptr, false);
        for (int base = warp * rpw; base < b - a; base += MG_WARPS * rpw) {
          const int r = base + rsub;
          float g[1] = {0.f}, u[1] = {0.f};
          if (r < b - a) row_dot2(G, r, U, r, C, sub, lpr, xs, xsum, g, u);
          g[0] = reduce_lpr(g[0], lpr);
          u[0] = reduce_lpr(u[0], lpr);
          if (r < b - a && sub == 0) st.act[s * L.inter + a + r] = silu(g[0]) * u[0];
        }
      });
    }
    mg_stamp(st, li, 12);
    grid_sync(st.bar, ++nbar);
    mg_stamp(st, li, 4);
    // ---- DOWN (the next layer's QKV rows start loading; its small vectors into L2) ----
    if (li + 1 < st.n_layers) {
      mb_wait(DB.bar, (li + 1) & 1);  // entry li + 1 (load number li + 1)
      const LayerDesc& N = sdesc[(li + 1) & 1];
      par_qg = mg_begin(QG);
      mg_load_share(N.qkv, QG);
      mg_end(QG);
      if (blockIdx.x == gridDim.x - 1) {
        const int t = threadIdx.x, nt = blockDim.x, hd = N.head_dim;
        prefetch_l2(N.attn_norm, (u64)H * 4, t, nt);
        prefetch_l2(N.ffn_norm, (u64)H * 4, t, nt);
        prefetch_l2(N.q_norm, (u64)hd * 4, t, nt);
        prefetch_l2(N.k_norm, (u64)hd * 4, t, nt);
        prefetch_l2(N.inv_freq, (u64)N.rot * 2, t, nt);
        prefetch_l2(N.qkv_bias, (u64)(N.heads + 2 * N.kv_heads) * hd * 4, t, nt);
        prefetch_l2(N.rt.bias, (u64)N.rt.n_experts * 4, t, nt);
      }
    }
    if (dlo < dhi) {
      const int Cr = L.inter / 32, Cs = ish / 32, Cm = Cr > Cs ? Cr : Cs;
      const int s_lo = dlo / H, s_hi = (dhi - 1) / H;
      float* xsd = (float*)(xs + (s_hi - s_lo + 1) * 8 * Cm);
      for (int s = s_lo; s <= s_hi; s++)
        mg_stage(st.act + s * L.inter, s < k ? L.inter : ish, xs + (s - s_lo) * 8 * Cm, xsd + (s - s_lo) * Cm,
                 nullptr, 0.f);
      mg_stamp(st, li, 24);
      mb_wait(OD.bar, par_od);
      mg_stamp(st, li, 25);
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
      u32 off = 0;
      mg_segments(dlo, dhi, nslots, d_rows, [&](int s, int a, int b) {
        const QW D = mg_down_view(L, ids, H, s, a, b, OD.p, off, nullptr, false);
        const int lpr = mg_lpr(D.cols, UNROLL), rpw = 32 / lpr, sub = lane & (lpr - 1), rsub = lane / lpr;
        const float wt = s < k ? wts[s] : 1.f;
        const float4* xss = xs + (s - s_lo) * 8 * Cm;
        const float* xsm = xsd + (s - s_lo) * Cm;
        for (int base = warp * rpw; base < b - a; base += MG_WARPS * rpw) {
          const int r = base + rsub;
          float acc[1] = {0.f};
          if (r < b - a) row_dot<1>(D, r, D.cols / 32, sub, lpr, xss, xsm, acc);
          acc[0] = reduce_lpr(acc[0], lpr);
          if (r < b - a && sub == 0) atomicAdd(st.h + a + r, wt * acc[0]);
        }
      });
    } else {
      mb_wait(OD.bar, par_od);  // nothing to compute, but the buffer's phase must end
    }
    mg_stamp(st, li, 13);
    grid_sync(st.bar, ++nbar);
    mg_stamp(st, li, 5);
  }
#endif
}
