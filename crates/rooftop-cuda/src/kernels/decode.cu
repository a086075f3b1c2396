// The streaming decode kernel: every layer of one token in ONE launch, with the weights
// streamed into shared memory by bulk copies (TMA) AHEAD of the data they meet.
//
// Why: at batch 1 each projection moves only 0.2–14 MB; a launch per op (or a phase
// between grid barriers) issues its weight loads only once its input exists, so every
// op pays a full DRAM round trip plus ramp and tail — ~65 us per qwen3-30b-a3b layer on
// an H200 against ~8 us of HBM traffic. But weights do not depend on activations: only
// which experts to read does. So each CTA (one per SM) runs a producer warp that walks
// the CTA's share of every op of every layer and bulk-copies the weight rows into a ring
// of shared-memory slots as soon as a slot is free — for the attention and o_proj of the
// next layer while this layer's experts are still being computed, for the experts the
// moment routing is known — while 15 consumer warps compute from shared memory. HBM keeps
// streaming across every dependency; what remains per op is the dependency itself (a
// counter in global memory) and arithmetic on data already on chip.
//
// Status (H200, qwen3-30b-a3b affine4, docs/PERFORMANCE-cuda.md): correct on every test
// model, but 267-275 tok/s against 404 for the launch-per-op graph, so it is opt-in
// (ROOFTOP_PERSISTENT=1). Measured per layer (ROOFTOP_VERBOSE=1): the dependency chain
// of small serial steps costs 4-10 us per op — routing alone 4.2 us on one warp,
// staging 1.5-2 us, a unit 1-2 us — not the HBM stream; tried without effect: capping
// the bytes in flight, backing off the spinning waits, halving the code size.
//
// Per layer, six ops (each CTA takes a contiguous share of rows; `done[layer][op]`
// counts the CTAs finished with op):
//   0 QKV      rows of [q|k|v] = W · rmsnorm(h)
//   1 ATT      one CTA per q head: bias, q/k norm, rope, KV append, softmax · V over
//              the KV cache (cache chunks bulk-copied through the ring, like weights)
//   2 O        h[rows] += W_o · att
//   3 ROUTER   logits[rows] = R · rmsnorm(h) (MoE layers)
//   4 GU       act = silu(G x) * (U x) for the routed experts (+ shared / dense MLP);
//              every producer routes by itself (top-k on one warp) and then copies
//   5 DOWN     h[rows] += Σ_k w_k D_k act_k (+ shared), rows owned by one CTA: no atomics
// Activations written inside the launch are read with ld.cg (L1 is not coherent).
//
// Requires sm_90 (bulk copies, mbarrier transaction counts); compiled with -DW_SMEM=1 so
// that gemv.cu's chunk loaders read shared memory.

#ifndef NCW
#define NCW 15  // consumer warps: 16 with the producer = 4 per scheduler, 128 registers each
#endif
#define NCT (NCW * 32)      // consumer threads
#define NTH (NCT + 32)      // + the producer warp
#define MAXS 16             // ring slots (at most)
#define MAX_DROWS 256       // rows of h one CTA owns in DOWN
#define MAXM 8              // matrices per unit (DOWN: slots per unit; 3 segments each <= 32 lanes)
#define OP_QKV 0
#define OP_ATT 1
#define OP_O 2
#define OP_ROUTER 3
#define OP_GU 4
#define OP_DOWN 5


struct Step {
  const LayerDesc* layers;
  float *h, *qkv, *att, *logits, *act, *wts_out;
  int* ids_out;
  const int* pos;
  u32* done;  // [n_layers][8], zero at launch
  u64* dbg;   // null, or [n_layers][8] global-timer stamps by CTA 0 after each op
  int n_layers, hidden, max_seq, slot_bytes, nslots, stage_bytes, inflight, pad;
};

#if __CUDA_ARCH__ >= 900

// Named barrier of the consumer warps only (the producer never joins).
__device__ __forceinline__ void cbar() { asm volatile("bar.sync 1, %0;" ::"r"(NCT) : "memory"); }

// Wait until `*c >= target` (acquire, GPU scope).
__device__ __forceinline__ void wait_count(const u32* c, u32 target) {
  u32 v;
  u64 t0 = 0;
  for (int i = 0;; i++) {
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(c) : "memory");
    if (v >= target) return;
    check_stuck(i, t0);
  }
}
// Consumers: all wait for op `c` of the grid to be complete.
__device__ __forceinline__ void cwait(const u32* c) {
  if (threadIdx.x == 0) wait_count(c, gridDim.x);
  cbar();
}
// Consumers: this CTA's share of an op is written; count it.
__device__ __forceinline__ void csignal(u32* c) {
  cbar();
  // Release (cumulative over the barrier): the CTA's writes are visible to whoever
  // acquires the count.
  if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(c) : "memory");
}

__device__ __forceinline__ float cblock_sum(float v, float* red) {
  v = warp_sum(v);
  cbar();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  cbar();
  float t = 0.f;
#pragma unroll
  for (int i = 0; i < NCW; i++) t += red[i];
  return t;
}

// ---- shares and units -------------------------------------------------------------
// A unit is what one ring slot holds: rows of one or two matrices (or a chunk of one
// head's KV cache), placed as 16-byte-aligned segments (codes, scales, biases). Producer
// and consumers walk the same unit sequence with the same functions below, so they agree
// on every layout without talking.

struct Unit {
  int op, r0, nr, s0, ns;  // rows [r0, r0+nr) (expert-local); slots [s0, s0+ns)
  int head, t0, nt, first, last;
};

// Bytes one row costs in a slot (+ 32 per segment for the alignment slack).
__device__ __forceinline__ u32 row_cost(const QW& W) { return wrow_bytes(W) + srow_bytes(W) + brow_bytes(W); }
__device__ __forceinline__ int rows_fit(const QW& W, int nm, int slot) {
  const int r = (slot - nm * 96) / (nm * (int)row_cost(W));
  return r > 0 ? r : 1;
}

// Slots of the MoE step: k routed experts, then the shared expert / dense MLP.
__device__ __forceinline__ int ffn_slots(const LayerDesc& L) { return L.rt.k + (L.inter_sh > 0); }
// Matrices a unit holds (ATT: K and V).
__device__ __forceinline__ int unit_mats(const Unit& u) {
  return u.op == OP_GU || u.op == OP_ATT ? 2 : (u.op == OP_DOWN ? u.ns : 1);
}

// Segment j of unit `un`: part j % 3 (codes, scales, biases; ATT: part 0 only) of its
// matrix j / 3 — the byte range [start, start + n) of `base` (n = 0: none) — and, in W,
// that matrix (rows = the unit's rows).
__device__ __forceinline__ void unit_seg(const Step& st, const LayerDesc& L, const Unit& un, const int* ids, int j,
                                         QW& W, const unsigned char*& base, u64& start, u64& n) {
  const int m = j / 3, part = j - 3 * m;
  base = nullptr;
  start = 0;
  n = 0;
  if (m >= unit_mats(un)) return;
  if (un.op == OP_ATT) {
    if (part != 0) return;
    const int hd = L.head_dim, kvh = un.head / (L.heads / L.kv_heads);
    base = (const unsigned char*)(m == 0 ? L.kc : L.vc);
    start = ((u64)kvh * st.max_seq + un.t0) * hd * 2;
    n = (u64)un.nt * hd * 2;
    return;
  }
  int row = un.r0;
  if (un.op == OP_QKV) W = L.qkv;
  else if (un.op == OP_O) W = L.o;
  else if (un.op == OP_ROUTER) W = L.router;
  else if (un.op == OP_GU) {
    const bool routed = un.s0 < L.rt.k;
    if (routed) row = ids[un.s0] * L.inter + un.r0;
    W = routed ? (m ? L.up : L.gate) : (m ? L.su : L.sg);
  } else {
    const int s = un.s0 + m;
    const bool routed = s < L.rt.k;
    if (routed) row = ids[s] * st.hidden + un.r0;
    W = routed ? L.down : L.sd;
  }
  const u32 rb = part == 0 ? wrow_bytes(W) : (part == 1 ? srow_bytes(W) : brow_bytes(W));
  base = part == 0 ? W.w : (part == 1 ? W.s : W.b);
  start = (u64)row * rb;
  n = base ? (u64)un.nr * rb : 0;
  W.rows = un.nr;
}

// Producer warp: copy unit `un` into its slot at dst — one lane per segment, segments
// packed at 16-byte-aligned offsets (a prefix sum over the lanes), each widened to
// 16-byte alignment (inside the tensor's 16-byte blocks, so inside its allocation) —
// and write the unit's shared-memory matrix views for the consumers. One thread doing
// this serially measured ~1.8 us per unit (a chain of dependent address arithmetic).
__device__ __noinline__ void issue_unit(const Step& st, const LayerDesc& L, const Unit& un, const int* ids,
                                           unsigned char* dst, u64* full, QW* views) {
  const int lane = threadIdx.x & 31;
  QW W;
  const unsigned char* base;
  u64 start, n;
  unit_seg(st, L, un, ids, lane, W, base, start, n);
  const u64 a = (u64)base + start, lo = a & ~15ull, hi = (a + n + 15) & ~15ull;
  const u32 len = n ? (u32)(hi - lo) : 0u;
  u32 off = len;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u32 t = __shfl_up_sync(FULL_MASK, off, o);
    if (lane >= o) off += t;
  }
  const u32 total = __shfl_sync(FULL_MASK, off, 31);
  off -= len;
  const u64 local = (u64)(dst + off) + (n ? a - lo : 0);
  // Lane m assembles matrix m's view from lanes 3m, 3m+1, 3m+2.
  const int src = min(3 * lane, 29);
  QW v;
  v.w = (const unsigned char*)__shfl_sync(FULL_MASK, local, src);
  v.s = (const unsigned char*)__shfl_sync(FULL_MASK, local, src + 1);
  v.b = (const unsigned char*)__shfl_sync(FULL_MASK, local, src + 2);
  v.rows = __shfl_sync(FULL_MASK, W.rows, src);
  v.cols = __shfl_sync(FULL_MASK, W.cols, src);
  v.group = __shfl_sync(FULL_MASK, W.group, src);
  v.gmul = __shfl_sync(FULL_MASK, W.gmul, src);
  if (lane < unit_mats(un)) views[lane] = v;
  __syncwarp();
  if (lane == 0) mb_expect(full, total);  // release: the views are visible with the data
  __syncwarp();
  if (len) bulk_g2s(dst + off, (const void*)lo, len, full);
}

// The units of op `op` of layer L that this CTA owns, in order: `init`, then `next`
// until it returns false. An iterator rather than a callback so that the caller's body
// exists once in the code (the kernel is larger than the instruction cache).
struct Walk {
  int op, a, b, m, i;           // row-split ops: rows [a, b) in units of m; cursor i
  int h, t, ncache, per;        // ATT: head, position cursor, cached positions, chunk
  int k, routed, S, s;          // GU / DOWN
  __device__ __forceinline__ void init(const Step& st, const LayerDesc& L, int op_, int p) {
    op = op_;
    i = 0; a = 0; b = 0; m = 1; s = 0;
    const int slot = st.slot_bytes;
    k = L.rt.k;
    if (op == OP_QKV || op == OP_O || op == OP_ROUTER) {
      const QW& W = op == OP_QKV ? L.qkv : (op == OP_O ? L.o : L.router);
      if (op == OP_ROUTER && k == 0) return;
      share(W.rows, a, b);
      m = rows_fit(W, 1, slot);
    } else if (op == OP_ATT) {
      h = blockIdx.x;
      t = 0;
      ncache = min(p, st.max_seq);
      per = max(1, (slot - 64) / (4 * L.head_dim));
      return;
    } else if (op == OP_GU) {
      routed = k * L.inter;
      share(routed + L.inter_sh, a, b);
      m = rows_fit(k > 0 ? L.gate : L.sg, 2, slot);
    } else {
      S = ffn_slots(L);
      share(st.hidden, a, b);
      u32 rc = 0;
      if (k > 0) rc = row_cost(L.down);
      if (L.inter_sh > 0) rc = max(rc, row_cost(L.sd));
      m = max(1, min(b - a, (slot - 96) / (int)rc));     // rows per chunk
      per = min(MAXM, max(1, slot / (m * (int)rc + 96)));  // slots per unit
    }
    i = a;
  }
  __device__ __forceinline__ bool next(const LayerDesc& L, Unit& u) {
    u.op = op; u.s0 = 0; u.ns = 1; u.head = 0; u.t0 = 0; u.nt = 0; u.first = 0; u.last = 0;
    if (op == OP_ATT) {
      if (h >= L.heads) return false;
      u.head = h; u.t0 = t; u.nt = min(per, ncache - t); u.first = t == 0; u.last = t + u.nt >= ncache;
      t += u.nt;
      if (t >= ncache) { t = 0; h += gridDim.x; }
      return true;
    }
    if (i >= b) return false;
    if (op == OP_GU) {
      const bool r = i < routed;
      u.s0 = r ? i / L.inter : k;
      u.r0 = r ? i % L.inter : i - routed;
      const int left = (r ? L.inter : L.inter_sh) - u.r0;
      u.nr = min(min(m, left), b - i);
      i += u.nr;
    } else if (op == OP_DOWN) {
      u.r0 = i; u.nr = min(m, b - i); u.s0 = s; u.ns = min(per, S - s);
      s += per;
      if (s >= S) { s = 0; i += m; }
    } else {
      u.r0 = i; u.nr = min(m, b - i);
      i += u.nr;
    }
    return true;
  }
};

// Lanes per row when `nr` rows of C chunks share the consumer warps: as many as keep
// every lane busy (a unit has few rows), at most 32 and at most C.
__device__ __forceinline__ int lpr_rows(int C, int nr) {
  int l = 32;
  while (l > 1 && (l > C || l * nr > 32 * NCW * 2)) l >>= 1;
  return l;
}
// Lanes per (row, slot) in DOWN: a warp takes one row, its lanes split the unit's slots.
__device__ __forceinline__ int lpr_slots(int C, int ns) {
  int l = 32;
  while (l > 1 && (l > C || l * ns > 32)) l >>= 1;
  return l;
}

// Bytes one staged vector of `cols` takes (see stage_oct()).
__device__ __forceinline__ int vec_bytes(int cols) {
  const int C = cols / 32;
#if INT8_ACT
  return (40 * C + 15) & ~15;
#else
  return (132 * C + 15) & ~15;
#endif
}

// Stage one octet (quarter q of chunk c: values 8q..8q+7) in the layout chunk_compute
// reads: int8 (INT8_ACT: per chunk two uint4 of low/high-nibble partners and float2
// (scale, sum)) or [8][C] float4 plus per-chunk sums. The 4 octets of a chunk sit on 4
// consecutive lanes, which reduce the chunk's max/sum with shuffles; every lane of the
// warp must call this (`on` predicates the stores).
__device__ __forceinline__ void stage_oct(const float (&v)[8], float4* xs, int C, int c, int q, bool on) {
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < 8; j++) sum += v[j];
  sum += __shfl_xor_sync(FULL_MASK, sum, 1);
  sum += __shfl_xor_sync(FULL_MASK, sum, 2);
#if INT8_ACT
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 8; j++) amax = fmaxf(amax, fabsf(v[j]));
  amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, 2));
  const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
  // affine: pa = even, pb = odd values (word q of the low / high nibble partners);
  // INT8_NATURAL: pa = v[0..3], pb = v[4..7] (words 2q, 2q + 1 of the chunk's x).
  u32 pa = 0, pb = 0;
#pragma unroll
  for (int e = 0; e < 4; e++) {
    pa |= ((u32)(__float2int_rn(v[INT8_NATURAL ? e : 2 * e] * id) & 0xFF)) << (8 * e);
    pb |= ((u32)(__float2int_rn(v[INT8_NATURAL ? 4 + e : 2 * e + 1] * id) & 0xFF)) << (8 * e);
  }
  if (on) {
    uint4* xq = (uint4*)xs;
#if INT8_NATURAL
    u32* dst = (u32*)(xq + (q < 2 ? c : C + c));
    dst[(2 * q) & 3] = pa;
    dst[(2 * q + 1) & 3] = pb;
#else
    ((u32*)(xq + c))[q] = pa;
    ((u32*)(xq + C + c))[q] = pb;
#endif
    if (q == 0) ((float2*)(xq + 2 * C))[c] = make_float2(d, sum);
  }
#else
  if (on) {
    xs[(2 * q) * C + c] = make_float4(v[0] * X_PRESCALE, v[1] * X_PRESCALE, v[2] * X_PRESCALE, v[3] * X_PRESCALE);
    xs[(2 * q + 1) * C + c] = make_float4(v[4] * X_PRESCALE, v[5] * X_PRESCALE, v[6] * X_PRESCALE, v[7] * X_PRESCALE);
    if (q == 0) ((float*)(xs + 8 * C))[c] = sum * X_PRESCALE;
  }
#endif
}

__device__ __forceinline__ void load_oct(const float* x, int o, float (&v)[8]) {
  const float4 a = __ldcg((const float4*)x + 2 * o), b = __ldcg((const float4*)x + 2 * o + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// Stage RMSNorm(x) * nw (cols <= 32 * NCT) with one read of x: each thread keeps its
// octets in registers across the norm's reduction. Ends with a consumer barrier.
// Returns the norm's 1/rms.
#define NORM_OCTS 4
__device__ __noinline__ float stage_norm(const float* x, int cols, float4* xs, const float* nw, float eps, float* red) {
  const int C = cols / 32, n8 = cols / 8, tid = threadIdx.x;
  float v[NORM_OCTS][8];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < NORM_OCTS; i++) {
    const int o = tid + i * NCT;
    if (o < n8) {
      load_oct(x, o, v[i]);
#pragma unroll
      for (int j = 0; j < 8; j++) ss += v[i][j] * v[i][j];
    } else {
#pragma unroll
      for (int j = 0; j < 8; j++) v[i][j] = 0.f;
    }
  }
  const float inv = 1.f / sqrtf(cblock_sum(ss, red) / cols + eps);
#pragma unroll
  for (int i = 0; i < NORM_OCTS; i++) {
    const int o = tid + i * NCT;
    if (i * NCT >= n8) break;  // uniform
    if (o < n8) {
      const float4 a = __ldg((const float4*)nw + 2 * o), b = __ldg((const float4*)nw + 2 * o + 1);
      const float w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
      for (int j = 0; j < 8; j++) v[i][j] *= inv * w[j];
    }
    stage_oct(v[i], xs, C, o >> 2, o & 3, o < n8);
  }
  cbar();
  return inv;
}

// Stage x[0 .. k*inter + ish) as k vectors of `inter` followed by one of `ish` (none
// when 0), vector s at byte offset s * vec_bytes(inter) — the layout DOWN reads. One
// pass, one read of x. Ends with a consumer barrier.
__device__ __noinline__ void stage_vecs(const float* x, int k, int inter, int ish, float4* xs) {
  const int oi = inter / 8, na = k * oi, n8 = na + ish / 8, vb = k > 0 ? vec_bytes(inter) : 0;
  for (int base = 0; base < n8; base += NCT) {
    const int o = base + threadIdx.x;
    const bool on = o < n8;
    float v[8];
    if (on) load_oct(x, o, v);
    else {
#pragma unroll
      for (int j = 0; j < 8; j++) v[j] = 0.f;
    }
    const bool routed = o < na;
    const int s = routed ? o / oi : k, l = routed ? o % oi : o - na, cols = routed ? inter : ish;
    stage_oct(v, (float4*)((unsigned char*)xs + s * vb), cols / 32, l >> 2, l & 3, on);
  }
  cbar();
}

// y[r] (+)= W[r] · xs (+ bias[r]) for every row of a shared-memory matrix (one lane
// writes each row). Not inlined: QKV, o_proj and the router share one copy of the code
// (the kernel is larger than the instruction cache; see the header).
__device__ __noinline__ void rows_gemv(const QW W, const float4* xs, float* y, const float* bias, int add) {
  const int C = W.cols / 32, lpr = lpr_rows(C, W.rows), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane & (lpr - 1), rpw = 32 / lpr;
  const float* xsum = (const float*)(xs + 8 * C);
  for (int base = warp * rpw; base < W.rows; base += NCW * rpw) {
    const int row = base + lane / lpr;
    float acc[1] = {0.f};
    if (row < W.rows) row_dot<1>(W, row, C, sub, lpr, xs, xsum, acc);
    acc[0] = reduce_lpr(acc[0], lpr);
    if (row < W.rows && sub == 0) {
      const float v = acc[0] + (bias ? bias[row] : 0.f);
      y[row] = add ? __ldcg(y + row) + v : v;
    }
  }
}

// Shared memory of the attention op (floats): q, k, v [256 each], per-warp m, l and
// partial outputs [NCW][256].
struct AttSm {
  float q[256], k[256], v[256], m[NCW], l[NCW], o[NCW][256];
};

// Head h's q, k and v rows of qkv into sm.q/k/v: bias, q/k RMSNorm, yarn scale, rope —
// with every global read issued up front (one round trip). Consumer threads; ends with
// a consumer barrier.
__device__ __noinline__ void head_prep(const Step& st, const LayerDesc& L, int h, int p, AttSm& sm, float* red) {
  const int d = threadIdx.x, hd = L.head_dim, kvh = h / (L.heads / L.kv_heads);
  const int qo = h * hd, ko = (L.heads + kvh) * hd, vo = (L.heads + L.kv_heads + kvh) * hd;
  const float* qb = L.qkv_bias;
  float q = 0.f, k = 0.f, v = 0.f, qn = 1.f, kn = 1.f, sn = 0.f, cs = 1.f;
  const bool rot = d < L.rot;
  RopePair rp{0, d, true};
  if (d < hd) {
    q = __ldcg(st.qkv + qo + d);
    k = __ldcg(st.qkv + ko + d);
    v = __ldcg(st.qkv + vo + d);
    if (qb) { q += qb[qo + d]; k += qb[ko + d]; v += qb[vo + d]; }
    if (L.q_norm) qn = L.q_norm[d];
    if (L.k_norm) kn = L.k_norm[d];
    if (rot) {
      rp = rope_pair(d, L.rot, L.traditional);
      sincosf((float)p * L.inv_freq[rp.i], &sn, &cs);
    }
  }
  if (L.q_norm || L.k_norm) {
    float a = warp_sum(q * q), b = warp_sum(k * k);
    cbar();
    if ((d & 31) == 0) { red[d >> 5] = a; red[NCW + (d >> 5)] = b; }
    cbar();
    a = 0.f; b = 0.f;
#pragma unroll
    for (int w = 0; w < NCW; w++) { a += red[w]; b += red[NCW + w]; }
    if (L.q_norm) q *= (1.f / sqrtf(a / hd + L.qk_eps)) * qn;
    if (L.k_norm) k *= (1.f / sqrtf(b / hd + L.qk_eps)) * kn;
  }
  if (rot) { q *= L.mscale; k *= L.mscale; }
  if (d < hd) { sm.q[d] = q; sm.k[d] = k; sm.v[d] = v; }
  cbar();
  if (rot) {
    q = rope_rotate(q, sm.q[rp.partner], sn, cs, rp.first);
    k = rope_rotate(k, sm.k[rp.partner], sn, cs, rp.first);
  }
  cbar();
  if (d < hd) { sm.q[d] = q; sm.k[d] = k; }
  cbar();
}

#define HD_LANE 8  // dims per lane at most (head_dim <= 256)

// Online-softmax state of one warp over its share of positions; lane holds dims
// [lane*dpl, lane*dpl + dpl).
struct AttAcc {
  float m, l, acc[HD_LANE];
};

__device__ __forceinline__ void att_add(AttAcc& a, float s, const float (&v)[HD_LANE], int dpl) {
  const float mn = fmaxf(a.m, s), corr = expf(a.m - mn), pr = expf(s - mn);
  a.l = a.l * corr + pr;
#pragma unroll
  for (int e = 0; e < HD_LANE; e++)
    if (e < dpl) a.acc[e] = a.acc[e] * corr + pr * v[e];
  a.m = mn;
}

// Positions [0, nt) of a cache chunk in shared memory (f16 rows of hd), this warp's
// share (4 positions at a time so that the four reductions overlap).
__device__ __noinline__ void att_chunk(AttAcc& a, const AttSm& sm, const unsigned short* K,
                                          const unsigned short* V, int nt, int hd) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, dpl = hd / 32;
  float q[HD_LANE];
#pragma unroll
  for (int e = 0; e < HD_LANE; e++) q[e] = e < dpl ? sm.q[lane * dpl + e] : 0.f;
  for (int j0 = warp * 4; j0 < nt; j0 += NCW * 4) {
    float s[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int j = min(j0 + i, nt - 1);
      const unsigned short* kr = K + (size_t)j * hd + lane * dpl;
      float t = 0.f;
#pragma unroll
      for (int e = 0; e < HD_LANE; e++)
        if (e < dpl) t += q[e] * f16_to_f32(kr[e]);
      s[i] = t;
    }
#pragma unroll
    for (int i = 0; i < 4; i++) s[i] = warp_sum(s[i]);
#pragma unroll
    for (int i = 0; i < 4; i++) {
      if (j0 + i >= nt) break;
      const unsigned short* vr = V + (size_t)(j0 + i) * hd + lane * dpl;
      float v[HD_LANE];
#pragma unroll
      for (int e = 0; e < HD_LANE; e++) v[e] = e < dpl ? f16_to_f32(vr[e]) : 0.f;
      att_add(a, s[i], v, dpl);
    }
  }
}

// ROOFTOP_VERBOSE timing: dbg[layer][cta][32] global-timer stamps. Consumer thread 0,
// per op o: 4o before its wait, 4o+1 after the wait, 4o+2 after staging, 4o+3 after its
// units; producer lane 0: 24 after the router wait, 25 after routing, 26 after issuing
// the layer's last unit.
__device__ __forceinline__ void stamp(const Step& st, int li, int slot) {
  if (st.dbg) st.dbg[((size_t)li * gridDim.x + blockIdx.x) * 32 + slot] = globaltimer();
}

#endif  // __CUDA_ARCH__ >= 900

extern "C" __global__ void __launch_bounds__(NTH, 1) decode_layers(const Step st) {
#if __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) u64 full[MAXS], empty[MAXS];
  __shared__ int s_ids[64];
  __shared__ float s_wts[64];
  __shared__ float red[32];
  __shared__ float dacc[MAX_DROWS];
  // The current layer's descriptor, one copy for the producer (which runs ahead) and
  // one for the consumers: read from global memory every field access would be an L2
  // round trip (L1 is ~28 KB beside this much shared memory).
  __shared__ __align__(16) LayerDesc pdesc, cdesc;
  // Per slot, the shared-memory views of the matrices of the unit it holds.
  __shared__ QW sview[MAXS][MAXM];
  const int NS = st.nslots, SB = st.slot_bytes, H = st.hidden;
  unsigned char* ring = smem;
  float4* xs = (float4*)(smem + (size_t)NS * SB);
  AttSm& asm_ = *(AttSm*)xs;  // attention scratch shares the staging area (host sizes it)
  if (threadIdx.x == 0) {
    for (int i = 0; i < NS; i++) { mb_init(&full[i], 1); mb_init(&empty[i], NCW); }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  pdl_wait();
  pdl_trigger();
  const int p = __ldcg(st.pos);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  if (warp == NCW) {
    // ---- producer ----
    // Unit u lives in slot `slot` (= u % NS) and is that slot's round with parity `ph`;
    // tracked incrementally (a division by the runtime NS costs ~20 instructions).
    u32 u = 0, ph = 0;
    int slot = 0;
    auto issue = [&](const Unit& un) {
      if (u >= (u32)NS) mb_wait(&empty[slot], ph ^ 1);
      // Keep at most st.inflight units in flight: bytes queued beyond what covers HBM
      // latency only delay the dependent accesses on the critical path.
      if (u >= (u32)st.inflight) {
        int ts = slot - st.inflight;
        u32 tp = ph;
        if (ts < 0) { ts += NS; tp ^= 1; }
        mb_wait(&full[ts], tp);
      }
      issue_unit(st, pdesc, un, s_ids, ring + (size_t)slot * SB, &full[slot], sview[slot]);
      __syncwarp();
      u++;
      if (++slot == NS) { slot = 0; ph ^= 1; }
    };
    for (int li = 0; li < st.n_layers; li++) {
      __syncwarp();
      for (int i = lane; i < (int)(sizeof(LayerDesc) / 4); i += 32)
        ((u32*)&pdesc)[i] = ((const u32*)(st.layers + li))[i];
      __syncwarp();
      const LayerDesc& L = pdesc;
#pragma unroll 1
      for (int op = OP_QKV; op <= OP_DOWN; op++) {
        if (op == OP_GU && L.rt.k > 0) {
          if (lane == 0) {
            wait_count(st.done + li * 8 + OP_ROUTER, gridDim.x);
            stamp(st, li, 24);
          }
          __syncwarp();
          route(st.logits, L.rt, s_ids, s_wts,
                st.dbg ? st.dbg + ((size_t)li * gridDim.x + blockIdx.x) * 32 + 27 : nullptr);
          __syncwarp();
          if (lane == 0) stamp(st, li, 25);
          if (blockIdx.x == 0 && lane < L.rt.k) {
            st.ids_out[lane] = s_ids[lane];
            st.wts_out[lane] = s_wts[lane];
          }
        }
        Walk w;
        w.init(st, L, op, p);
        Unit un;
        while (w.next(L, un)) issue(un);
      }
      if (lane == 0) stamp(st, li, 26);
    }
    return;
  }

  // ---- consumers ----
  u32 ph = 0;
  int slot = 0;
  const bool t0 = threadIdx.x == 0;
  for (int li = 0; li < st.n_layers; li++) {
    cbar();  // everyone is done with the previous layer's descriptor
    for (int i = threadIdx.x; i < (int)(sizeof(LayerDesc) / 4); i += NCT)
      ((u32*)&cdesc)[i] = ((const u32*)(st.layers + li))[i];
    cbar();
    const LayerDesc& L = cdesc;
    u32* done = st.done + li * 8;
    const int k = L.rt.k, hd = L.head_dim, group = L.heads / L.kv_heads, dpl = hd / 32;
    int da, db;  // rows of h this CTA owns in DOWN
    share(H, da, db);
    AttAcc acc;
#pragma unroll 1
    for (int op = OP_QKV; op <= OP_DOWN; op++) {
      // Wait for the op's input, stage it.
      if (t0) stamp(st, li, 4 * op);
      if (op == OP_QKV) { if (li > 0) cwait(st.done + (li - 1) * 8 + OP_DOWN); }
      else if (op != OP_GU) cwait(done + op - 1);
      if (t0) stamp(st, li, 4 * op + 1);
      float inv = 1.f;  // the router's: it reads h itself, in f32 (rows_exact)
      if (op == OP_QKV || op == OP_ROUTER) inv = stage_norm(st.h, H, xs, op == OP_QKV ? L.attn_norm : L.ffn_norm, L.eps, red);
      else if (op == OP_O) stage_vecs(st.att, 1, L.o.cols, 0, xs);
      else if (op == OP_DOWN) {
        for (int i = threadIdx.x; i < db - da; i += NCT) dacc[i] = 0.f;
        stage_vecs(st.act, k, L.inter, L.inter_sh, xs);
      }
      if (t0) stamp(st, li, 4 * op + 2);
      Walk wk;
      wk.init(st, L, op, p);
      Unit un;
      while (wk.next(L, un)) {
        if (op == OP_ATT && un.first) {
          const int h = un.head, kvh = h / group, d = threadIdx.x;
          head_prep(st, L, h, p, asm_, red);
          if (d < hd) {
            const unsigned short kh = f32_to_f16(asm_.k[d]), vh = f32_to_f16(asm_.v[d]);
            if (h % group == 0 && p < st.max_seq) {
              const size_t o = ((size_t)kvh * st.max_seq + p) * hd + d;
              L.kc[o] = kh;
              L.vc[o] = vh;
            }
            asm_.k[d] = f16_to_f32(kh);
            asm_.v[d] = f16_to_f32(vh);
            asm_.q[d] *= L.scale;
          }
          cbar();
          acc.m = -INFINITY;
          acc.l = 0.f;
#pragma unroll
          for (int e = 0; e < HD_LANE; e++) acc.acc[e] = 0.f;
        }
        mb_wait(&full[slot], ph);
        const QW* vw = sview[slot];
        if (op == OP_QKV) rows_gemv(vw[0], xs, st.qkv + un.r0, nullptr, 0);
        else if (op == OP_O) rows_gemv(vw[0], xs, st.h + un.r0, L.o_bias ? L.o_bias + un.r0 : nullptr, 1);
        else if (op == OP_ROUTER)
          rows_exact(vw[0], lpr_rows(vw[0].cols / 32, vw[0].rows), warp, NCW, st.h, L.ffn_norm, inv, st.logits + un.r0);
        else if (op == OP_ATT) att_chunk(acc, asm_, (const unsigned short*)vw[0].w, (const unsigned short*)vw[1].w, un.nt, hd);
        else if (op == OP_GU) {
          const int C = H / 32, lpr = lpr_rows(C, un.nr), sub = lane & (lpr - 1), rpw = 32 / lpr;
          const float* xsum = (const float*)(xs + 8 * C);
          float* y = st.act + (un.s0 < k ? un.s0 * L.inter : k * L.inter) + un.r0;
          const QW G = vw[0], U = vw[1];
          for (int base = warp * rpw; base < un.nr; base += NCW * rpw) {
            const int row = base + lane / lpr;
            float g[1] = {0.f}, v[1] = {0.f};
            if (row < un.nr) row_dot2(G, row, U, row, C, sub, lpr, xs, xsum, g, v);
            g[0] = reduce_lpr(g[0], lpr);
            v[0] = reduce_lpr(v[0], lpr);
            if (row < un.nr && sub == 0) y[row] = silu(g[0]) * v[0];
          }
        } else {
          // DOWN. Warp w owns rows w, w + NCW, ... of the chunk (the same rows in every
          // unit of the chunk, so dacc needs no atomics); lane groups split the slots.
          const int vb = k > 0 ? vec_bytes(L.inter) : 0;
          for (int r = warp; r < un.nr; r += NCW) {
            float sum = 0.f;
            for (int s = un.s0; s < un.s0 + un.ns; s++) {
              const QW W = vw[s - un.s0];
              const int C = W.cols / 32, lpr = lpr_slots(C, un.ns), groups = 32 / lpr;
              if ((s - un.s0) % groups != lane / lpr) continue;
              const float4* xv = (const float4*)((const unsigned char*)xs + s * vb);
              float d1[1] = {0.f};
              row_dot<1>(W, r, C, lane & (lpr - 1), lpr, xv, (const float*)(xv + 8 * C), d1);
              sum += (s < k ? s_wts[s] : 1.f) * d1[0];
            }
            sum = warp_sum(sum);
            if (lane == 0) dacc[un.r0 - da + r] += sum;
          }
        }
        __syncwarp();
        if (lane == 0) mb_arrive(&empty[slot]);
        if (++slot == NS) { slot = 0; ph ^= 1; }
        if (op == OP_ATT && un.last) {
          if (warp == 0) {  // the current position, from shared memory
            float t = 0.f, v[HD_LANE];
#pragma unroll
            for (int e = 0; e < HD_LANE; e++) {
              if (e < dpl) t += asm_.q[lane * dpl + e] * asm_.k[lane * dpl + e];
              v[e] = e < dpl ? asm_.v[lane * dpl + e] : 0.f;
            }
            att_add(acc, warp_sum(t), v, dpl);
          }
          if (lane == 0) { asm_.m[warp] = acc.m; asm_.l[warp] = acc.l; }
#pragma unroll
          for (int e = 0; e < HD_LANE; e++)
            if (e < dpl) asm_.o[warp][lane * dpl + e] = acc.acc[e];
          cbar();
          const int d = threadIdx.x;
          if (d < hd) {
            float M = -INFINITY;
            for (int w = 0; w < NCW; w++) M = fmaxf(M, asm_.m[w]);
            float l = 0.f, o = 0.f;
            for (int w = 0; w < NCW; w++) {
              const float c = asm_.m[w] == -INFINITY ? 0.f : expf(asm_.m[w] - M);
              l += asm_.l[w] * c;
              o += asm_.o[w][d] * c;
            }
            st.att[un.head * hd + d] = o / l;
          }
          cbar();
        }
      }
      if (op == OP_DOWN) {
        cbar();
        for (int i = threadIdx.x; i < db - da; i += NCT) st.h[da + i] = __ldcg(st.h + da + i) + dacc[i];
      }
      if (t0) stamp(st, li, 4 * op + 3);
      csignal(done + op);
    }
  }
#endif
}
