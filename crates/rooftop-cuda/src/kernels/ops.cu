// The decode ops around the MoE: RMSNorm, RoPE, KV-cache append, split-K decode
// attention (flash-decoding), plus the bandwidth probe and benchmark fills.
// Positions are read from device memory so that a captured CUDA graph replays each
// token without host writes into kernel arguments.

// 1 / sqrt(mean(xr[0..d)^2) + eps) over the block (every thread gets it).
__device__ __forceinline__ float row_inv_rms(const float* xr, int d, float eps) {
  __shared__ float red[32];
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
    v = warp_sum(v);
    if (threadIdx.x == 0) red[0] = v;
  }
  __syncthreads();
  return 1.f / sqrtf(red[0] / d + eps);
}

// y[row] = x[row] * rsqrt(mean(x[row]^2) + eps) * w. Grid: rows; block: 256.
extern "C" __global__ void __launch_bounds__(256)
rmsnorm(const float* x, const float* w, float* y, int d, float eps) {
  pdl_wait();
  pdl_trigger();
  const float* xr = x + (size_t)blockIdx.x * d;
  const float inv = row_inv_rms(xr, d, eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) y[(size_t)blockIdx.x * d + i] = xr[i] * inv * w[i];
}

// In-place rotary embedding of x[heads, head_dim] at position *pos. Angles in double:
// at position 30k an f32 angle is off by ~2e-3 rad. traditional=1 rotates pairs
// (2i, 2i+1) (DeepSeek-V3); 0 rotates (i, i + rot_dim/2) (Qwen, GLM: rotate_half).
// Grid: heads; block: >= rot_dim/2.
extern "C" __global__ void rope(float* x, const int* pos, int head_dim, int rot_dim, float theta,
                                int traditional) {
  pdl_wait();
  pdl_trigger();
  const int i = threadIdx.x, half = rot_dim / 2;
  if (i >= half) return;
  const double a = (double)(*pos) * pow((double)theta, -2.0 * i / rot_dim);
  double sn, cs;
  sincos(a, &sn, &cs);
  float* xh = x + (size_t)blockIdx.x * head_dim;
  const int i1 = traditional ? 2 * i : i, i2 = traditional ? 2 * i + 1 : i + half;
  const float x1 = xh[i1], x2 = xh[i2];
  xh[i1] = (float)(x1 * cs - x2 * sn);
  xh[i2] = (float)(x1 * sn + x2 * cs);
}

// cache[kvh, *pos, :] = f16(k[kvh, :]) (same for v). Caches: [n_kv, max_seq, head_dim] f16.
// Grid: n_kv; block: head_dim. Writes nothing when *pos >= max_seq.
extern "C" __global__ void kv_append(const float* k, const float* v, unsigned short* kc,
                                     unsigned short* vc, const int* pos, int head_dim, int max_seq) {
  pdl_wait();
  pdl_trigger();
  const int p = *pos, d = threadIdx.x;
  if (p < 0 || p >= max_seq || d >= head_dim) return;
  const size_t o = ((size_t)blockIdx.x * max_seq + p) * head_dim + d;
  kc[o] = f32_to_f16(k[blockIdx.x * head_dim + d]);
  vc[o] = f32_to_f16(v[blockIdx.x * head_dim + d]);
}

// ---- Per-head post-processing of the QKV projection ---------------------------------
// sin and cos of the f32 angle `a` without sincosf's slow path (a Payne-Hanek reduction
// with a local stack frame, which can cost registers and spills where it is inlined):
// a / pi and its reduction to [-1, 1] in double (exact), then sincospif. Error ~2e-7 rad
// whatever the angle.
__device__ __forceinline__ void rope_sincos(float a, float& sn, float& cs) {
  const double t = (double)a * 0.31830988618379067154;
  sincospif((float)(t - 2.0 * rint(0.5 * t)), &sn, &cs);
}
#define HD_MAX 256  // head_dim at most (checked by the host)
// Bias, q/k RMSNorm, RoPE and the KV-cache append (qkv_post, or folded into the
// decode attention: attn_decode).
struct QkvPost {
  const float* bias;   // [(H + 2 KV) hd] or null
  const float* qn;     // [hd] or null
  const float* kn;     // [hd] or null
  const float* inv_freq;
  float eps, mscale;
  int rot, traditional, n_heads, n_kv, head_dim, max_seq;
};
// Unit b of one token's raw QKV output (qkv = [q (H·hd) | k (KV·hd) | v (KV·hd)]) at
// position p, by the whole CTA (every thread calls it: barriers inside; blockDim >= 32):
// b < H: q head b gets its bias, RMSNorm (qn), mscale and RoPE in place; b = H + j: k
// head j the same with kn, then k and v (+ bias) go to the f16 caches at p (nothing when
// p is outside [0, max_seq)). inv_freq[rot/2] holds each rotated pair's angular
// frequency (rope scaling folded in); angle = f32(p) * inv_freq, as the CPU computes it.
__device__ __forceinline__ void post_unit(float* qkv, int b, int p, unsigned short* kc, unsigned short* vc,
                                       const QkvPost& a) {
  __shared__ float xs[HD_MAX];
  __shared__ float red[32];
  constexpr int MAXJ = HD_MAX / 32;
  const int hd = a.head_dim, nt = blockDim.x, t = threadIdx.x;
  const bool is_q = b < a.n_heads;
  float* row = qkv + (size_t)b * hd;  // k heads follow the q heads directly
  float x[MAXJ];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < MAXJ; j++) {
    const int d = t + j * nt;
    x[j] = 0.f;
    if (d < hd) {
      x[j] = row[d] + (a.bias ? a.bias[b * hd + d] : 0.f);
      ss += x[j] * x[j];
    }
  }
  const float* nw = is_q ? a.qn : a.kn;
  if (nw) {
    ss = warp_sum(ss);
    if ((t & 31) == 0) red[t >> 5] = ss;
    __syncthreads();
    float tot = 0.f;
    for (int w = 0; w < (nt + 31) >> 5; w++) tot += red[w];
    const float inv = 1.f / sqrtf(tot / hd + a.eps);
#pragma unroll
    for (int j = 0; j < MAXJ; j++) {
      const int d = t + j * nt;
      if (d < hd) x[j] = x[j] * inv * nw[d];
    }
  }
#pragma unroll
  for (int j = 0; j < MAXJ; j++) {
    const int d = t + j * nt;
    if (d < a.rot) x[j] *= a.mscale;
    if (d < hd) xs[d] = x[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < MAXJ; j++) {
    const int d = t + j * nt;
    if (d < a.rot) {
      const RopePair rp = rope_pair(d, a.rot, a.traditional);
      float sn, cs;
      rope_sincos((float)p * a.inv_freq[rp.i], sn, cs);
      x[j] = rope_rotate(x[j], xs[rp.partner], sn, cs, rp.first);
    }
  }
  __syncthreads();  // xs and red are reused by the next call
  const int kvh = b - a.n_heads;
  const bool cache = !is_q && p >= 0 && p < a.max_seq;
#pragma unroll
  for (int j = 0; j < MAXJ; j++) {
    const int d = t + j * nt;
    if (d >= hd) continue;
    if (is_q) {
      row[d] = x[j];
    } else if (cache) {
      const size_t o = ((size_t)kvh * a.max_seq + p) * hd + d;
      kc[o] = f32_to_f16(x[j]);
      const int vi = (a.n_heads + a.n_kv + kvh) * hd + d;
      vc[o] = f32_to_f16(qkv[vi] + (a.bias ? a.bias[vi] : 0.f));
    }
  }
}

// Called by every thread of a split's CTA once its partial is written: the head's last
// split to arrive (arrival counter *cnt) merges all of them into out[0..head_dim) and
// resets the counter for the next launch — one kernel boundary per layer less than an
// attn_combine launch. Release: the CTA barrier, then one thread's gpu-scope fence
// before its arrival (as cooperative groups' grid sync); acquire: a fence after it.
__device__ __forceinline__ void merge_if_last(const float* ph, unsigned* cnt, float* out, int splits, int head_dim) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(cnt, 1u) == (unsigned)(splits - 1);
    if (last) *cnt = 0u;  // every split has arrived: nobody else touches it this launch
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) out[d] = merge_dim(ph, splits, head_dim, d);
}
// Split-K decode attention, part 1. Grid: (heads, splits); block: 128 (4 warps).
// Each split covers a contiguous range of the *pos+1 cached positions; each warp an
// interleaved subset, ATT_PB positions at a time: all their K/V loads are issued before
// any is used (one memory latency per batch instead of one per position), and the first
// batch's cached positions (< *pos, written by earlier steps) are loaded before
// griddepcontrol.wait, while the QKV launch still runs. Lane l holds dims [l*ND, l*ND+ND)
// (ND = head_dim / 32). Online softmax per batch. Writes part[h][split] = (o[hd], m, l);
// with arrival counters the last split of each head merges them (merge_if_last).
#define ATT_WARPS 4
#define ATT_PB 8
template <int ND>
__device__ __forceinline__ void ld_f16s(const unsigned short* p, float (&f)[ND]) {
  if (ND % 4 == 0) {
#pragma unroll
    for (int j = 0; j < ND; j += 4) {
      const uint2 u = __ldcg((const uint2*)(p + j));
      f[j] = f16_to_f32(u.x & 0xFFFF); f[j + 1] = f16_to_f32(u.x >> 16);
      f[j + 2] = f16_to_f32(u.y & 0xFFFF); f[j + 3] = f16_to_f32(u.y >> 16);
    }
  } else if (ND % 2 == 0) {
#pragma unroll
    for (int j = 0; j < ND; j += 2) {
      const u32 u = __ldcg((const u32*)(p + j));
      f[j] = f16_to_f32(u & 0xFFFF); f[j + 1] = f16_to_f32(u >> 16);
    }
  } else {
#pragma unroll
    for (int j = 0; j < ND; j++) f[j] = f16_to_f32(__ldcg(p + j));
  }
}
// attn_decode's qkv_post for one head held by a warp (lane l: dims l*ND + j): + bias,
// RMSNorm (nw), mscale and RoPE (sn/cs of the lane's dims, computed before the wait);
// sxw: the warp's head_dim floats of shared memory for the rotation partners. Same
// arithmetic as qkv_post but the norm's sum in another order.
template <int ND>
__device__ __forceinline__ void head_post(float (&x)[ND], const float (&bias)[ND], const float* nw, const QkvPost& a,
                                          const float (&sn)[ND], const float (&cs)[ND], float* sxw) {
  const int lane = threadIdx.x & 31, hd = ND * 32;
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < ND; j++) {
    x[j] += bias[j];
    ss += x[j] * x[j];
  }
  if (nw) {
    const float inv = 1.f / sqrtf(warp_sum(ss) / hd + a.eps);
#pragma unroll
    for (int j = 0; j < ND; j++) x[j] = x[j] * inv * __ldg(nw + lane * ND + j);
  }
#pragma unroll
  for (int j = 0; j < ND; j++) {
    if (lane * ND + j < a.rot) x[j] *= a.mscale;
    sxw[lane * ND + j] = x[j];
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < ND; j++) {
    const int d = lane * ND + j;
    if (d < a.rot) {
      const RopePair rp = rope_pair(d, a.rot, a.traditional);
      x[j] = rope_rotate(x[j], sxw[rp.partner], sn[j], cs[j], rp.first);
    }
  }
  __syncwarp();
}

// FUSED (attn_decode, decode only): the raw QKV output is post-processed here instead of
// by a qkv_post launch. Every warp normalizes and rotates q itself; the split holding the
// new position also computes its k and v (rounded through f16, as a cached position)
// instead of reading the cache, and its first q-head of each kv group appends them.
template <bool TOKENS, int ND, bool FUSED>
__device__ __forceinline__ void attn_partial_body(const float* q, const unsigned short* kc, const unsigned short* vc,
                                                  const int* pos, float* part, int n_heads, int n_kv, int max_seq,
                                                  float scale, float* sm_m, float* sm_l, float (*sm_o)[HD_MAX],
                                                  float (*sm_new)[2 * HD_MAX], const QkvPost* post, unsigned* cnt,
                                                  float* merged) {
  // Positions per batch: K and V of a batch take 2 * PB * ND registers per lane.
  constexpr int PB = ND <= 4 ? ATT_PB : ATT_PB / 2;
  const int head_dim = ND * 32;
  const int h = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Token blockIdx.z of a prefill chunk (attn_partial_n) sees positions <= *pos + token.
  // *pos was written by an earlier step or chunk (complete before this launch began);
  // positions >= *pos are written by this step's qkv_post.
  const int tok = TOKENS ? (int)blockIdx.z : 0;
  const int p0 = __ldcg(pos);
  const int len = min(p0 + tok + 1, max_seq);
  const int per = (len + splits - 1) / splits;
  const int start = split * per, end = min(len, start + per);
  const int kvh = h / (n_heads / n_kv);
  const unsigned short* kb = kc + (size_t)kvh * max_seq * head_dim + lane * ND;
  const unsigned short* vb = vc + (size_t)kvh * max_seq * head_dim + lane * ND;
  float kf[PB][ND], vf[PB][ND];
  int p = start + warp;
#pragma unroll
  for (int i = 0; i < PB; i++) {
    const int pi = p + i * ATT_WARPS;
    if (pi < end && pi < p0) {
      ld_f16s<ND>(kb + (size_t)pi * head_dim, kf[i]);
      ld_f16s<ND>(vb + (size_t)pi * head_dim, vf[i]);
    }
  }
  // FUSED: rotation angles and q's bias for this lane's dims (weights and *pos only).
  float sn[ND], cs[ND], bq[ND];
  const bool has_new = FUSED && start <= p0 && p0 < end;
  if (FUSED) {
#pragma unroll
    for (int j = 0; j < ND; j++) {
      const int d = lane * ND + j;
      sn[j] = 0.f; cs[j] = 1.f;
      if (d < post->rot) sincosf((float)p0 * post->inv_freq[rope_pair(d, post->rot, post->traditional).i], &sn[j], &cs[j]);
      bq[j] = post->bias ? post->bias[h * head_dim + d] : 0.f;
    }
  }
  pdl_wait();
  pdl_trigger();
  q += (size_t)tok * (n_heads + 2 * n_kv) * head_dim;
  part += (size_t)tok * n_heads * splits * (head_dim + 2);
  float qr[ND], o[ND];
#pragma unroll
  for (int j = 0; j < ND; j++) {
    qr[j] = __ldcg(q + h * head_dim + lane * ND + j);
    o[j] = 0.f;
  }
  if (FUSED) {
    float* sxw = sm_o[warp];  // free until the partials are written
    head_post<ND>(qr, bq, post->qn, *post, sn, cs, sxw);
    if (has_new) {
      const int base_k = (n_heads + kvh) * head_dim + lane * ND, base_v = base_k + n_kv * head_dim;
      float kx[ND], vx[ND], bk[ND];
#pragma unroll
      for (int j = 0; j < ND; j++) {
        bk[j] = post->bias ? post->bias[base_k + j] : 0.f;
        kx[j] = __ldcg(q + base_k + j);
        vx[j] = __ldcg(q + base_v + j) + (post->bias ? post->bias[base_v + j] : 0.f);
      }
      head_post<ND>(kx, bk, post->kn, *post, sn, cs, sxw);
      const bool append = h % (n_heads / n_kv) == 0 && warp == 0;
#pragma unroll
      for (int j = 0; j < ND; j++) {
        const unsigned short k16 = f32_to_f16(kx[j]), v16 = f32_to_f16(vx[j]);
        // Kept in the warp's shared row, not registers: the batch loop needs them once.
        sm_new[warp][lane * ND + j] = f16_to_f32(k16);
        sm_new[warp][head_dim + lane * ND + j] = f16_to_f32(v16);
        if (append) {
          const size_t o16 = ((size_t)kvh * max_seq + p0) * head_dim + lane * ND + j;
          ((unsigned short*)kc)[o16] = k16;
          ((unsigned short*)vc)[o16] = v16;
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < ND; j++) qr[j] *= scale;
  // Positions >= *pos (this step's) after the wait.
#pragma unroll
  for (int i = 0; i < PB; i++) {
    const int pi = p + i * ATT_WARPS;
    if (pi < end && pi >= p0) {
      ld_f16s<ND>(kb + (size_t)pi * head_dim, kf[i]);
      ld_f16s<ND>(vb + (size_t)pi * head_dim, vf[i]);
    }
  }
  float m = -INFINITY, l = 0.f;
  while (p < end) {
    // FUSED: the new position's k/v replace what was read from its (not yet or just
    // written) cache slot, once all of the batch's loads are in flight. (Choosing per
    // position between the shared row and a load measured 1.8x slower at a 4096-token
    // context; suspected: loads held behind branch joins.)
    if (FUSED && has_new && p0 >= p && (p0 - p) % ATT_WARPS == 0 && (p0 - p) / ATT_WARPS < PB) {
      const int i0 = (p0 - p) / ATT_WARPS;
#pragma unroll
      for (int i = 0; i < PB; i++) {
        if (i == i0) {
#pragma unroll
          for (int j = 0; j < ND; j++) {
            kf[i][j] = sm_new[warp][lane * ND + j];
            vf[i][j] = sm_new[warp][head_dim + lane * ND + j];
          }
        }
      }
    }
    float sc[PB];
#pragma unroll
    for (int i = 0; i < PB; i++) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < ND; j++) s += qr[j] * kf[i][j];
      sc[i] = s;
    }
#pragma unroll
    for (int i = 0; i < PB; i++) sc[i] = warp_sum(sc[i]);
    float mb = m;
#pragma unroll
    for (int i = 0; i < PB; i++)
      if (p + i * ATT_WARPS < end) mb = fmaxf(mb, sc[i]);
    const float corr = expf(m - mb);  // m = -inf on the first batch: 0
    l *= corr;
#pragma unroll
    for (int j = 0; j < ND; j++) o[j] *= corr;
#pragma unroll
    for (int i = 0; i < PB; i++) {
      if (p + i * ATT_WARPS < end) {
        const float pw = expf(sc[i] - mb);
        l += pw;
#pragma unroll
        for (int j = 0; j < ND; j++) o[j] = fmaf(pw, vf[i][j], o[j]);
      }
    }
    m = mb;
    p += PB * ATT_WARPS;
#pragma unroll
    for (int i = 0; i < PB; i++) {
      const int pi = p + i * ATT_WARPS;
      if (pi < end) {
        ld_f16s<ND>(kb + (size_t)pi * head_dim, kf[i]);
        ld_f16s<ND>(vb + (size_t)pi * head_dim, vf[i]);
      }
    }
  }
  if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
#pragma unroll
  for (int j = 0; j < ND; j++) sm_o[warp][lane * ND + j] = o[j];
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm_m[w]);
  float* out = part + ((size_t)h * splits + split) * (head_dim + 2);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    if (M != -INFINITY)
      for (int w = 0; w < ATT_WARPS; w++) acc += expf(sm_m[w] - M) * sm_o[w][d];
    out[d] = acc;
  }
  if (threadIdx.x == 0) {
    float L = 0.f;
    if (M != -INFINITY)
      for (int w = 0; w < ATT_WARPS; w++) L += expf(sm_m[w] - M) * sm_l[w];
    out[head_dim] = M;
    out[head_dim + 1] = L;
  }
  if (cnt) merge_if_last(part + (size_t)h * splits * (head_dim + 2), cnt + h, merged + h * head_dim, splits, head_dim);
}
// One instantiation per head_dim / 32 (head_dim % 32 == 0, <= HD_MAX: checked by the host).
template <bool TOKENS, bool FUSED = false>
__device__ __forceinline__ void attn_partial_any(const float* q, const unsigned short* kc, const unsigned short* vc,
                                                 const int* pos, float* part, int n_heads, int n_kv, int head_dim,
                                                 int max_seq, float scale, const QkvPost* post, unsigned* cnt,
                                                 float* merged) {
  // Declared here, not in the per-ND bodies (each would get its own copy).
  __shared__ float sm_m[ATT_WARPS], sm_l[ATT_WARPS], sm_o[ATT_WARPS][HD_MAX];
  // FUSED: each warp's copy of the new position's k and v.
  __shared__ float sm_new[FUSED ? ATT_WARPS : 1][2 * HD_MAX];
  switch (head_dim / 32) {
#define ATT_CASE(N)                                                                                    \
  case N:                                                                                              \
    attn_partial_body<TOKENS, N, FUSED>(q, kc, vc, pos, part, n_heads, n_kv, max_seq, scale, sm_m, sm_l, \
                                        sm_o, sm_new, post, cnt, merged);                              \
    break;
    ATT_CASE(1) ATT_CASE(2) ATT_CASE(3) ATT_CASE(4) ATT_CASE(5) ATT_CASE(6) ATT_CASE(7) ATT_CASE(8)
#undef ATT_CASE
  }
}
// Decode (one token): cnt (n_heads arrival counters, zero before the launch and left
// zero) non-null: each head's last split to finish merges the splits into
// merged[h * head_dim ..] itself (merge_if_last), so no attn_combine launch follows;
// null: the partials are left for attn_combine.
extern "C" __global__ void __launch_bounds__(128)
attn_partial(const float* q, const unsigned short* kc, const unsigned short* vc, const int* pos,
             float* part, int n_heads, int n_kv, int head_dim, int max_seq, float scale, unsigned* cnt,
             float* merged) {
  attn_partial_any<false>(q, kc, vc, pos, part, n_heads, n_kv, head_dim, max_seq, scale, nullptr, cnt, merged);
}
extern "C" __global__ void __launch_bounds__(128)
attn_partial_n(const float* q, const unsigned short* kc, const unsigned short* vc, const int* pos,
               float* part, int n_heads, int n_kv, int head_dim, int max_seq, float scale) {
  attn_partial_any<true>(q, kc, vc, pos, part, n_heads, n_kv, head_dim, max_seq, scale, nullptr, nullptr,
                         nullptr);
}

// qkv_post and attn_partial in one launch (decode): q/k/v straight from the QKV GEMV.
extern "C" __global__ void __launch_bounds__(128)
attn_decode(const float* qkv, unsigned short* kc, unsigned short* vc, const int* pos, float* part, const QkvPost a,
            float scale, unsigned* cnt, float* merged) {
  attn_partial_any<false, true>(qkv, kc, vc, pos, part, a.n_heads, a.n_kv, a.head_dim, a.max_seq, scale, &a, cnt,
                                merged);
}

// Decode attention for long contexts: one CTA per (kv head, split) for the whole q-head
// group (G = n_heads / n_kv warps; warp w: q head kvh * G + w). Each tile of ATG_TP
// cached positions is copied once into shared memory (cp.async, double-buffered: the
// next tile's copies fly while this one is used) and read there by all G heads —
// attn_partial reads K/V once per q head, G times the L2 traffic (8x for qwen3's
// groups). Per tile, lane j scores position j of the tile for its warp's head, then every
// lane accumulates its ND dims of o over the tile's positions. Writes the same partials
// as attn_partial; the group's last split merges them for all G heads. head_dim <= 128,
// G <= 8 (host-checked; 512 threads capped ptxas at 40 registers with spills). Dynamic smem: 2 buffers x (K, V) x ATG_TP rows of ATG_RS
// bytes, then G * head_dim floats of scaled q.
#define ATG_TP 32
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((u32)__cvta_generic_to_shared(dst)), "l"(src)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
// One warp merges head h's splits (partials ph[split] = (o[hd], m, l)) into out[0..hd):
// the split weights once per warp (lane s holds splits s, s + 32, ...), kept in ws.
__device__ __forceinline__ void merge_head_warp(const float* ph, int splits, int hd, float* out, float* ws) {
  const int lane = threadIdx.x & 31;
  float M = -INFINITY;
  for (int s = lane; s < splits; s += 32) M = fmaxf(M, __ldcg(ph + s * (hd + 2) + hd));
  M = warp_max(M);
  float L = 0.f;
  for (int s = lane; s < splits; s += 32) {
    const float ms = __ldcg(ph + s * (hd + 2) + hd);
    const float e = ms == -INFINITY ? 0.f : expf(ms - M);
    ws[s] = e;
    L += e * __ldcg(ph + s * (hd + 2) + hd + 1);
  }
  L = warp_sum(L);
  __syncwarp();
  for (int d = lane; d < hd; d += 32) {
    float acc = 0.f;
#pragma unroll 8
    for (int s = 0; s < splits; s++) acc += ws[s] * __ldcg(ph + s * (hd + 2) + d);
    out[d] = acc / L;
  }
}
#define ATG_MAX_SPLITS 64
// attn_group's tile at t0 into buffer b: K rows then V rows, 16 bytes per copy, rows
// past `end` skipped; one cp.async group.
template <int RU, int RS, int TU>
__device__ __forceinline__ void atg_issue(unsigned char* sm, const uint4* kg, const uint4* vg, int t0, int end, int b,
                                          int nt) {
  for (int i = threadIdx.x; i < 2 * TU; i += nt) {
    const int v = i >= TU, r = (i - v * TU) / RU, c = (i - v * TU) % RU;
    if (t0 + r < end)
      cp_async16(sm + ((2 * b + v) * ATG_TP + r) * RS + c * 16, (v ? vg : kg) + (size_t)(t0 + r) * RU + c);
  }
  cp_async_commit();
}
template <int ND>
__device__ __forceinline__ void attn_group_body(const float* q, const unsigned short* kc, const unsigned short* vc,
                                                const int* pos, float* part, int n_heads, int n_kv, int max_seq,
                                                float scale, unsigned* cnt, float* merged,
                                                float (*ws)[ATG_MAX_SPLITS], int& last) {
  constexpr int HD = ND * 32, RU = HD / 8, RS = HD * 2 + 16, TU = ATG_TP * RU;
  extern __shared__ float4 smem4[];
  unsigned char* sm = (unsigned char*)smem4;
  float* qs = (float*)(sm + 4 * ATG_TP * RS);
  const int kvh = blockIdx.x, split = blockIdx.y, splits = gridDim.y, G = n_heads / n_kv;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, h = kvh * G + warp, nt = blockDim.x;
  pdl_wait();
  pdl_trigger();
  const int p0 = __ldcg(pos);
  const int len = min(p0 + 1, max_seq);
  const int per = (len + splits - 1) / splits;
  const int start = min(len, split * per), end = min(len, start + per);
  const uint4* kg = (const uint4*)(kc + (size_t)kvh * max_seq * HD);
  const uint4* vg = (const uint4*)(vc + (size_t)kvh * max_seq * HD);
  if (start < end) atg_issue<RU, RS, TU>(sm, kg, vg, start, end, 0, nt);
  for (int d = lane; d < HD; d += 32) qs[warp * HD + d] = q[h * HD + d] * scale;
  float m = -INFINITY, l = 0.f, o[ND];
#pragma unroll
  for (int e = 0; e < ND; e++) o[e] = 0.f;
  int b = 0;
  for (int t0 = start; t0 < end; t0 += ATG_TP, b ^= 1) {
    if (t0 + ATG_TP < end) atg_issue<RU, RS, TU>(sm, kg, vg, t0 + ATG_TP, end, b ^ 1, nt);
    else cp_async_commit();  // an empty group: wait_group 1 then means this tile
    cp_async_wait1();
    __syncthreads();
    const int nv = min(ATG_TP, end - t0);
    const unsigned char* ks = sm + (2 * b) * ATG_TP * RS;
    const unsigned char* vs = sm + (2 * b + 1) * ATG_TP * RS;
    float sc = -INFINITY;
    if (lane < nv) {
      float acc = 0.f;
#pragma unroll
      for (int c = 0; c < RU; c++) {
        const uint4 u = *(const uint4*)(ks + lane * RS + c * 16);
        const float4 qa = *(const float4*)(qs + warp * HD + c * 8), qb = *(const float4*)(qs + warp * HD + c * 8 + 4);
        acc = fmaf(qa.x, f16_to_f32(u.x & 0xFFFF), acc);
        acc = fmaf(qa.y, f16_to_f32(u.x >> 16), acc);
        acc = fmaf(qa.z, f16_to_f32(u.y & 0xFFFF), acc);
        acc = fmaf(qa.w, f16_to_f32(u.y >> 16), acc);
        acc = fmaf(qb.x, f16_to_f32(u.z & 0xFFFF), acc);
        acc = fmaf(qb.y, f16_to_f32(u.z >> 16), acc);
        acc = fmaf(qb.z, f16_to_f32(u.w & 0xFFFF), acc);
        acc = fmaf(qb.w, f16_to_f32(u.w >> 16), acc);
      }
      sc = acc;
    }
    const float mn = fmaxf(m, warp_max(sc));
    const float corr = expf(m - mn);  // m = -inf on the first tile: 0
    const float pw = lane < nv ? expf(sc - mn) : 0.f;
    l = l * corr + warp_sum(pw);
#pragma unroll
    for (int e = 0; e < ND; e++) o[e] *= corr;
    for (int j = 0; j < nv; j++) {
      const float pj = __shfl_sync(FULL_MASK, pw, j);
      float v[ND];
      const unsigned short* vr = (const unsigned short*)(vs + j * RS) + lane * ND;
#pragma unroll
      for (int e = 0; e < ND; e++) v[e] = f16_to_f32(vr[e]);
#pragma unroll
      for (int e = 0; e < ND; e++) o[e] = fmaf(pj, v[e], o[e]);
    }
    m = mn;
    __syncthreads();  // buffer b is refilled two tiles on
  }
  float* out = part + ((size_t)h * splits + split) * (HD + 2);
#pragma unroll
  for (int e = 0; e < ND; e++) out[lane * ND + e] = o[e];
  if (lane == 0) {
    out[HD] = m;
    out[HD + 1] = l;
  }
  // The group's last split merges every head of the group (warp w: head h).
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(cnt + kvh, 1u) == (unsigned)(splits - 1);
    if (last) cnt[kvh] = 0u;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  merge_head_warp(part + (size_t)h * splits * (HD + 2), splits, HD, merged + h * HD, ws[warp]);
}
extern "C" __global__ void __launch_bounds__(256)
attn_group(const float* q, const unsigned short* kc, const unsigned short* vc, const int* pos, float* part,
           int n_heads, int n_kv, int head_dim, int max_seq, float scale, unsigned* cnt, float* merged) {
  // Declared here, not in the per-ND bodies (each would get its own copy).
  __shared__ float ws[8][ATG_MAX_SPLITS];
  __shared__ int last;
#define ATG_CASE(N) \
  case N: attn_group_body<N>(q, kc, vc, pos, part, n_heads, n_kv, max_seq, scale, cnt, merged, ws, last); break;
  switch (head_dim / 32) { ATG_CASE(1) ATG_CASE(2) ATG_CASE(3) ATG_CASE(4) }
#undef ATG_CASE
}

// Part 2: merge the splits. Grid: heads; block: head_dim.
template <bool TOKENS>
__device__ __forceinline__ void attn_combine_body(const float* part, float* out, int splits, int head_dim) {
  pdl_wait();
  pdl_trigger();
  const int h = blockIdx.x, d = threadIdx.x;
  if (d >= head_dim) return;
  // Token blockIdx.y of a prefill chunk (attn_combine_n).
  const int tok = TOKENS ? (int)blockIdx.y : 0;
  part += (size_t)tok * gridDim.x * splits * (head_dim + 2);
  out += (size_t)tok * gridDim.x * head_dim;
  out[h * head_dim + d] = merge_dim(part + (size_t)h * splits * (head_dim + 2), splits, head_dim, d);
}
extern "C" __global__ void attn_combine(const float* part, float* out, int splits, int head_dim) {
  attn_combine_body<false>(part, out, splits, head_dim);
}
extern "C" __global__ void attn_combine_n(const float* part, float* out, int splits, int head_dim) {
  attn_combine_body<true>(part, out, splits, head_dim);
}

// Read-bandwidth probe: every byte of p read once with the same 16-byte streaming loads
// the GEMV uses. The sink write never happens in practice but keeps the loads alive.
extern "C" __global__ void __launch_bounds__(256) stream_read(const uint4* p, u64 n16, u32* sink) {
  pdl_wait();
  pdl_trigger();
  u32 acc = 0;
  const u64 stride = (u64)gridDim.x * blockDim.x;
  u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n16; i += 4 * stride) {
    const uint4 a = ld_stream_v4(p + i), b = ld_stream_v4(p + i + stride);
    const uint4 c = ld_stream_v4(p + i + 2 * stride), d = ld_stream_v4(p + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < n16; i += stride) {
    const uint4 a = ld_stream_v4(p + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x9E3779B9u) sink[0] = acc;
}

__device__ __forceinline__ u32 hash32(u32 x) {
  x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
  return x;
}
// Benchmark data (never zeros): random words, bytes in [lo, lo+span), floats in [lo, hi)
// stored as dtype (0 f32, 1 f16, 2 bf16).
extern "C" __global__ void fill_u32(u32* p, u64 n, u32 seed) {
  pdl_wait();
  pdl_trigger();
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
    p[i] = hash32((u32)i * 2654435761u ^ hash32(seed + (u32)(i >> 32)));
}
extern "C" __global__ void fill_bytes(unsigned char* p, u64 n, u32 seed, u32 lo, u32 span) {
  pdl_wait();
  pdl_trigger();
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
    p[i] = (unsigned char)(lo + hash32((u32)i ^ hash32(seed)) % span);
}
extern "C" __global__ void fill_float(unsigned char* p, u64 n, u32 seed, float lo, float hi, int dtype) {
  pdl_wait();
  pdl_trigger();
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
    const float v = lo + (hi - lo) * (hash32((u32)i ^ hash32(seed)) >> 8) * (1.f / 16777216.f);
    if (dtype == 0) ((float*)p)[i] = v;
    else if (dtype == 1) ((unsigned short*)p)[i] = f32_to_f16(v);
    else ((unsigned short*)p)[i] = (unsigned short)(__float_as_uint(v) >> 16);
  }
}

// Everything between the QKV projection and attention, for one token, in one launch:
// bias, per-head q/k RMSNorm, rotary embedding, and the f16 KV-cache append (post_unit
// per block). Grid: H + KV blocks (q heads, then k heads; a k block also stores its v
// head); block: hd threads.
// TOKENS: token blockIdx.y of a prefill chunk (qkv_post_n); the decode kernel is the
// same code with token 0 folded in.
template <bool TOKENS>
__device__ __forceinline__ void qkv_post_body(float* qkv, const int* pos, unsigned short* kc, unsigned short* vc,
                                              const QkvPost a) {
  pdl_wait();
  pdl_trigger();
  const int tok = TOKENS ? (int)blockIdx.y : 0;
  qkv += (size_t)tok * (a.n_heads + 2 * a.n_kv) * a.head_dim;
  post_unit(qkv, blockIdx.x, *pos + tok, kc, vc, a);
}
extern "C" __global__ void __launch_bounds__(256)
qkv_post(float* qkv, const int* pos, unsigned short* kc, unsigned short* vc, const QkvPost a) {
  qkv_post_body<false>(qkv, pos, kc, vc, a);
}
extern "C" __global__ void __launch_bounds__(256)
qkv_post_n(float* qkv, const int* pos, unsigned short* kc, unsigned short* vc, const QkvPost a) {
  qkv_post_body<true>(qkv, pos, kc, vc, a);
}

// Greedy sampling on the device: tok[0] = argmax(x[0..n]) (lowest index among equal
// maxima, NaN never wins), and the position advances, so a captured decode step can be
// replayed back to back with no host work. Each CTA reduces a stride of x into
// part[blockIdx]; the last CTA to finish reduces those and resets `counter`.
// The block's (max, lowest index among equal maxima) of every thread's (bv, bi), left in
// sv[0], si[0] (blockDim.x a power of two).
__device__ __forceinline__ void block_argmax(float bv, int bi, float* sv, int* si) {
  sv[threadIdx.x] = bv;
  si[threadIdx.x] = bi;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float ov = sv[threadIdx.x + s];
      const int oi = si[threadIdx.x + s];
      if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) {
        sv[threadIdx.x] = ov;
        si[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
}

extern "C" __global__ void __launch_bounds__(256)
argmax_step(const float* x, int n, float* pval, int* pidx, u32* counter, int* tok, int* pos) {
  pdl_wait();
  pdl_trigger();
  __shared__ float sv[256];
  __shared__ int si[256];
  __shared__ int last;
  float bv = -INFINITY;
  int bi = 0x7fffffff;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const float v = x[i];
    if (v > bv) { bv = v; bi = i; }
  }
  block_argmax(bv, bi, sv, si);
  if (threadIdx.x == 0) {
    pval[blockIdx.x] = sv[0];
    pidx[blockIdx.x] = si[0];
    __threadfence();
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  bv = -INFINITY;
  bi = 0x7fffffff;
  for (int b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
    const float v = __ldcg(pval + b);
    const int i = __ldcg(pidx + b);
    if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
  }
  block_argmax(bv, bi, sv, si);
  if (threadIdx.x == 0) {
    *tok = si[0] == 0x7fffffff ? 0 : si[0];
    if (pos) *pos += 1;
    *counter = 0;
  }
}

// pos[0] += n (a step or prefill chunk whose tokens the host supplies).
extern "C" __global__ void advance_pos(int* pos, int n) {
  pdl_wait();
  pdl_trigger();
  if (threadIdx.x == 0 && blockIdx.x == 0) *pos += n;
}

// ---- Tensor-core prefill helpers (mma.cu consumes their bf16 rows and lists) -------

// out[row] = bf16(x[row] * rsqrt(mean(x[row]^2) + eps) * w), or bf16(x[row]) when w is
// null: a prompt chunk's activations, normalized once, as the tensor cores' input.
// Grid: rows; block: 256.
extern "C" __global__ void __launch_bounds__(256)
rows_bf16(const float* x, const float* w, unsigned short* out, int d, float eps) {
  pdl_wait();
  pdl_trigger();
  const float* xr = x + (size_t)blockIdx.x * d;
  const float inv = w ? row_inv_rms(xr, d, eps) : 1.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = w ? xr[i] * inv * w[i] : xr[i];
    out[(size_t)blockIdx.x * d + i] = f32_bf16(v);
  }
}

// Exclusive prefix sums of v[0..n) into out, on one warp (lane i sums a contiguous run of
// ceil(n/32)); every lane gets the total.
__device__ __forceinline__ int warp_exclusive_scan(const int* v, int n, int* out) {
  const int lane = threadIdx.x & 31, per = (n + 31) / 32, lo = min(n, lane * per), hi = min(n, lo + per);
  int s = 0;
  for (int e = lo; e < hi; e++) s += v[e];
  int incl = s;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int x = __shfl_up_sync(FULL_MASK, incl, d);
    if (lane >= d) incl += x;
  }
  int run = incl - s;
  for (int e = lo; e < hi; e++) {
    out[e] = run;
    run += v[e];
  }
  return __shfl_sync(FULL_MASK, incl, 31);
}

// Per-expert lists of a chunk's (token, slot) pairs: cnt[e] pairs chose expert e, listed
// at list[off[e] ..]. One CTA; order within a list is arbitrary (each pair's result is
// independent of it). Ids outside [0, E) are dropped. Also the tile list of tc_gemm:
// work[0] = tiles, then (expert, first item) per tile of up to `tile` items, so that
// CTAs go only where items are.
#define SORT_MAX_E 512
extern "C" __global__ void __launch_bounds__(1024)
moe_sort(const int* ids, int pairs, int n_experts, int* cnt, int* off, int* list, int* work, int tile) {
  __shared__ int c[SORT_MAX_E], o[SORT_MAX_E], tl[SORT_MAX_E], to[SORT_MAX_E];
  pdl_wait();
  pdl_trigger();
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) c[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int e = ids[p];
    if (e >= 0 && e < n_experts) atomicAdd(&c[e], 1);
  }
  __syncthreads();
  if (threadIdx.x < 32) warp_exclusive_scan(c, n_experts, o);
  __syncthreads();
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) {
    cnt[e] = c[e];
    off[e] = o[e];
    tl[e] = (c[e] + tile - 1) / tile;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int tiles = warp_exclusive_scan(tl, n_experts, to);
    if (threadIdx.x == 0) work[0] = tiles;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) {
    for (int t = 0; t < tl[e]; t++) {
      work[1 + 2 * (to[e] + t)] = e;
      work[2 + 2 * (to[e] + t)] = t * tile;
    }
    c[e] = 0;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int e = ids[p];
    if (e >= 0 && e < n_experts) list[o[e] + atomicAdd(&c[e], 1)] = p;
  }
}

// ---- Prefill attention on tensor cores (flash-attention style, sm_80+) -------------
// A CTA owns 64 rows (token, q head of one kv head's group: row = token * G + g) of a
// chunk and walks the keys 0 .. (its last token's position) in blocks of 32: S = Q·Kᵀ
// and O += P·V on mma.sync m16n8k16 (f16 in, f32 accumulate), an online softmax per
// row, causal per row (token t of the chunk sees positions <= *pos + t). The chunk's
// K/V are already in the caches (qkv_post_n). Output: bf16 rows [token][heads·HD], the
// o_proj GEMM's input. Every query of a kv-head group shares each K/V load.
#define FA_BM 64
#define FA_BK 32
template <int HD>
__device__ __forceinline__ void attn_prefill_body(const float* q, const unsigned short* kc, const unsigned short* vc,
                                                  const int* pos, unsigned short* out, int n_tok, int n_heads,
                                                  int n_kv, int max_seq, float scale) {
  constexpr int LD = HD + 8;  // f16 pitch: rows 16 B apart in bank terms, conflict-free ldmatrix
  __shared__ __align__(16) unsigned short Qs[FA_BM * LD], Ks[FA_BK * LD], Vs[FA_BK * LD];
  pdl_wait();
  pdl_trigger();
  const int kvh = blockIdx.y, G = n_heads / n_kv, rows = n_tok * G, r0 = blockIdx.x * FA_BM;
  if (r0 >= rows) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int pos0 = *pos, qstride = (n_heads + 2 * n_kv) * HD;
  for (int i = tid; i < FA_BM * HD / 2; i += blockDim.x) {
    const int r = i / (HD / 2), d = (i % (HD / 2)) * 2, row = r0 + r;
    u32 v = 0;
    if (row < rows) {
      const float* qp = q + (size_t)(row / G) * qstride + (kvh * G + row % G) * HD + d;
      v = pack_f16(qp[0] * scale, qp[1] * scale);
    }
    *(u32*)(Qs + r * LD + d) = v;
  }
  int lim[2];  // last visible position of this thread's rows g, g+8 (-1: no row)
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int row = r0 + warp * 16 + (lane >> 2) + h * 8;
    lim[h] = row < rows ? pos0 + row / G : -1;
  }
  const int kend = min(pos0 + (min(rows, r0 + FA_BM) - 1) / G + 1, max_seq);
  float o[HD / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < HD / 8; j++)
#pragma unroll
    for (int c = 0; c < 4; c++) o[j][c] = 0.f;
  for (int kb = 0; kb < kend; kb += FA_BK) {
    __syncthreads();  // the previous block's K/V (and, first, Q's stores) are done with
    for (int i = tid; i < FA_BK * HD / 8; i += blockDim.x) {
      const int r = i / (HD / 8), d = (i % (HD / 8)) * 8, p = kb + r;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = kv;
      if (p < kend) {
        kv = *(const uint4*)(kc + ((size_t)kvh * max_seq + p) * HD + d);
        vv = *(const uint4*)(vc + ((size_t)kvh * max_seq + p) * HD + d);
      }
      *(uint4*)(Ks + r * LD + d) = kv;
      *(uint4*)(Vs + r * LD + d) = vv;
    }
    __syncthreads();
    float s[FA_BK / 8][4];
#pragma unroll
    for (int j = 0; j < FA_BK / 8; j++)
#pragma unroll
      for (int c = 0; c < 4; c++) s[j][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD; kk += 16) {
      u32 a[4];
      ldsm_x4(a, Qs + (warp * 16 + (lane & 15)) * LD + kk + (lane >> 4) * 8);
#pragma unroll
      for (int p = 0; p < FA_BK / 16; p++) {
        u32 b[4];
        ldsm_x4(b, Ks + (p * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk + ((lane >> 3) & 1) * 8);
        mma_16816<false>(s[2 * p], a, b[0], b[1]);
        mma_16816<false>(s[2 * p + 1], a, b[2], b[3]);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < FA_BK / 8; j++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
          const int key = kb + j * 8 + (lane & 3) * 2 + i;
          if (key > lim[h]) s[j][h * 2 + i] = -INFINITY;
          mx = fmaxf(mx, s[j][h * 2 + i]);
        }
      mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
      const float mn = fmaxf(m[h], mx), ms = mn == -INFINITY ? 0.f : mn;
      const float corr = expf(m[h] - ms);
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < FA_BK / 8; j++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
          const float p = expf(s[j][h * 2 + i] - ms);
          s[j][h * 2 + i] = p;
          rs += p;
        }
      rs += __shfl_xor_sync(FULL_MASK, rs, 1);
      rs += __shfl_xor_sync(FULL_MASK, rs, 2);
      l[h] = l[h] * corr + rs;
      m[h] = mn;
#pragma unroll
      for (int j = 0; j < HD / 8; j++) {
        o[j][h * 2] *= corr;
        o[j][h * 2 + 1] *= corr;
      }
    }
#pragma unroll
    for (int kk = 0; kk < FA_BK / 16; kk++) {
      const u32 a[4] = {pack_f16(s[2 * kk][0], s[2 * kk][1]), pack_f16(s[2 * kk][2], s[2 * kk][3]),
                        pack_f16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                        pack_f16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < HD / 16; dp++) {
        u32 b[4];
        ldsm_x4<true>(b, Vs + (kk * 16 + (lane & 15)) * LD + dp * 16 + (lane >> 4) * 8);
        mma_16816<false>(o[2 * dp], a, b[0], b[1]);
        mma_16816<false>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int row = r0 + warp * 16 + (lane >> 2) + h * 8;
    if (row >= rows) continue;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    unsigned short* op = out + (size_t)(row / G) * n_heads * HD + (kvh * G + row % G) * HD + (lane & 3) * 2;
#pragma unroll
    for (int j = 0; j < HD / 8; j++) {
      *(u32*)(op + j * 8) = pack_bf16(o[j][h * 2] * inv, o[j][h * 2 + 1] * inv);
    }
  }
}
#define ATTN_PREFILL(HD)                                                                                        \
  extern "C" __global__ void __launch_bounds__(128) attn_prefill_##HD(                                         \
      const float* q, const unsigned short* kc, const unsigned short* vc, const int* pos, unsigned short* out, \
      int n_tok, int n_heads, int n_kv, int max_seq, float scale) {                                            \
    attn_prefill_body<HD>(q, kc, vc, pos, out, n_tok, n_heads, n_kv, max_seq, scale);                         \
  }
ATTN_PREFILL(32)
ATTN_PREFILL(64)
ATTN_PREFILL(128)
