// The persistent decode kernel: every layer of one token in ONE launch, for models whose
// projections, router and experts share this module's format.
//
// A launch per operation costs a few microseconds of ramp and tail each (ten per layer
// measured ~65 us per qwen3-30b-a3b layer on an H200 against ~8 us of HBM traffic). Here
// one grid of co-resident CTAs walks the layers; phases that need the whole previous
// result are separated by a grid barrier (a counter in global memory), six per layer:
//
//   1 QKV         rows of [q|k|v] = W · rmsnorm(h)            (all CTAs, rows split)
//   2 attention   one CTA per q head: bias, q/k norm, rope, KV append, softmax · V
//   3 o_proj      h += W_o · att                               (rows split)
//   4 router      logits = R · rmsnorm(h)                      (MoE layers)
//   5 gate/up     every CTA routes (top-k) itself, then rows of silu(G x) * (U x)
//   6 down        h += Σ w_k D_k · act_k (+ shared / dense MLP) (rows split, atomics)
//
// While a CTA waits at a barrier it has already asked L2 for the rows it streams in the
// next phase (when they are known: not the routed gate/up), so HBM keeps streaming
// across phase boundaries. Activations written inside the launch are read with ld.cg
// (L2): L1 is not coherent between SMs.

#ifndef HD_MAX
#define HD_MAX 256
#endif

struct LayerDesc {
  QW qkv, o, router, gate, up, down, sg, su, sd;
  Routing rt;  // rt.k = 0: dense MLP (sg/su/sd), no router
  const float *attn_norm, *ffn_norm, *qkv_bias, *o_bias, *q_norm, *k_norm, *inv_freq;
  unsigned short *kc, *vc;
  float eps, qk_eps, mscale, scale;
  int heads, kv_heads, head_dim, rot, traditional, inter, inter_sh;
  int lpr_qkv, lpr_o, lpr_router, lpr_gu, lpr_down, pad;
};

struct Step {
  const LayerDesc* layers;
  float *h, *qkv, *att, *logits, *wts, *act;
  int* ids;
  const int* pos;
  u32* bar;
  u64* dbg;  // null, or [n_layers][8] global-timer stamps taken by CTA 0 after each phase
  int n_layers, hidden, max_seq, prefetch;
};

__device__ __forceinline__ void stamp(const Step& st, int li, int ph) {
  if (st.dbg && blockIdx.x == 0 && threadIdx.x == 0) {
    u64 t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    st.dbg[li * 8 + ph] = t;
  }
}

__device__ __forceinline__ void grid_sync(u32* bar, u32& gen) {
  __syncthreads();
  gen++;
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(bar, 1u);
    const u32 target = gen * gridDim.x;
    u32 v;
    while (true) {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
      if (v >= target) break;
      __nanosleep(32);
    }
  }
  __syncthreads();
}

// stage_vec_norm for activations written in this launch (read through L2).
__device__ __forceinline__ void stage_cg(const float* x, int cols, float4* xs, const float* nw, float eps) {
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
  return;
#endif
  for (int u = threadIdx.x; u < 8 * C; u += blockDim.x) {
    float4 v = __ldcg((const float4*)x + u);
    if (nw) {
      const float4 w = __ldg((const float4*)nw + u);
      v.x = v.x * inv * w.x; v.y = v.y * inv * w.y; v.z = v.z * inv * w.z; v.w = v.w * inv * w.w;
    }
    v.x *= X_PRESCALE; v.y *= X_PRESCALE; v.z *= X_PRESCALE; v.w *= X_PRESCALE;
    xs[(u & 7) * C + (u >> 3)] = v;
  }
}

// This CTA's rows of a grid-stride GEMV over `rows` rows with `lpr` lanes per row.
__device__ __forceinline__ void prefetch_gemv_rows(const QW& W, int rows, int lpr) {
  const int per = (blockDim.x >> 5) * (32 / lpr);
  for (int r0 = blockIdx.x * per; r0 < rows; r0 += gridDim.x * per)
    prefetch_rows(W, r0, min(per, rows - r0), threadIdx.x, blockDim.x);
}

// y[row] (+)= W[row] . xs for every row, warps of the whole grid striding over rows.
__device__ __forceinline__ void gemv_phase(const QW& W, const float4* xs, const float* xsum, float* y, int lpr,
                                           bool add, const float* bias) {
  const int C = W.cols / 32;
  const int lane = threadIdx.x & 31, sub = lane & (lpr - 1), rsub = lane / lpr, rpw = 32 / lpr;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, nwarps = (gridDim.x * blockDim.x) >> 5;
  for (int base = warp * rpw; base < W.rows; base += nwarps * rpw) {
    const int row = base + rsub;
    float acc[1] = {0.f};
    if (row < W.rows) row_dot<1>(W, row, C, sub, lpr, xs, xsum, acc);
    acc[0] = reduce_lpr(acc[0], lpr);
    if (row < W.rows && sub == 0) {
      float v = acc[0] + (bias ? bias[row] : 0.f);
      y[row] = add ? __ldcg(y + row) + v : v;
    }
  }
}

// One head vector of qkv into shared memory: bias, optional RMSNorm, yarn scale, rope.
__device__ __forceinline__ void head_prep(const LayerDesc& L, const float* src, const float* bias,
                                          const float* nw, bool rotate, int p, float* dst, float* red) {
  const int d = threadIdx.x, hd = L.head_dim;
  float x = d < hd ? __ldcg(src + d) + (bias ? bias[d] : 0.f) : 0.f;
  if (nw) {
    const float t = block_sum(x * x, red);
    x = d < hd ? x * (1.f / sqrtf(t / hd + L.qk_eps)) * nw[d] : 0.f;
  }
  if (rotate && d < L.rot) x *= L.mscale;
  __syncthreads();
  if (d < hd) dst[d] = x;
  __syncthreads();
  if (rotate && d < L.rot) {
    const int half = L.rot / 2;
    int i, partner;
    bool first;
    if (L.traditional) { i = d >> 1; first = (d & 1) == 0; partner = first ? d + 1 : d - 1; }
    else { first = d < half; i = first ? d : d - half; partner = first ? d + half : d - half; }
    float sn, cs;
    sincosf((float)p * L.inv_freq[i], &sn, &cs);
    const float o = dst[partner];
    x = first ? x * cs - o * sn : o * sn + x * cs;
  }
  __syncthreads();
  if (d < hd) dst[d] = x;
  __syncthreads();
}

// Block-wide max (every thread gets it); `red` is 32 floats of shared memory.
__device__ __forceinline__ float block_max(float v, float* red) {
  v = warp_max(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = threadIdx.x < 32 && threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : -INFINITY;
  if (threadIdx.x < 32) {
    t = warp_max(t);
    if (threadIdx.x == 0) red[0] = t;
  }
  __syncthreads();
  return red[0];
}

#define ATT_TILE 2048
// Phase 2 for q head `head` (this CTA): attention over positions 0..p, the current one
// from shared memory (rounded to f16 as the cache stores it). Positions are spread over
// all threads (one score each per pass, K rows read with 16-byte loads), then each
// thread accumulates one output feature over a share of the positions, so a pass costs
// two memory round trips whatever the context length (per tile of ATT_TILE positions).
// Shared floats: 4 * HD_MAX + 64 + ATT_TILE + blockDim.
__device__ void attention_phase(const LayerDesc& L, const Step& st, int head, int p, float* sm) {
  const int hd = L.head_dim, group = L.heads / L.kv_heads, kvh = head / group;
  float* q = sm;
  float* k = sm + HD_MAX;
  float* v = sm + 2 * HD_MAX;
  float* red = sm + 3 * HD_MAX;
  float* sc = red + 64;
  float* part = sc + ATT_TILE;
  const float* qkv = st.qkv;
  const float* qb = L.qkv_bias;
  head_prep(L, qkv + head * hd, qb ? qb + head * hd : nullptr, L.q_norm, true, p, q, red);
  const int ko = (L.heads + kvh) * hd, vo = (L.heads + L.kv_heads + kvh) * hd;
  head_prep(L, qkv + ko, qb ? qb + ko : nullptr, L.k_norm, true, p, k, red);
  head_prep(L, qkv + vo, qb ? qb + vo : nullptr, nullptr, false, p, v, red);
  const int tid = threadIdx.x;
  if (tid < hd) {
    const unsigned short kh = f32_to_f16(k[tid]), vh = f32_to_f16(v[tid]);
    if (head % group == 0 && p < st.max_seq) {
      const size_t o = ((size_t)kvh * st.max_seq + p) * hd + tid;
      L.kc[o] = kh;
      L.vc[o] = vh;
    }
    k[tid] = f16_to_f32(kh);
    v[tid] = f16_to_f32(vh);
    q[tid] *= L.scale;
  }
  __syncthreads();
  const unsigned short* kbase = L.kc + (size_t)kvh * st.max_seq * hd;
  const unsigned short* vbase = L.vc + (size_t)kvh * st.max_seq * hd;
  const int len = min(p + 1, st.max_seq);
  const int nparts = blockDim.x / hd, d = tid % hd, pi = tid / hd;
  float M = -INFINITY, Lsum = 0.f, acc = 0.f;
  for (int t0 = 0; t0 < len; t0 += ATT_TILE) {
    const int n = min(ATT_TILE, len - t0);
    float mloc = -INFINITY;
    for (int j = tid; j < n; j += blockDim.x) {
      const int pos = t0 + j;
      float s = 0.f;
      if (pos == p) {
        for (int e = 0; e < hd; e++) s += q[e] * k[e];
      } else {
        const uint4* kr = (const uint4*)(kbase + (size_t)pos * hd);
        for (int e8 = 0; e8 < hd / 8; e8++) {
          const uint4 w = __ldcg(kr + e8);
          const u32 ww[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
          for (int h2 = 0; h2 < 4; h2++) {
            s += q[e8 * 8 + 2 * h2] * f16_to_f32((unsigned short)(ww[h2] & 0xFFFFu));
            s += q[e8 * 8 + 2 * h2 + 1] * f16_to_f32((unsigned short)(ww[h2] >> 16));
          }
        }
      }
      sc[j] = s;
      mloc = fmaxf(mloc, s);
    }
    const float Mn = fmaxf(M, block_max(mloc, red));
    float sloc = 0.f;
    for (int j = tid; j < n; j += blockDim.x) {
      const float e = expf(sc[j] - Mn);
      sc[j] = e;
      sloc += e;
    }
    const float tile_sum = block_sum(sloc, red);  // also orders the sc writes
    const float corr = expf(M - Mn);
    Lsum = Lsum * corr + tile_sum;
    acc *= corr;
    if (pi < nparts) {
#pragma unroll 8
      for (int j = pi; j < n; j += nparts) {
        const int pos = t0 + j;
        const float vv = pos == p ? v[d] : f16_to_f32(__ldcg(vbase + (size_t)pos * hd + d));
        acc += sc[j] * vv;
      }
    }
    M = Mn;
    __syncthreads();
  }
  part[tid] = acc;
  __syncthreads();
  if (tid < hd) {
    float o = 0.f;
    for (int i = 0; i < nparts; i++) o += part[i * hd + tid];
    st.att[head * hd + tid] = o / Lsum;
  }
  __syncthreads();
}

// CTAs per SM the register budget is tuned for (2: at most 128 registers a thread).
#ifndef DEC_MINB
#define DEC_MINB 2
#endif
extern "C" __global__ void __launch_bounds__(256, DEC_MINB) decode_layers(const Step st) {
  extern __shared__ float4 smem4[];
  __shared__ int s_ids[64];
  __shared__ float s_wts[64];
  u32 gen = 0;
  pdl_wait();
  pdl_trigger();
  const int H = st.hidden;
  const int p = __ldcg(st.pos);
  for (int li = 0; li < st.n_layers; li++) {
    const LayerDesc& L = st.layers[li];
    stamp(st, li, 0);
    float4* xs = smem4;
    // 1. QKV.
    {
      const int C = H / 32;
      float* xsum = (float*)(xs + 8 * C);
      stage_cg(st.h, H, xs, L.attn_norm, L.eps);
      __syncthreads();
      sum_vec(H, xs, xsum);
      __syncthreads();
      // Weight descriptors are copied into registers: read through the reference they
      // would be re-loaded from global memory after every store.
      const QW W = L.qkv;
      gemv_phase(W, xs, xsum, st.qkv, L.lpr_qkv, false, nullptr);
      if (st.prefetch) {
        const QW O = L.o;
        prefetch_gemv_rows(O, O.rows, L.lpr_o);
      }
    }
    grid_sync(st.bar, gen);
    stamp(st, li, 1);
    // 2. Attention (CTAs past the heads prefetch the router).
    if ((int)blockIdx.x < L.heads) attention_phase(L, st, blockIdx.x, p, (float*)smem4);
    else if (st.prefetch && L.rt.k > 0) {
      const QW R = L.router;
      prefetch_gemv_rows(R, R.rows, L.lpr_router);
    }
    grid_sync(st.bar, gen);
    stamp(st, li, 2);
    // 3. Output projection into the residual.
    {
      const QW O = L.o;
      const int C = O.cols / 32;
      float* xsum = (float*)(xs + 8 * C);
      stage_cg(st.att, O.cols, xs, nullptr, 0.f);
      __syncthreads();
      sum_vec(O.cols, xs, xsum);
      __syncthreads();
      gemv_phase(O, xs, xsum, st.h, L.lpr_o, true, L.o_bias);
      if (st.prefetch && L.rt.k > 0) {
        const QW R = L.router;
        prefetch_gemv_rows(R, R.rows, L.lpr_router);
      }
    }
    grid_sync(st.bar, gen);
    stamp(st, li, 3);
    const int k = L.rt.k, inter = L.inter, ish = L.inter_sh, lpr_gu = L.lpr_gu, lpr_down = L.lpr_down;
    const int C = H / 32;
    float* xsum = (float*)(xs + 8 * C);
    // 4. Router logits (the normed x stays staged for gate/up).
    stage_cg(st.h, H, xs, L.ffn_norm, L.eps);
    __syncthreads();
    sum_vec(H, xs, xsum);
    __syncthreads();
    if (k > 0) {
      const QW R = L.router;
      const Routing rt = L.rt;
      gemv_phase(R, xs, xsum, st.logits, L.lpr_router, false, nullptr);
      grid_sync(st.bar, gen);
    stamp(st, li, 4);
      // Every CTA routes for itself (no barrier); CTA 0 publishes the choice.
      if (threadIdx.x < 32) route(st.logits, rt, s_ids, s_wts);
      __syncthreads();
      if (blockIdx.x == 0 && threadIdx.x < k) {
        st.ids[threadIdx.x] = s_ids[threadIdx.x];
        st.wts[threadIdx.x] = s_wts[threadIdx.x];
      }
    }
    // 5. Gate/up of the routed experts (+ shared / dense). Down's rows are known now:
    //    ask for them first.
    const int items_d = (k + (ish > 0)) * H;
    const int lane = threadIdx.x & 31;
    const QW D = L.down, SD = L.sd;
    if (st.prefetch) {
      const int rpw = 32 / lpr_down, per = (blockDim.x >> 5) * rpw;
      for (int i0 = blockIdx.x * per; i0 < items_d; i0 += gridDim.x * per) {
        const int s = i0 / H, r = i0 % H, n = min(per, H - r);
        if (s < k) prefetch_rows(D, s_ids[s] * H + r, n, threadIdx.x, blockDim.x);
        else prefetch_rows(SD, r, n, threadIdx.x, blockDim.x);
      }
    }
    {
      const QW G = L.gate, U = L.up, SG = L.sg, SU = L.su;
      const int lpr = lpr_gu, sub = lane & (lpr - 1), rsub = lane / lpr, rpw = 32 / lpr;
      const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, nwarps = (gridDim.x * blockDim.x) >> 5;
      const int items = k * inter + ish;
      for (int base = warp * rpw; base < items; base += nwarps * rpw) {
        const int i = base + rsub;
        float g[1] = {0.f}, u[1] = {0.f};
        if (i < items) {
          const bool routed = i < k * inter;
          const int row = routed ? s_ids[i / inter] * inter + i % inter : i - k * inter;
          const QW Wg = pick(routed, G, SG);
          const QW Wu = pick(routed, U, SU);
          row_dot2(Wg, row, Wu, row, C, sub, lpr, xs, xsum, g, u);
        }
        g[0] = reduce_lpr(g[0], lpr);
        u[0] = reduce_lpr(u[0], lpr);
        if (i < items && sub == 0) st.act[i] = silu(g[0]) * u[0];
      }
    }
    grid_sync(st.bar, gen);
    stamp(st, li, 5);
    // 6. Down, weighted into the residual.
    {
      const int Cr = inter / 32, Cs = ish / 32, Cm = Cr > Cs ? Cr : Cs;
      const int slots = k + (ish > 0);
      float* asum = (float*)(xs + slots * 8 * Cm);
      for (int s = 0; s < slots; s++) stage_cg(st.act + s * inter, s < k ? inter : ish, xs + s * 8 * Cm, nullptr, 0.f);
      __syncthreads();
      for (int s = 0; s < slots; s++) sum_vec(s < k ? inter : ish, xs + s * 8 * Cm, asum + s * Cm);
      __syncthreads();
      const int lpr = lpr_down, sub = lane & (lpr - 1), rsub = lane / lpr, rpw = 32 / lpr;
      const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, nwarps = (gridDim.x * blockDim.x) >> 5;
      for (int base = warp * rpw; base < items_d; base += nwarps * rpw) {
        const int i = base + rsub;
        float acc[1] = {0.f};
        float wt = 0.f;
        int r = 0;
        if (i < items_d) {
          const int slot = i / H;
          r = i % H;
          const bool routed = slot < k;
          const QW W = pick(routed, D, SD);
          const int row = routed ? s_ids[slot] * H + r : r;
          wt = routed ? s_wts[slot] : 1.f;
          row_dot<1>(W, row, routed ? Cr : Cs, sub, lpr, xs + slot * 8 * Cm, asum + slot * Cm, acc);
        }
        acc[0] = reduce_lpr(acc[0], lpr);
        if (i < items_d && sub == 0) atomicAdd(st.h + r, wt * acc[0]);
      }
      if (st.prefetch && li + 1 < st.n_layers) {
        const QW N = st.layers[li + 1].qkv;
        prefetch_gemv_rows(N, N.rows, st.layers[li + 1].lpr_qkv);
      }
    }
    grid_sync(st.bar, gen);
    stamp(st, li, 6);
  }
}
