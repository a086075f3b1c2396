// Tensor-core GEMM for prompt prefill, for ONE weight format per module (quant.cuh).
//
// Y = W · X^T over a set of "items" (rows of X): each CTA owns TM weight rows and TN
// items; per TK-step its threads load and dequantize the weight tile into shared memory
// as bf16 (each weight is decoded once per CTA, not once per token as in the GEMV), stage
// the items' bf16 activations beside it, and four warps run mma.sync m16n8k16 (bf16 in,
// f32 accumulate; sm_80+). The next step's global loads are issued before this step's
// MMAs, so HBM streams while the tensor cores work.
//
// One kernel serves every prefill matrix (`mode`):
//   0 / 1  dense projection: items 0..n-1 are tokens; y[item] = or += W·x (+ bias);
//   2      MoE down: blockIdx.z (or the tile list) gives the expert; its items are
//          (token, slot) pairs from the per-expert lists of moe_sort;
//          y[pair / ydiv] += wts[pair] · (W_e · act[pair])
//          with atomics (a token's k experts land in the same row);
//   3      SwiGLU: gate (A) and up (B) tiles side by side, act[item] = silu(g) · u as
//          bf16; experts (lists) or a dense MLP / shared expert (items 0..n-1).
// Cost per weight (tile decode): the format's ~3-op decode, one FFMA and half a cvt,
// amortized over the tile's items; weights are read from HBM once per (row tile, item
// tile), i.e. once per prompt chunk for an expert with <= TN tokens.

#define TM 64          // weight rows per CTA (4 warps x 16)
#define TN 64          // items per pass (8 n-tiles of 8; tiles past the items are skipped)
#define TK 64          // k per step: two 32-weight chunks per row
#define TLD (TK + 8)   // smem row pitch in bf16: 144 B, so ldmatrix's 8 row reads hit 8 bank groups

struct TcIn {
  const unsigned short* x;  // bf16 input rows, ldx elements apart
  const int* list;          // per-expert item lists (null: items 0..n-1)
  const int* cnt;           // [E] items per expert
  const int* off;           // [E] start of each expert's list
  const int* work;          // [1 + 2T]: T, then (expert, first item) of each tile, or null
  int ldx, xdiv, n, pad;    // input row of item p: p / xdiv; n: items when list is null
};
struct TcOut {
  float* y;              // f32 output rows (modes 0-2), ldy apart; row of item p: p / ydiv
  unsigned short* a;     // bf16 output rows (mode 3), lda apart
  const float* bias;     // [rows] or null (modes 0, 1)
  const float* wts;      // [items] routing weights (mode 2)
  int ldy, lda, ydiv, mode;
};

// The 32 weights of a loaded chunk as their true values, rounded to bf16 pairs
// (out[i] = weights 2i, 2i+1): value = (decoded bits · 2^P) · scale + offset, the power
// of two undoing the fp modes' exponent placement (exact), as chunk_finish does.
__device__ __forceinline__ void chunk_bf16(const QW& W, const u32 (&w)[CHUNK_WORDS], SC sc, u32 (&out)[16]) {
  float m0 = 1.f, m1 = 1.f, a = 0.f, pre = 1.f;
#if QMODE == MODE_AFFINE
  const float s = sdt_bits(sc.a) * (float)(1u << QBITS);
  m0 = m1 = s;
  a = sdt_bits(sc.b) - s;  // decoded 1 + q/2^b: s(1 + q/2^b) + b - s = scale·q + bias
#elif QMODE == MODE_NVFP4
  pre = 0x1p126f;
  m0 = e4m3_f32(sc.a) * W.gmul;
  m1 = e4m3_f32(sc.b) * W.gmul;
#elif QMODE == MODE_MXFP4
  pre = 0x1p126f;
  m0 = m1 = e8m0_f32(sc.a);
#elif QMODE == MODE_MXFP8
  pre = 0x1p120f;
  m0 = m1 = e8m0_f32(sc.a);
#endif
#pragma unroll
  for (int i = 0; i < 16; i++) {
    const float m = i < 8 ? m0 : m1;
    out[i] = pack_bf16(fmaf(deq(w, 2 * i) * pre, m, a), fmaf(deq(w, 2 * i + 1) * pre, m, a));
  }
}

// 8 warps per CTA: warp w owns m-tile w % 4 (16 weight rows) and half of the pass's
// n-tiles (items (w / 4) * 32 ...), so each thread holds half a 4-warp CTA's accumulators
// and decodes one weight chunk per step instead of two (more warps per SM).
#define TC_THREADS 256
#define TC_NT (TN / 16)  // n-tiles per warp
// MMAs of one TK-step: the warp's 16 rows of As[0] (and As[1] for SwiGLU) against its
// n-tiles of the pass's items in Bs (pitch TLD); n-tiles at or past nv are skipped.
__device__ __forceinline__ void tc_mma_step(const unsigned short* As0, const unsigned short* As1,
                                            const unsigned short* Bs, float (&acc)[2][TC_NT][4], int nv, bool dual,
                                            int warp, int lane) {
  constexpr int NT = TC_NT;
  const int mw = warp & 3, n0 = (warp >> 2) * NT;  // first n-tile of this warp
#pragma unroll
  for (int kk = 0; kk < TK; kk += 16) {
    u32 b[NT / 2][4];
#pragma unroll
    for (int p = 0; p < NT / 2; p++)
      if ((n0 + 2 * p) * 8 < nv)
        ldsm_x4(b[p], Bs + ((n0 + 2 * p) * 8 + (lane >> 4) * 8 + (lane & 7)) * TLD + kk + ((lane >> 3) & 1) * 8);
#pragma unroll
    for (int m = 0; m < 2; m++) {
      if (m == 0 || dual) {
        u32 a[4];
        ldsm_x4(a, (m ? As1 : As0) + (mw * 16 + (lane & 15)) * TLD + kk + (lane >> 4) * 8);
#pragma unroll
        for (int j = 0; j < NT; j++)
          if ((n0 + j) * 8 < nv) mma_16816<true>(acc[m][j], a, b[j >> 1][(j & 1) * 2], b[j >> 1][(j & 1) * 2 + 1]);
      }
    }
  }
}

// Epilogue: this thread holds rows g, g+8 of the warp's 16, items 2(lane%4)+{0,1} of
// each of its n-tiles.
__device__ __forceinline__ void tc_epilogue(const TcOut& out, const float (&acc)[2][TC_NT][4], const int* items,
                                            int nv, int r0, int rpe, int warp, int lane) {
  constexpr int NT = TC_NT;
  const int mw = warp & 3, n0 = (warp >> 2) * NT;
#pragma unroll
  for (int j = 0; j < NT; j++) {
    if ((n0 + j) * 8 >= nv) break;
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int row = r0 + mw * 16 + (lane >> 2) + h * 8;
      if (row >= rpe) continue;
#pragma unroll
      for (int i = 0; i < 2; i++) {
        const int it = items[(n0 + j) * 8 + (lane & 3) * 2 + i];
        if (it < 0) continue;
        const float v = acc[0][j][h * 2 + i];
        if (out.mode == 3) {
          const float u = acc[1][j][h * 2 + i];
          out.a[(size_t)it * out.lda + row] = f32_bf16(silu(v) * u);
        } else {
          float* y = out.y + (size_t)(it / out.ydiv) * out.ldy + row;
          if (out.mode == 2) {
            atomicAdd(y, out.wts[it] * v);
          } else {
            const float r = v + (out.bias ? out.bias[row] : 0.f);
            *y = out.mode == 1 ? *y + r : r;
          }
        }
      }
    }
  }
}

// Loader jobs per TK-step: 2 matrices x 64 rows x 2 chunks of weights (thread t: matrix
// t / 128, B's only for SwiGLU) and 512 16-byte pieces of the items' activations (two per
// thread). 2 CTAs per SM (128 registers). A 4-warp version (64 accumulators and two decode
// jobs per thread, 168 registers, 3 CTAs = 12 warps per SM) prefilled 2048 tokens 2.8%
// slower on an H200 (14,296 vs 14,699 tok/s, both over the tile list); removed.
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2) tc_gemm(const QW A, const QW B, int rpe, const TcIn in,
                                                                    const TcOut out) {
  constexpr int T = TC_THREADS, XJ = 512 / T, NT = TC_NT;
  __shared__ __align__(16) unsigned short As[2][TM * TLD];
  __shared__ __align__(16) unsigned short Bs[TN * TLD];
  __shared__ int items[TN];
  pdl_wait();
  pdl_trigger();
  // The tile list (experts): CTA y takes tile y, if there is one; else expert z, item
  // tiles y, y + gridDim.y, ...
  int e = blockIdx.z, t_first = blockIdx.y * TN, t_step = gridDim.y * TN;
  if (in.work) {
    if ((int)blockIdx.y >= in.work[0]) return;
    e = in.work[1 + 2 * blockIdx.y];
    t_first = in.work[2 + 2 * blockIdx.y];
    t_step = 1 << 30;
  }
  const int n = in.list ? in.cnt[e] : in.n;
  const int base = in.list ? in.off[e] : 0;
  const int r0 = blockIdx.x * TM;
  const bool dual = out.mode == 3;
  const int K = A.cols, C = K / 32;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  for (int t0 = t_first; t0 < n; t0 += t_step) {
    const int nv = min(TN, n - t0);  // items of this pass: n-tiles from nv on are skipped
    __syncthreads();  // the previous pass's epilogue has read `items`
    if (tid < TN) items[tid] = tid < nv ? (in.list ? in.list[base + t0 + tid] : t0 + tid) : -1;
    __syncthreads();
    const unsigned short* xp[XJ];
#pragma unroll
    for (int i = 0; i < XJ; i++) {
      const int item = items[(tid + i * T) >> 3];
      xp[i] = item >= 0 ? in.x + (size_t)(item / in.xdiv) * in.ldx : nullptr;
    }
    float acc[2][NT][4];
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
      for (int j = 0; j < NT; j++)
#pragma unroll
        for (int q = 0; q < 4; q++) acc[m][j][q] = 0.f;
    // This thread's weight job: matrix m (fields picked by value: a runtime choice
    // between two kernel parameters taken by reference would copy them to the stack),
    // row wr of the tile, chunk wc of each step.
    const int m = tid >> 7, wr = (tid & 127) >> 1, wc = tid & 1;
    // Registers of the step in flight.
    u32 wq[CHUNK_WORDS];
    SC sq;
    uint4 xv[XJ];
    auto load = [&](int k0) {
      const int c = k0 / 32 + wc;
      if ((m == 0 || dual) && r0 + wr < rpe && c < C) {
        const QW Wm = pick(m == 0, A, B);
        const size_t row = (size_t)e * rpe + r0 + wr;
        load_chunk(Wm.w + (row * C + c) * (CHUNK_WORDS * 4), wq);
        sq = load_scales(Wm, (int)row, c);
      }
#pragma unroll
      for (int i = 0; i < XJ; i++) {
        const int k = k0 + ((tid + i * T) & 7) * 8;
        const bool ok = xp[i] != nullptr && k < K;
        xv[i] = ok ? *(const uint4*)(xp[i] + k) : make_uint4(0, 0, 0, 0);
      }
    };
    load(0);
    for (int k0 = 0; k0 < K; k0 += TK) {
      if (m == 0 || dual) {
        const int c = k0 / 32 + wc;
        u32 q[16];
        if (r0 + wr < rpe && c < C) {
          chunk_bf16(pick(m == 0, A, B), wq, sq, q);
        } else {
#pragma unroll
          for (int i = 0; i < 16; i++) q[i] = 0;
        }
        uint4* dst = (uint4*)(As[m] + wr * TLD + wc * 32);
#pragma unroll
        for (int i = 0; i < 4; i++) dst[i] = make_uint4(q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]);
      }
#pragma unroll
      for (int i = 0; i < XJ; i++) {
        const int idx = tid + i * T;
        *(uint4*)(Bs + (idx >> 3) * TLD + (idx & 7) * 8) = xv[i];
      }
      __syncthreads();
      if (k0 + TK < K) load(k0 + TK);
      tc_mma_step(As[0], As[1], Bs, acc, nv, dual, warp, lane);
      __syncthreads();
    }
    tc_epilogue(out, acc, items, nv, r0, rpe, warp, lane);
  }
}
