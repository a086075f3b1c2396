// Quantized GEMV and the fused MoE decode step, for ONE weight format per module; the
// format's layout, loads and dequantization are in quant.cuh (included before this file).
//
// Work split (bandwidth first):
//   * a "chunk" is 32 consecutive weights of a row = QBITS u32 words, loaded with the
//     widest aligned vector load (16 B for 4/8-bit), streamed past L1;
//   * LPR lanes ("lanes per row", a power of two chosen by the host so that the row's
//     chunks divide evenly) share one row; a warp holds 32/LPR rows at a time;
//   * the activation vector is staged once per CTA in shared memory, transposed as
//     [8][C] float4 so that lanes reading neighbouring chunks hit neighbouring banks;
//   * the grid is sized to fill every SM and strides over rows.

// y[t] += (loaded chunk c of a row) . (token t's chunk c), for NB tokens in xs/xsum.
// Staged int8 activations of one vector (INT8_ACT), inside its float4 staging region
// (8*C float4): per chunk c, xq[c] holds the int8 partners of the low nibbles of the
// chunk's 4 words (weights 8i, 8i+2, 8i+4, 8i+6 of word i), xq[C + c] those of the high
// nibbles, and dx[c] = (scale d, exact f32 sum of the 32 x).
// INT8_NATURAL (fp4 modes): x[32c .. 32c + 15] in xq[c], x[32c + 16 .. 32c + 31] in
// xq[C + c], in order.
__device__ __forceinline__ float int8_chunk(const QW& W, const u32 (&w)[CHUNK_WORDS], SC sc, int c, int C,
                                            const float4* xs) {
  const uint4 a = ((const uint4*)xs)[c], b = ((const uint4*)xs)[C + c];
  const float2 dx = ((const float2*)((const uint4*)xs + 2 * C))[c];
  const u32 xa[4] = {a.x, a.y, a.z, a.w}, xb[4] = {b.x, b.y, b.z, b.w};
#if INT8_NATURAL
  // Word i holds weights 8i .. 8i + 7; their x are words 2i, 2i + 1 of (xa, xb).
  int acc0 = 0, acc1 = 0;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    u32 lo, hi;
    fp4x8_i8(w[i], lo, hi);
    const u32 x0 = i < 2 ? xa[2 * i] : xb[2 * i - 4], x1 = i < 2 ? xa[2 * i + 1] : xb[2 * i - 3];
    if (i < 2) {
      acc0 = dp4a((int)lo, (int)x0, acc0);
      acc0 = dp4a((int)hi, (int)x1, acc0);
    } else {
      acc1 = dp4a((int)lo, (int)x0, acc1);
      acc1 = dp4a((int)hi, (int)x1, acc1);
    }
  }
#if QMODE == MODE_NVFP4
  // Two E4M3 scales per chunk (16 weights each); the looked-up values are 2x E2M1.
  return 0.5f * dx.x * W.gmul * (e4m3_f32(sc.a) * (float)acc0 + e4m3_f32(sc.b) * (float)acc1);
#else
  return 0.5f * dx.x * e8m0_f32(sc.a) * (float)(acc0 + acc1);
#endif
#else
  int acc = 0;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    acc = dp4a((int)(w[i] & 0x0F0F0F0Fu), (int)xa[i], acc);
    acc = dp4a((int)((w[i] >> 4) & 0x0F0F0F0Fu), (int)xb[i], acc);
  }
  return sdt_bits(sc.a) * dx.x * (float)acc + sdt_bits(sc.b) * dx.y;
#endif
}

template <int NB>
__device__ __forceinline__ void chunk_compute(const QW& W, const u32 (&w)[CHUNK_WORDS], SC sc, int c, int C,
                                              const float4* xs, const float* xsum, float (&y)[NB]) {
#if INT8_ACT
#pragma unroll
  for (int t = 0; t < NB; t++) y[t] += int8_chunk(W, w, sc, c, C, xs + t * 8 * C);
  return;
#endif
  float a0[NB], a1[NB];
#pragma unroll
  for (int t = 0; t < NB; t++) { a0[t] = 0.f; a1[t] = 0.f; }
#pragma unroll
  for (int q = 0; q < 8; q++) {
    float f[4];
#pragma unroll
    for (int e = 0; e < 4; e++) f[e] = deq(w, 4 * q + e);
#pragma unroll
    for (int t = 0; t < NB; t++) {
      const float4 xv = xs[(t * 8 + q) * C + c];
#pragma unroll
      for (int e = 0; e < 4; e++) {
        if (QMODE == MODE_NVFP4 && q >= 4) a1[t] = fmaf(f4c(xv, e), f[e], a1[t]);
        else a0[t] = fmaf(f4c(xv, e), f[e], a0[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < NB; t++) y[t] += chunk_finish(W, sc, a0[t], a1[t], QMODE == MODE_AFFINE ? xsum[t * C + c] : 0.f);
}

// The same for one chunk whose x (32 values) is already in registers.
__device__ __forceinline__ float chunk_dot_reg(const QW& W, const u32 (&w)[CHUNK_WORDS], SC sc, const float4 (&xv)[8],
                                               float X) {
  float a0 = 0.f, a1 = 0.f;
#pragma unroll
  for (int q = 0; q < 8; q++) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const float f = deq(w, 4 * q + e);
      if (QMODE == MODE_NVFP4 && q >= 4) a1 = fmaf(f4c(xv[q], e), f, a1);
      else a0 = fmaf(f4c(xv[q], e), f, a0);
    }
  }
  return chunk_finish(W, sc, a0, a1, X);
}

__device__ __forceinline__ const unsigned char* chunk_ptr(const QW& W, int row, int c, int C) {
  return W.w + ((size_t)row * C + c) * (CHUNK_WORDS * 4);
}

// acc[t] += this lane's share (chunks sub, sub+lpr, ...) of row . x[t]. Loads of UNROLL
// chunks (and their scales) are issued before any is used.
template <int NB>
__device__ __forceinline__ void row_dot(const QW& W, int row, int C, int sub, int lpr, const float4* xs,
                                        const float* xsum, float (&acc)[NB]) {
  for (int c0 = sub; c0 < C; c0 += UNROLL * lpr) {
    u32 w[UNROLL][CHUNK_WORDS];
    SC sc[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
      const int c = c0 + u * lpr;
      if (c < C) { load_chunk(chunk_ptr(W, row, c, C), w[u]); sc[u] = load_scales(W, row, c); }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
      const int c = c0 + u * lpr;
      if (c < C) chunk_compute<NB>(W, w[u], sc[u], c, C, xs, xsum, acc);
    }
  }
}

// Chunk c of x * inv * nw (nw may be null) in registers, prescaled, in chunk_dot_reg's
// layout; returns their sum (affine's X). cg: read x through L2 (written earlier in the
// same launch by other SMs).
__device__ __forceinline__ float chunk_x(const float* x, const float* nw, float inv, int c, bool cg, float4 (&xv)[8]) {
  const float m = inv * X_PRESCALE;
  float X = 0.f;
#pragma unroll
  for (int q = 0; q < 8; q++) {
    float4 v = cg ? __ldcg((const float4*)x + c * 8 + q) : ((const float4*)x)[c * 8 + q];
    const float4 g = nw ? __ldg((const float4*)nw + c * 8 + q) : make_float4(1.f, 1.f, 1.f, 1.f);
    v.x *= m * g.x; v.y *= m * g.y; v.z *= m * g.z; v.w *= m * g.w;
    X += (v.x + v.y) + (v.z + v.w);
    xv[q] = v;
  }
  return X;
}

// This lane's share of row . (x * inv * nw) with exact f32 activations whatever
// INT8_ACT, x read from global memory (L2: written earlier in the same launch). For the
// router inside the single-launch kernels: its logits choose experts, and int8 noise in x
// flips near-ties between them (a different expert, not a small error). nw may be null.
__device__ __forceinline__ float row_dot_exact(const QW& W, int row, int C, int sub, int lpr, const float* x,
                                               const float* nw, float inv) {
  float acc = 0.f;
  for (int c = sub; c < C; c += lpr) {
    u32 w[CHUNK_WORDS];
    load_chunk(chunk_ptr(W, row, c, C), w);
    const SC sc = load_scales(W, row, c);
    float4 xv[8];
    const float X = chunk_x(x, nw, inv, c, true, xv);
    acc += chunk_dot_reg(W, w, sc, xv, X);
  }
  return acc;
}

// Two rows against the same x (gate and up): both rows' loads in flight together.
__device__ __forceinline__ void row_dot2(const QW& A, int ra, const QW& B, int rb, int C, int sub, int lpr,
                                         const float4* xs, const float* xsum, float (&ya)[1], float (&yb)[1]) {
  for (int c0 = sub; c0 < C; c0 += UNROLL * lpr) {
    u32 wa[UNROLL][CHUNK_WORDS], wb[UNROLL][CHUNK_WORDS];
    SC sa[UNROLL], sb[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
      const int c = c0 + u * lpr;
      if (c < C) {
        load_chunk(chunk_ptr(A, ra, c, C), wa[u]); sa[u] = load_scales(A, ra, c);
        load_chunk(chunk_ptr(B, rb, c, C), wb[u]); sb[u] = load_scales(B, rb, c);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
      const int c = c0 + u * lpr;
      if (c < C) {
        chunk_compute<1>(A, wa[u], sa[u], c, C, xs, xsum, ya);
        chunk_compute<1>(B, wb[u], sb[u], c, C, xs, xsum, yb);
      }
    }
  }
}

// Rows each lane streams against one read of x (see rows_dot). ROWS_GEMV for the plain
// GEMV at batch 1, ROWS_MOE for the MoE kernels (few rows: more lanes must share them);
// 1 selects the older path (UNROLL chunks of one row in flight, x re-read per row).
#ifndef ROWS_GEMV
#define ROWS_GEMV 1
#endif
#ifndef ROWS_MOE
#define ROWS_MOE 1
#endif

// acc[m][r] += (row rows[m][r] of matrix m) . x for NM (1 or 2: gate and up) matrices
// times R rows that share one x. Each 32-weight chunk of x is read from shared memory
// once into registers and reused by all NM*R rows: reading it once per row made shared
// memory (8 bytes per HBM byte at 4 bits), not HBM, the limit at low bit widths.
// The NM*R chunk loads (and scales) of one step are issued before any is used.
template <int NM, int R>
__device__ __forceinline__ void rows_dot(const QW& A, const QW& B, const int (&rows)[NM][R], int C, int sub,
                                         int lpr, const float4* xs, const float* xsum, float (&acc)[NM][R]) {
  for (int c = sub; c < C; c += lpr) {
    u32 w[NM][R][CHUNK_WORDS];
    SC sc[NM][R];
#pragma unroll
    for (int m = 0; m < NM; m++) {
#pragma unroll
      for (int r = 0; r < R; r++) {
        load_chunk(chunk_ptr(m ? B : A, rows[m][r], c, C), w[m][r]);
        sc[m][r] = load_scales(m ? B : A, rows[m][r], c);
      }
    }
#if INT8_ACT
#pragma unroll
    for (int m = 0; m < NM; m++) {
#pragma unroll
      for (int r = 0; r < R; r++) acc[m][r] += int8_chunk(m ? B : A, w[m][r], sc[m][r], c, C, xs);
    }
#else
    float4 xv[8];
#pragma unroll
    for (int q = 0; q < 8; q++) xv[q] = xs[q * C + c];
    const float X = QMODE == MODE_AFFINE ? xsum[c] : 0.f;
#pragma unroll
    for (int m = 0; m < NM; m++) {
#pragma unroll
      for (int r = 0; r < R; r++) acc[m][r] += chunk_dot_reg(m ? B : A, w[m][r], sc[m][r], xv, X);
    }
#endif
  }
}

// INT8_ACT staging of one vector: thread per chunk; x scaled by `inv * nw` when nw.
// `cg`: read x through L2 (written earlier in the same launch by other SMs).
__device__ __forceinline__ void stage_int8(const float* x, int cols, float4* xs, const float* nw, float inv,
                                           bool cg) {
  const int C = cols / 32;
  uint4* xq = (uint4*)xs;
  float2* dx = (float2*)(xq + 2 * C);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float v[32];
#pragma unroll
    for (int q = 0; q < 8; q++) {
      const float4 f = cg ? __ldcg((const float4*)x + c * 8 + q) : ((const float4*)x)[c * 8 + q];
      v[4 * q] = f.x; v[4 * q + 1] = f.y; v[4 * q + 2] = f.z; v[4 * q + 3] = f.w;
    }
    if (nw) {
#pragma unroll
      for (int q = 0; q < 8; q++) {
        const float4 w = __ldg((const float4*)nw + c * 8 + q);
        v[4 * q] = v[4 * q] * inv * w.x; v[4 * q + 1] = v[4 * q + 1] * inv * w.y;
        v[4 * q + 2] = v[4 * q + 2] * inv * w.z; v[4 * q + 3] = v[4 * q + 3] * inv * w.w;
      }
    }
    float amax = 0.f, sum = 0.f;
#pragma unroll
    for (int j = 0; j < 32; j++) { amax = fmaxf(amax, fabsf(v[j])); sum += v[j]; }
    const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    u32 a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
      u32 pa = 0, pb = 0;
#pragma unroll
      for (int e = 0; e < 4; e++) {
        // affine: a = even, b = odd values of word i's eight; natural: a = x[4i ..], b = x[16 + 4i ..]
        const int ja = INT8_NATURAL ? 4 * i + e : 8 * i + 2 * e, jb = INT8_NATURAL ? 16 + 4 * i + e : 8 * i + 2 * e + 1;
        pa |= ((u32)(__float2int_rn(v[ja] * id) & 0xFF)) << (8 * e);
        pb |= ((u32)(__float2int_rn(v[jb] * id) & 0xFF)) << (8 * e);
      }
      a[i] = pa; b[i] = pb;
    }
    xq[c] = make_uint4(a[0], a[1], a[2], a[3]);
    xq[C + c] = make_uint4(b[0], b[1], b[2], b[3]);
    dx[c] = make_float2(d, sum);
  }
}

// Stage one activation vector x[cols] into xs ([8][C] float4, transposed) and, for
// affine, its per-chunk sums. No barrier: callers sync once after all stagings.
__device__ __forceinline__ void stage_vec(const float* x, int cols, float4* xs) {
#if INT8_ACT
  stage_int8(x, cols, xs, nullptr, 1.f, false);
  return;
#endif
  const int C = cols / 32;
  for (int u = threadIdx.x; u < 8 * C; u += blockDim.x) {
    float4 v = ((const float4*)x)[u];
    v.x *= X_PRESCALE; v.y *= X_PRESCALE; v.z *= X_PRESCALE; v.w *= X_PRESCALE;
    xs[(u & 7) * C + (u >> 3)] = v;
  }
}
// Sum of v over the block (every thread gets it). Uses `red` (32 floats of shared memory).
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  __syncthreads();  // red may still be read from a previous call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = threadIdx.x < 32 && threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
  if (threadIdx.x < 32) {
    t = warp_sum(t);
    if (threadIdx.x == 0) red[0] = t;
  }
  __syncthreads();
  return red[0];
}

// stage_vec of RMSNorm(x) * nw (nw == null: x as is). Fusing the norm into every
// consumer's staging saves a launch and a round trip per norm: each CTA re-reads the
// 8 KB of x from L2, which costs far less than a kernel boundary.
__device__ __forceinline__ void stage_vec_norm(const float* x, int cols, float4* xs, const float* nw, float eps) {
  if (nw == nullptr) {
    stage_vec(x, cols, xs);
    return;
  }
  __shared__ float red[32];
  const int C = cols / 32;
  float ss = 0.f;
  for (int u = threadIdx.x; u < 8 * C; u += blockDim.x) {
    const float4 v = ((const float4*)x)[u];
    ss += (v.x * v.x + v.y * v.y) + (v.z * v.z + v.w * v.w);
  }
  const float inv = 1.f / sqrtf(block_sum(ss, red) / cols + eps);
#if INT8_ACT
  stage_int8(x, cols, xs, nw, inv, false);
  return;
#endif
  for (int u = threadIdx.x; u < 8 * C; u += blockDim.x) {
    float4 v = ((const float4*)x)[u];
    const float4 w = ((const float4*)nw)[u];
    v.x = v.x * inv * w.x * X_PRESCALE; v.y = v.y * inv * w.y * X_PRESCALE;
    v.z = v.z * inv * w.z * X_PRESCALE; v.w = v.w * inv * w.w * X_PRESCALE;
    xs[(u & 7) * C + (u >> 3)] = v;
  }
}

__device__ __forceinline__ void sum_vec(int cols, const float4* xs, float* xsum) {
#if QMODE == MODE_AFFINE && !INT8_ACT
  const int C = cols / 32;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < 8; q++) {
      const float4 v = xs[q * C + c];
      s += (v.x + v.y) + (v.z + v.w);
    }
    xsum[c] = s;
  }
#endif
}

__device__ __forceinline__ float reduce_lpr(float v, int lpr) {
  for (int o = lpr >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

// y[r] = W[r] · (x * inv * nw) for every row with exact f32 activations (row_dot_exact),
// rows spread over `nwarps` warps (this one is `warp`): the router inside the
// single-launch kernels. Not inlined: those kernels outgrow the instruction cache.
__device__ __noinline__ void rows_exact(const QW W, int lpr, int warp, int nwarps, const float* x, const float* nw,
                                        float inv, float* y) {
  const int C = W.cols / 32, lane = threadIdx.x & 31, sub = lane & (lpr - 1), rpw = 32 / lpr;
  for (int base = warp * rpw; base < W.rows; base += nwarps * rpw) {
    const int row = base + lane / lpr;
    float acc = row < W.rows ? row_dot_exact(W, row, C, sub, lpr, x, nw, inv) : 0.f;
    acc = reduce_lpr(acc, lpr);
    if (row < W.rows && sub == 0) y[row] = acc;
  }
}

// y[t, :] = W x[t, :] for t < n <= NB. Dynamic smem: NB*cols*4 + NB*(cols/32)*4 bytes.
// R > 1 (batch 1 only): each lane streams R rows (rpw apart) against one read of x.
// Prefetch rows [r0, r0 + nr) of W (codes, scales, biases) into L2; see prefetch_l2.
#ifndef PREFETCH
#define PREFETCH 0
#endif
__device__ __forceinline__ void prefetch_rows(const QW& W, int r0, int nr, int t, int nt) {
  if (!PREFETCH || nr <= 0) return;
  const u64 rb = (u64)(W.cols / 32) * CHUNK_WORDS * 4;
  prefetch_l2(W.w + (u64)r0 * rb, (u64)nr * rb, t, nt);
#if QMODE == MODE_AFFINE
  const u64 sb = (u64)(W.cols / W.group) * (QSDT == SDT_F32 ? 4 : 2);
  prefetch_l2(W.s + (u64)r0 * sb, (u64)nr * sb, t, nt);
  prefetch_l2(W.b + (u64)r0 * sb, (u64)nr * sb, t, nt);
#elif QMODE == MODE_NVFP4
  const u64 sb = W.cols / 16;
  prefetch_l2(W.s + (u64)r0 * sb, (u64)nr * sb, t, nt);
#elif QMODE == MODE_MXFP4 || QMODE == MODE_MXFP8
  const u64 sb = W.cols / 32;
  prefetch_l2(W.s + (u64)r0 * sb, (u64)nr * sb, t, nt);
#endif
}

// Epilogue of the batch-1 kernels: optional RMSNorm of x (weights nw) fused into the
// staging, optional bias, and `add` (y += Wx: residual adds without a separate launch;
// each row is written by exactly one lane, so no atomics).
struct Epi {
  const float* nw;
  float eps;
  int add;
  const float* bias;
};
__device__ __forceinline__ void epi_store(const Epi& e, float* y, int row, float v) {
  if (e.bias) v += e.bias[row];
  y[row] = e.add ? y[row] + v : v;
}

// The row loop of the batch-1 / small-batch GEMV: rows spread over `nwarps` warps (this
// one is `warp`), each lane's dot handed to `store(t, row, v)` by the lane that owns it.
// Shared by the per-op kernels and the barrier decode kernel (mega.cu), whose grid is
// not the op's.
template <int NB, int R, class Store>
__device__ __forceinline__ void gemv_rows(const QW& W, int lpr, int warp, int nwarps, const float4* xs,
                                          const float* xsum, Store store) {
  const int C = W.cols / 32;
  const int lane = threadIdx.x & 31, sub = lane & (lpr - 1), rsub = lane / lpr, rpw = 32 / lpr;
  if (NB == 1 && R > 1) {
    for (int base = warp * rpw * R; base < W.rows; base += nwarps * rpw * R) {
      int rows[1][R];
      float acc[1][R];
#pragma unroll
      for (int r = 0; r < R; r++) {
        rows[0][r] = min(base + r * rpw + rsub, W.rows - 1);  // tail rows: reload the last, discard
        acc[0][r] = 0.f;
      }
      rows_dot<1, R>(W, W, rows, C, sub, lpr, xs, xsum, acc);
#pragma unroll
      for (int r = 0; r < R; r++) {
        const float v = reduce_lpr(acc[0][r], lpr);
        const int row = base + r * rpw + rsub;
        if (row < W.rows && sub == 0) store(0, row, v);
      }
    }
    return;
  }
  for (int base = warp * rpw; base < W.rows; base += nwarps * rpw) {
    const int row = base + rsub;
    float acc[NB];
#pragma unroll
    for (int t = 0; t < NB; t++) acc[t] = 0.f;
    if (row < W.rows) row_dot<NB>(W, row, C, sub, lpr, xs, xsum, acc);
#pragma unroll
    for (int t = 0; t < NB; t++) acc[t] = reduce_lpr(acc[t], lpr);
    if (row < W.rows && sub == 0) {
#pragma unroll
      for (int t = 0; t < NB; t++) store(t, row, acc[t]);
    }
  }
}

template <int NB, int R>
__device__ __forceinline__ void gemv_body(const QW& W, const float* x, int n, float* y, int lpr, const Epi e) {
  extern __shared__ float4 smem4[];
  const int C = W.cols / 32;
  float4* xs = smem4;
  float* xsum = (float*)(smem4 + NB * 8 * C);
  {
    // Weights do not depend on the previous kernel: ask for this CTA's first two
    // grid-stride row ranges before waiting for it (later ranges would only evict).
    const int per = (blockDim.x >> 5) * (32 / lpr) * (NB == 1 && R > 1 ? R : 1);
    for (int it = 0; it < 2; it++) {
      const int r0 = (blockIdx.x + it * gridDim.x) * per;
      if (r0 < W.rows) prefetch_rows(W, r0, min(per, W.rows - r0), threadIdx.x, blockDim.x);
    }
  }
  pdl_wait();
  pdl_trigger();
  for (int t = 0; t < n; t++) stage_vec_norm(x + (size_t)t * W.cols, W.cols, xs + t * 8 * C, e.nw, e.eps);
  __syncthreads();
  for (int t = 0; t < n; t++) sum_vec(W.cols, xs + t * 8 * C, xsum + t * C);
  __syncthreads();
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nwarps = (gridDim.x * blockDim.x) >> 5;
  gemv_rows<NB, R>(W, lpr, warp, nwarps, xs, xsum, [&](int t, int row, float v) {
    if (t < n) epi_store(e, y + (size_t)t * W.rows, row, v);
  });
}

#define NO_EPI Epi{nullptr, 0.f, 0, nullptr}
extern "C" __global__ void __launch_bounds__(256) gemv1(const QW W, const float* x, int n, float* y, int lpr) {
  gemv_body<1, ROWS_GEMV>(W, x, n, y, lpr, NO_EPI);
}
extern "C" __global__ void __launch_bounds__(256) gemv2(const QW W, const float* x, int n, float* y, int lpr) {
  gemv_body<2, 1>(W, x, n, y, lpr, NO_EPI);
}
extern "C" __global__ void __launch_bounds__(256) gemv4(const QW W, const float* x, int n, float* y, int lpr) {
  gemv_body<4, 1>(W, x, n, y, lpr, NO_EPI);
}
extern "C" __global__ void __launch_bounds__(256) gemv8(const QW W, const float* x, int n, float* y, int lpr) {
  gemv_body<8, 1>(W, x, n, y, lpr, NO_EPI);
}
// Batch-1 GEMV with the decoder's epilogue: y (+)= W · rmsnorm(x) (+ bias).
extern "C" __global__ void __launch_bounds__(256) gemv1_epi(const QW W, const float* x, float* y, int lpr,
                                                            const Epi e, const Pf next) {
  prefetch_next(next);
  gemv_body<1, ROWS_GEMV>(W, x, 1, y, lpr, e);
}

// ---- Decode with the weights fetched before the wait (ROOFTOP_PRELOAD) ------------
// A launch's weights do not depend on the previous kernel, so each lane copies its whole
// share into shared memory (cp.async) *before* griddepcontrol.wait: HBM streams while
// the previous kernel runs, and after the wait only stage x -> dots from shared memory
// -> store remains. For that the grid covers every row at once (each lane owns up to
// KPRE chunks of one row: chunks sub, sub + lpr, ...; the host picks lpr with
// lpr * KPRE >= C) and every launch stays small enough (one CTA per SM of <= 16 warps,
// little shared memory) that the next launch's CTAs fit beside it and can preload too.
#define KPRE (32 / CHUNK_WORDS > 0 ? 32 / CHUNK_WORDS : 1)

__device__ __forceinline__ void cp_async_chunk(u32* dst, const unsigned char* src) {
#if CHUNK_WORDS % 4 == 0
#pragma unroll
  for (int i = 0; i < CHUNK_WORDS / 4; i++)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(dst + 4 * i)), "l"(src + 16 * i)
                 : "memory");
#elif CHUNK_WORDS % 2 == 0
#pragma unroll
  for (int i = 0; i < CHUNK_WORDS / 2; i++)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(smem_u32(dst + 2 * i)), "l"(src + 8 * i)
                 : "memory");
#else
#pragma unroll
  for (int i = 0; i < CHUNK_WORDS; i++)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_u32(dst + i)), "l"(src + 4 * i) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Issue this lane's chunks of `row` (C chunks) into its slots of `pre` (slot j of thread
// t at (j * blockDim + t) * CHUNK_WORDS words: a warp's copies and reads are contiguous)
// and load their scales into registers.
__device__ __forceinline__ void pre_issue(const QW& W, int row, int C, int sub, int lpr, u32* pre, SC (&sc)[KPRE]) {
  const int t = threadIdx.x, nt = blockDim.x;
#pragma unroll
  for (int j = 0; j < KPRE; j++) {
    const int c = sub + j * lpr;
    if (c < C) {
      cp_async_chunk(pre + (j * nt + t) * CHUNK_WORDS, chunk_ptr(W, row, c, C));
      sc[j] = load_scales(W, row, c);
    }
  }
}
// This lane's share of row . x from its preloaded slots (after cp_async_wait_all).
__device__ __forceinline__ float pre_dot(const QW& W, int C, int sub, int lpr, const u32* pre, const SC (&sc)[KPRE],
                                         const float4* xs, const float* xsum) {
  const int t = threadIdx.x, nt = blockDim.x;
  float acc[1] = {0.f};
#pragma unroll
  for (int j = 0; j < KPRE; j++) {
    const int c = sub + j * lpr;
    if (c < C) {
      const u32* p = pre + (j * nt + t) * CHUNK_WORDS;
      u32 w[CHUNK_WORDS];
#if CHUNK_WORDS % 4 == 0
#pragma unroll
      for (int i = 0; i < CHUNK_WORDS / 4; i++) {
        const uint4 v = ((const uint4*)p)[i];
        w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
      }
#else
#pragma unroll
      for (int i = 0; i < CHUNK_WORDS; i++) w[i] = p[i];
#endif
      chunk_compute<1>(W, w, sc[j], c, C, xs, xsum, acc);
    }
  }
  return acc[0];
}
__device__ __forceinline__ u32* pre_area(float4* smem, int stage_bytes) {
  return (u32*)((unsigned char*)smem + ((stage_bytes + 15) & ~15));
}

// Batch-1 GEMV y (+)= W · rmsnorm(x) (+ bias), weights preloaded (see above). Grid:
// exactly ceil(rows / rpw) warps' worth of rows (warps of the last CTA past the end
// idle). Dynamic smem: stage_bytes(1, cols) rounded to 16, then blockDim * nk chunks.
extern "C" __global__ void __launch_bounds__(512) gemv_pre(const QW W, const float* x, float* y, int lpr,
                                                           const Epi e) {
  extern __shared__ float4 smem4[];
  const int C = W.cols / 32;
  float4* xs = smem4;
  float* xsum = (float*)(smem4 + 8 * C);
  u32* pre = pre_area(smem4, W.cols * 4 + C * 4);
  const int lane = threadIdx.x & 31, sub = lane & (lpr - 1), rsub = lane / lpr, rpw = 32 / lpr;
  const int row = ((blockIdx.x * blockDim.x + threadIdx.x) >> 5) * rpw + rsub;
  const bool have = row < W.rows;
  SC sc[KPRE];
  if (have) pre_issue(W, row, C, sub, lpr, pre, sc);
  pdl_wait();
  pdl_trigger();
  stage_vec_norm(x, W.cols, xs, e.nw, e.eps);
  __syncthreads();
  sum_vec(W.cols, xs, xsum);
  __syncthreads();
  cp_async_wait_all();
  float v = have ? pre_dot(W, C, sub, lpr, pre, sc, xs, xsum) : 0.f;
  v = reduce_lpr(v, lpr);
  if (have && sub == 0) epi_store(e, y, row, v);
}

// y[t, :] (+)= W · rmsnorm(x[t, :]) (+ bias) for t < n (a prefill chunk): every
// weight row loaded once per 8 tokens; token group blockIdx.y (the tensor-core prefill's
// router logits: gridDim.y = ceil(n / 8)).
extern "C" __global__ void __launch_bounds__(256) gemv8_epi(const QW W, const float* x, int n, float* y, int lpr,
                                                            const Epi e) {
  const int t0 = blockIdx.y * 8;
  gemv_body<8, 1>(W, x + (size_t)t0 * W.cols, min(8, n - t0), y + (size_t)t0 * W.rows, lpr, e);
}

// Embedding lookup: y[t, :] = W[tok[t], :] * scale, dequantized, for token t =
// blockIdx.y of a prefill chunk (embed_rows; 0 for embed_row). Grid-stride over chunks.
template <bool TOKENS>
__device__ __forceinline__ void embed_body(const QW W, const int* tok, float* y, float scale) {
  pdl_wait();
  pdl_trigger();
  if (TOKENS) {
    tok += blockIdx.y;
    y += (size_t)blockIdx.y * W.cols;
  }
  const int row = min(max(*tok, 0), W.rows - 1);
  const int C = W.cols / 32;
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x) {
    u32 w[CHUNK_WORDS];
    load_chunk(chunk_ptr(W, row, c, C), w);
    const SC sc = load_scales(W, row, c);
#pragma unroll
    for (int j = 0; j < 32; j++) {
      const float f = deq(w, j) * X_PRESCALE;
      const bool hi = QMODE == MODE_NVFP4 && j >= 16;
      y[c * 32 + j] = chunk_finish(W, sc, hi ? 0.f : f, hi ? f : 0.f, 1.f) * scale;
    }
  }
}
extern "C" __global__ void __launch_bounds__(256) embed_row(const QW W, const int* tok, float* y, float scale) {
  embed_body<false>(W, tok, y, scale);
}
extern "C" __global__ void __launch_bounds__(256) embed_rows(const QW W, const int* tok, float* y, float scale) {
  embed_body<true>(W, tok, y, scale);
}

// ---- Fused MoE decode step (batch 1): three launches, no host sync ----------------

// Routing on one warp: scores, optional group limit, top-k, weights.
// Matches mlx-lm: qwen3_moe (softmax, top-k, optional renorm) and deepseek_v3 / glm4_moe
// (sigmoid, + correction bias for choice only, groups ranked by top-2 sum with dropped
// groups' scores set to 0.0, renorm with +1e-20, times routed_scaling_factor).
__device__ __forceinline__ u32 redux_max(u32 v) {
  u32 r;
  asm volatile("redux.sync.max.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(v));
  return r;
}
__device__ __forceinline__ u32 redux_min(u32 v) {
  u32 r;
  asm volatile("redux.sync.min.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(v));
  return r;
}
// Float -> unsigned with the same order (NaN aside); 0 is below every float's key
// except the negative NaNs'.
__device__ __forceinline__ u32 ord_key(float f) {
  const u32 b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
#define MAX_EXPERTS 512
// NJ = experts per lane rounded up (a compile-time count keeps the keys in registers;
// routing runs on one warp on the critical path, so it is compiled per size class
// rather than for the 512-expert maximum: 4x fewer instructions at 128 experts).
__shared__ float route_sc[MAX_EXPERTS], route_ch[MAX_EXPERTS];
// Group-limited routing (DeepSeek-V3 / GLM): keep the topk_group groups with the
// largest top-2 sums, zero the choice scores of the others.
__device__ __noinline__ void route_groups(const Routing rt, float* ch, int lane) {
  const int E = rt.n_experts;
  if (rt.n_group > 1) {
    const int gsize = E / rt.n_group;
    float gs = -INFINITY;
    if (lane < rt.n_group) {
      float t1 = -INFINITY, t2 = -INFINITY;
      for (int j = 0; j < gsize; j++) {
        const float v = ch[lane * gsize + j];
        if (v > t1) { t2 = t1; t1 = v; } else if (v > t2) { t2 = v; }
      }
      gs = t1 + t2;
    }
    bool keep = false;
    for (int it = 0; it < rt.topk_group; it++) {
      float bv = gs;
      int bi = lane;
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
      }
      if (lane == bi) { keep = true; gs = -INFINITY; }
    }
    const u32 kept = __ballot_sync(FULL_MASK, keep);
    for (int e = lane; e < E; e += 32)
      if (!((kept >> (e / gsize)) & 1u)) ch[e] = 0.f;
    __syncwarp();
  }
}

template <int NJ>
__device__ __noinline__ void route_n(const float* logits, const Routing rt, int* ids, float* wts, u64* ts) {
  float* sc = route_sc;
  float* ch = route_ch;
  const int lane = threadIdx.x & 31, E = rt.n_experts;
  // Every logit this lane needs, loaded at once (one round trip to L2).
  float lg[NJ];
#pragma unroll
  for (int j = 0; j < NJ; j++) lg[j] = lane + 32 * j < E ? __ldcg(logits + lane + 32 * j) : 0.f;
  // (ts: ROOFTOP_VERBOSE stamps; adding 0 * lg[0] orders the first after the loads.)
  if (ts && lane == 0) ts[0] = globaltimer() + (u64)(0.f * lg[0]);
  if (!rt.sigmoid) {
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < NJ; j++)
      if (lane + 32 * j < E) m = fmaxf(m, lg[j]);
    m = warp_max(m);
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < NJ; j++) {
      if (lane + 32 * j < E) {
        lg[j] = expf(lg[j] - m);
        s += lg[j];
      }
    }
    s = warp_sum(s);
#pragma unroll
    for (int j = 0; j < NJ; j++) {
      const int e = lane + 32 * j;
      if (e < E) { sc[e] = lg[j] / s; ch[e] = sc[e]; }
    }
  } else {
#pragma unroll
    for (int j = 0; j < NJ; j++) {
      const int e = lane + 32 * j;
      if (e < E) {
        const float p = 1.f / (1.f + expf(-lg[j]));
        sc[e] = p;
        ch[e] = p + (rt.bias ? rt.bias[e] : 0.f);
      }
    }
  }
  __syncwarp();
  route_groups(rt, ch, lane);
  if (ts && lane == 0) ts[1] = globaltimer();
  // Top-k on one warp: each lane keeps order-preserving integer keys of its experts in
  // registers; per pick one redux.sync max finds the best key and one redux.sync min the
  // lowest expert holding it (ties go to the lower index, as before) — two instructions
  // instead of ten dependent shuffles, on the critical path between router and experts.
  u32 key[NJ];
#pragma unroll
  for (int j = 0; j < NJ; j++) {
    const int e = lane + 32 * j;
    key[j] = e < E ? ord_key(ch[e]) : 0u;
  }
  float wsum = 0.f;
  for (int i = 0; i < rt.k; i++) {
    u32 bk = 0u, bi = 0xffffffffu;
#pragma unroll
    for (int j = 0; j < NJ; j++)
      if (key[j] > bk) { bk = key[j]; bi = lane + 32 * j; }
    const u32 m = redux_max(bk);
    u32 w = redux_min(bk == m ? bi : 0xffffffffu);
    if (w >= (u32)E) w = 0;  // NaN logits: keep indices in range
#pragma unroll
    for (int j = 0; j < NJ; j++)
      if (lane + 32 * j == (int)w) key[j] = 0u;
    if (lane == 0) { ids[i] = (int)w; wts[i] = sc[w]; }
    wsum += sc[w];
  }
  __syncwarp();
  if (ts && lane == 0) ts[2] = globaltimer();
  if (lane == 0) {
    const float d = rt.sigmoid ? wsum + 1e-20f : wsum;
    for (int i = 0; i < rt.k; i++) wts[i] = (rt.norm ? wts[i] / d : wts[i]) * rt.scale;
  }
}

__device__ void route(const float* logits, const Routing rt, int* ids, float* wts, u64* ts = nullptr) {
  // One template for every size, so that the size checked on the GPU (<= 128 experts in
  // the check suite) is the same code as the others.
  if (rt.n_experts <= 128) route_n<4>(logits, rt, ids, wts, ts);
  else if (rt.n_experts <= 256) route_n<8>(logits, rt, ids, wts, ts);
  else route_n<MAX_EXPERTS / 32>(logits, rt, ids, wts, ts);
}

// Launch 1: router logits = R x over the whole grid. Routing itself happens at the
// start of launch 2, in every CTA: a last-CTA-routes tail here (fence, arrival atomic,
// one warp routing, then launch 2 reading the ids back) kept this launch at 13.6 us on
// an H200 against 7.9 for a 25x larger GEMV (Nsight Compute, isolated launches).
extern "C" __global__ void __launch_bounds__(256)
moe_router(const QW R, const float* x, float* logits, int lpr, const float* nw, float eps) {
  gemv_body<1, 1>(R, x, 1, logits, lpr, Epi{nw, eps, 0, nullptr});
}

// Launch 2: route (every CTA, from the router's logits: one warp, ~1 us, in parallel
// with the others; CTA 0 also writes ids/wts for launch 3), then
// h[slot, r] = silu(gate_e[r] . x) * (up_e[r] . x) for the k routed slots
// (expert e = ids[slot], stacked weights [E*inter, hidden]) and the shared expert
// (slot k, own weights [inter_sh, hidden]; inter_sh = 0 when absent).
// The gate/up row loop of the fused MoE: act[i] = silu(gate . x) * (up . x) for items
// i < k*inter (routed slot i / inter, expert ids[slot]) and then the shared expert's
// inter_sh rows, over `nwarps` warps (this one is `warp`). Used by moe_gate_up and mega.cu.
__device__ __forceinline__ void gate_up_rows(const QW& G, const QW& U, const QW& SG, const QW& SU, const int* ids,
                                             int k, int inter, int inter_sh, int lpr, int warp, int nwarps,
                                             const float4* xs, const float* xsum, float* h) {
  const int C = SG.cols > 0 ? SG.cols / 32 : G.cols / 32;
  const int items = k * inter + inter_sh;
  const int lane = threadIdx.x & 31, sub = lane & (lpr - 1), rsub = lane / lpr, rpw = 32 / lpr;
  if (ROWS_MOE > 1) {
    // A warp takes rpw*R consecutive items; the host guarantees k*inter is a multiple of
    // that, so the items of one warp are all routed or all shared-expert.
    const int R = ROWS_MOE;
    for (int base = warp * rpw * R; base < items; base += nwarps * rpw * R) {
      const bool routed = base < k * inter;
      const QW Wg = pick(routed, G, SG);
      const QW Wu = pick(routed, U, SU);
      int rows[2][R];
      float acc[2][R];
#pragma unroll
      for (int r = 0; r < R; r++) {
        const int i = min(base + r * rpw + rsub, items - 1);
        const int row = routed ? ids[i / inter] * inter + i % inter : i - k * inter;
        rows[0][r] = row; rows[1][r] = row;
        acc[0][r] = 0.f; acc[1][r] = 0.f;
      }
      rows_dot<2, R>(Wg, Wu, rows, C, sub, lpr, xs, xsum, acc);
#pragma unroll
      for (int r = 0; r < R; r++) {
        const float g = reduce_lpr(acc[0][r], lpr), u = reduce_lpr(acc[1][r], lpr);
        const int i = base + r * rpw + rsub;
        if (i < items && sub == 0) h[i] = silu(g) * u;
      }
    }
    return;
  }
  for (int base = warp * rpw; base < items; base += nwarps * rpw) {
    const int i = base + rsub;
    float g[1] = {0.f}, u[1] = {0.f};
    if (i < items) {
      const bool routed = i < k * inter;
      const int row = routed ? ids[i / inter] * inter + i % inter : i - k * inter;
      const QW Wg = pick(routed, G, SG);
      const QW Wu = pick(routed, U, SU);
      row_dot2(Wg, row, Wu, row, C, sub, lpr, xs, xsum, g, u);
    }
    g[0] = reduce_lpr(g[0], lpr);
    u[0] = reduce_lpr(u[0], lpr);
    if (i < items && sub == 0) h[i] = silu(g[0]) * u[0];
  }
}


#define MAX_TOPK 32
// Blocks per SM gate/up is compiled for (register cap). Its 86 registers gave 2 blocks
// (25% occupancy; Nsight: DRAM 22.7%); capped for 3, qwen3-30b-a3b affine4 decode on
// an H200 went 389.1 -> 407.8 tok/s (4: 396.7). ROOFTOP_MOE_MIN_BLOCKS overrides it.
#ifndef MOE_MIN_BLOCKS
#define MOE_MIN_BLOCKS 3
#endif
extern "C" __global__ void __launch_bounds__(256, MOE_MIN_BLOCKS)
moe_gate_up(const QW G, const QW U, const QW SG, const QW SU, const float* x, const float* logits,
            const Routing rt, int* ids_out, float* wts_out, float* h, int k, int inter, int inter_sh, int lpr,
            const float* nw, float eps) {
  extern __shared__ float4 smem4[];
  __shared__ int ids[MAX_TOPK];
  __shared__ float wts[MAX_TOPK];
  const int C = SG.cols > 0 ? SG.cols / 32 : G.cols / 32;
  float4* xs = smem4;
  float* xsum = (float*)(smem4 + 8 * C);
  // x was complete before the router started (the router waited for it before letting
  // this launch begin), so staging it may overlap the router's tail. Without routed
  // experts (k = 0: a dense MLP) there is no router: wait first.
  if (inter_sh > 0) {
    // The shared expert's rows are known before routing: split them over the grid.
    const int per = (inter_sh + gridDim.x - 1) / gridDim.x, r0 = blockIdx.x * per;
    const int nr = min(per, inter_sh - r0);
    prefetch_rows(SG, r0, nr, threadIdx.x, blockDim.x);
    prefetch_rows(SU, r0, nr, threadIdx.x, blockDim.x);
  }
  if (k == 0) pdl_wait();
  stage_vec_norm(x, C * 32, xs, nw, eps);
  pdl_wait();
  pdl_trigger();
  if (k > 0 && threadIdx.x < 32) route(logits, rt, ids, wts);
  __syncthreads();
  if (blockIdx.x == 0 && threadIdx.x < k) {
    ids_out[threadIdx.x] = ids[threadIdx.x];
    wts_out[threadIdx.x] = wts[threadIdx.x];
  }
  sum_vec(C * 32, xs, xsum);
  __syncthreads();
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nwarps = (gridDim.x * blockDim.x) >> 5;
  gate_up_rows(G, U, SG, SU, ids, k, inter, inter_sh, lpr, warp, nwarps, xs, xsum, h);
}

// The down row loop of the fused MoE: out[r] += w_slot * (down_e[r] . act[slot]) for the
// items [lo, hi) of (slot, row) pairs (slot k: the shared expert, weight 1), with the
// slots from s_lo staged in xs / xsum (Cm chunks apart). Atomics: items of one row meet
// from several blocks. Used by moe_down and mega.cu.
__device__ __forceinline__ void down_rows(const QW& D, const QW& SD, const int* ids, const float* wts, int k,
                                          int hidden, int inter, int inter_sh, int lpr, int lo, int hi, int s_lo,
                                          int Cm, const float4* xs, const float* xsum, float* out) {
  const int Cr = inter / 32, Cs = inter_sh / 32;
  const int lane = threadIdx.x & 31, sub = lane & (lpr - 1), rsub = lane / lpr, rpw = 32 / lpr;
  const int nw = blockDim.x >> 5;
  if (ROWS_MOE > 1) {
    // A warp takes rpw*R consecutive items of one slot (the host makes `per` and hidden
    // multiples of rpw*R), so they share one staged h vector.
    const int R = ROWS_MOE;
    for (int base = lo + (threadIdx.x >> 5) * rpw * R; base < hi; base += nw * rpw * R) {
      const int slot = base / hidden;
      const bool routed = slot < k;
      const QW W = pick(routed, D, SD);
      const int e0 = routed ? ids[slot] * hidden : 0;
      const float wt = routed ? wts[slot] : 1.f;
      int rows[1][R];
      float acc[1][R];
#pragma unroll
      for (int r = 0; r < R; r++) {
        rows[0][r] = e0 + min(base + r * rpw + rsub, hi - 1) % hidden;
        acc[0][r] = 0.f;
      }
      rows_dot<1, R>(W, W, rows, routed ? Cr : Cs, sub, lpr, xs + (slot - s_lo) * 8 * Cm, xsum + (slot - s_lo) * Cm,
                     acc);
#pragma unroll
      for (int r = 0; r < R; r++) {
        const float v = reduce_lpr(acc[0][r], lpr);
        const int i = base + r * rpw + rsub;
        if (i < hi && sub == 0) atomicAdd(out + i % hidden, wt * v);
      }
    }
    return;
  }
  for (int base = lo + (threadIdx.x >> 5) * rpw; base < hi; base += nw * rpw) {
    const int i = base + rsub;
    float acc[1] = {0.f};
    float wt = 0.f;
    int r = 0;
    if (i < hi) {
      const int slot = i / hidden;
      r = i % hidden;
      const bool routed = slot < k;
      const QW W = pick(routed, D, SD);
      const int row = routed ? ids[slot] * hidden + r : r;
      wt = routed ? wts[slot] : 1.f;
      row_dot<1>(W, row, routed ? Cr : Cs, sub, lpr, xs + (slot - s_lo) * 8 * Cm, xsum + (slot - s_lo) * Cm, acc);
    }
    acc[0] = reduce_lpr(acc[0], lpr);
    if (i < hi && sub == 0) atomicAdd(out + r, wt * acc[0]);
  }
}

// Launch 3: out[r] += sum_slot w_slot * (down_e[r] . h[slot]) (+ shared expert, weight 1).
// Items are (slot, row) pairs so that every SM has work; each block takes a contiguous
// range of `per` items (so it stages only the one or two slots it touches) and partial
// sums meet in `out` with atomics (out is the residual stream: the MoE output is added
// in place). Dynamic smem: max_slots * (max(I, S) * 4 + max(I, S) / 32 * 4) bytes.
extern "C" __global__ void __launch_bounds__(256)
moe_down(const QW D, const QW SD, const float* h, const int* ids, const float* wts, float* out,
         int k, int hidden, int inter, int inter_sh, int lpr, int per, const Pf next) {
  extern __shared__ float4 smem4[];
  {
    // The shared expert's rows can be fetched before waiting for h (the routed ids come
    // from gate/up, i.e. only after the wait).
    const int items = (k + (inter_sh > 0)) * hidden;
    const int lo = blockIdx.x * per, hi = min(items, lo + per);
    for (int s = max(lo / hidden, k); lo < hi && s <= (hi - 1) / hidden; s++) {
      const int a = max(lo, s * hidden) - s * hidden, b = min(hi, (s + 1) * hidden) - s * hidden;
      prefetch_rows(SD, a, b - a, threadIdx.x, blockDim.x);
    }
  }
  prefetch_next(next);
  pdl_wait();
  pdl_trigger();
  const int Cr = inter / 32, Cs = inter_sh / 32, Cm = Cr > Cs ? Cr : Cs;
  const int items = (k + (inter_sh > 0)) * hidden;
  const int lo = blockIdx.x * per, hi = min(items, lo + per);
  if (lo >= hi) return;
  const int s_lo = lo / hidden, s_hi = (hi - 1) / hidden;
  float4* xs = smem4;
  float* xsum = (float*)(smem4 + (s_hi - s_lo + 1) * 8 * Cm);
  for (int s = s_lo; s <= s_hi; s++) {
    const int cols = s < k ? inter : inter_sh;
    stage_vec(h + s * inter, cols, xs + (s - s_lo) * 8 * Cm);
  }
  __syncthreads();
  for (int s = s_lo; s <= s_hi; s++) sum_vec(s < k ? inter : inter_sh, xs + (s - s_lo) * 8 * Cm, xsum + (s - s_lo) * Cm);
  __syncthreads();
  down_rows(D, SD, ids, wts, k, hidden, inter, inter_sh, lpr, lo, hi, s_lo, Cm, xs, xsum, out);
}

// ---- Prefill chunks: the MoE step for n <= 8 tokens in three launches -------------
// Each (token, routed expert) pair is a slot of inter rows (then each token's shared
// expert / dense MLP, inter_sh rows); act is [n][k * inter + inter_sh].

// Launch 1: routing of token blockIdx.x from its router logits (one warp).
extern "C" __global__ void __launch_bounds__(32) moe_route_n(const float* logits, const Routing rt, int* ids_out,
                                                             float* wts_out) {
  __shared__ int ids[MAX_TOPK];
  __shared__ float wts[MAX_TOPK];
  pdl_wait();
  pdl_trigger();
  const int t = blockIdx.x;
  route(logits + (size_t)t * rt.n_experts, rt, ids, wts);
  __syncwarp();
  if (threadIdx.x < rt.k) {
    ids_out[t * rt.k + threadIdx.x] = ids[threadIdx.x];
    wts_out[t * rt.k + threadIdx.x] = wts[threadIdx.x];
  }
}

// Launch 2: act[t, j * inter + r] = silu(gate_e . x_t) * (up_e . x_t) for each pair
// (t, j) (e = ids[t * k + j]) and each token's shared rows, x_t = rmsnorm(h[t]) staged
// for all n tokens. Items are (token, row-of-its-slots) over the grid.
extern "C" __global__ void __launch_bounds__(256)
moe_gate_up_n(const QW G, const QW U, const QW SG, const QW SU, const float* x, int n, const int* ids, int k,
              int inter, int inter_sh, float* act, int lpr, const float* nw, float eps) {
  extern __shared__ float4 smem4[];
  const int H = SG.cols > 0 ? SG.cols : G.cols, C = H / 32;
  float4* xs = smem4;
  float* xsum = (float*)(smem4 + 8 * 8 * C);
  pdl_wait();
  pdl_trigger();
  for (int t = 0; t < n; t++) stage_vec_norm(x + (size_t)t * H, H, xs + t * 8 * C, nw, eps);
  __syncthreads();
  for (int t = 0; t < n; t++) sum_vec(H, xs + t * 8 * C, xsum + t * C);
  __syncthreads();
  const int per_tok = k * inter + inter_sh, items = n * per_tok;
  const int lane = threadIdx.x & 31, sub = lane & (lpr - 1), rsub = lane / lpr, rpw = 32 / lpr;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, nwarps = (gridDim.x * blockDim.x) >> 5;
  for (int base = warp * rpw; base < items; base += nwarps * rpw) {
    const int i = base + rsub;
    float g[1] = {0.f}, u[1] = {0.f};
    if (i < items) {
      const int t = i / per_tok, o = i - t * per_tok;
      const bool routed = o < k * inter;
      const int row = routed ? ids[t * k + o / inter] * inter + o % inter : o - k * inter;
      row_dot2(pick(routed, G, SG), row, pick(routed, U, SU), row, C, sub, lpr, xs + t * 8 * C, xsum + t * C, g, u);
    }
    g[0] = reduce_lpr(g[0], lpr);
    u[0] = reduce_lpr(u[0], lpr);
    if (i < items && sub == 0) act[i] = silu(g[0]) * u[0];
  }
}

// Launch 3: out[t, r] += Σ_j w[t, j] * (down_e[r] . act[t, j]) (+ shared, weight 1).
// Items are (token, slot, row) triples; each block takes `per` consecutive ones (so it
// stages only the one or two slots it touches) and adds into out with atomics.
extern "C" __global__ void __launch_bounds__(256)
moe_down_n(const QW D, const QW SD, const float* act, const int* ids, const float* wts, float* out, int n, int k,
           int hidden, int inter, int inter_sh, int lpr, int per) {
  extern __shared__ float4 smem4[];
  pdl_wait();
  pdl_trigger();
  const int ns = k + (inter_sh > 0), per_tok = k * inter + inter_sh;
  const int Cr = inter / 32, Cs = inter_sh / 32, Cm = Cr > Cs ? Cr : Cs;
  const int items = n * ns * hidden;
  const int lo = blockIdx.x * per, hi = min(items, lo + per);
  if (lo >= hi) return;
  // Global slot g = t * ns + s: token t, slot s (s == k: shared).
  const int g_lo = lo / hidden, g_hi = (hi - 1) / hidden;
  float4* xs = smem4;
  float* xsum = (float*)(smem4 + (g_hi - g_lo + 1) * 8 * Cm);
  for (int g = g_lo; g <= g_hi; g++) {
    const int t = g / ns, s = g - t * ns;
    stage_vec(act + (size_t)t * per_tok + s * inter, s < k ? inter : inter_sh, xs + (g - g_lo) * 8 * Cm);
  }
  __syncthreads();
  for (int g = g_lo; g <= g_hi; g++) {
    const int s = g % ns;
    sum_vec(s < k ? inter : inter_sh, xs + (g - g_lo) * 8 * Cm, xsum + (g - g_lo) * Cm);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, sub = lane & (lpr - 1), rsub = lane / lpr, rpw = 32 / lpr;
  const int nw = blockDim.x >> 5;
  for (int base = lo + (threadIdx.x >> 5) * rpw; base < hi; base += nw * rpw) {
    const int i = base + rsub;
    float acc[1] = {0.f};
    float wt = 0.f;
    int g = 0, r = 0;
    if (i < hi) {
      g = i / hidden;
      r = i % hidden;
      const int t = g / ns, s = g - t * ns;
      const bool routed = s < k;
      const int row = routed ? ids[t * k + s] * hidden + r : r;
      wt = routed ? wts[t * k + s] : 1.f;
      row_dot<1>(pick(routed, D, SD), row, routed ? Cr : Cs, sub, lpr, xs + (g - g_lo) * 8 * Cm, xsum + (g - g_lo) * Cm,
                 acc);
    }
    acc[0] = reduce_lpr(acc[0], lpr);
    if (i < hi && sub == 0) atomicAdd(out + (size_t)(g / ns) * hidden + r, wt * acc[0]);
  }
}
