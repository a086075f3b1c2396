// One weight format per module: its layout, chunk loads and dequantization (shared by
// the GEMV kernels in gemv.cu and the tensor-core prefill tiles in mma.cu).
//
// The format is fixed at compile time by -D flags (see src/nvrtc.rs):
//   QMODE 0 dense | 1 affine | 2 nvfp4 | 3 mxfp4 | 4 mxfp8
//   QBITS affine bits (1..8); 4 for the fp4 modes, 8 for mxfp8; dense: 16 or 32
//   QSDT  dense element / affine scale dtype: 0 f32, 1 f16, 2 bf16
// Layout is rooftop_quant's (MLX's): each row is an LSB-first bit stream of codes in
// little-endian u32 words; scales (and affine biases) per group, row-major.
//
// Dequantization costs ~2 integer ops per weight, with no int->float conversion:
//   affine: the code is placed in the top mantissa bits of 1.0f, giving 1 + q/2^b; the
//     offset is removed per chunk with the chunk's sum of x (s*2^b*(acc - X) + bias*X);
//   fp4/fp8: sign and magnitude bits are placed so the float equals value*2^-126 (E2M1)
//     or value*2^-120 (E4M3), exact including subnormals; x is pre-scaled by 2^100 so
//     products stay normal, and the power of two is undone with the group scale.
#define MODE_DENSE 0
#define MODE_AFFINE 1
#define MODE_NVFP4 2
#define MODE_MXFP4 3
#define MODE_MXFP8 4

#if QMODE == MODE_DENSE
#define CHUNK_WORDS (QSDT == SDT_F32 ? 32 : 16)
#else
#define CHUNK_WORDS QBITS
#endif

#if QMODE >= MODE_NVFP4
#define X_PRESCALE 0x1p100f
#else
#define X_PRESCALE 1.0f
#endif

// 4-bit affine with int8 activations (llama.cpp's q8_1 idea): x is quantized per 32 to
// int8 with one f32 scale when staged, and each chunk's dot product is 8 dp4a on the
// nibbles (mask and shift, no float conversion): ~0.6 integer ops per weight instead of
// ~4 for the float path, which made the 4-bit kernels instruction-bound (Nsight: 35% SM
// throughput, 17% DRAM at 4 warps/scheduler). -DACT_F32 keeps exact f32 activations.
// nvfp4 / mxfp4 too: twice an E2M1 value is an integer in [-12, 12], looked up per
// nibble with byte permutes (~1.6 ops per weight). Their staged x is in natural order
// (INT8_NATURAL: byte k of the chunk's 8 words is x[k]); affine's pairs each word's
// low and high nibbles with separate words (see int8_chunk in gemv.cu).
#if (QMODE == MODE_AFFINE && QBITS == 4 || QMODE == MODE_NVFP4 || QMODE == MODE_MXFP4) && !defined(ACT_F32)
#define INT8_ACT 1
#else
#define INT8_ACT 0
#endif
#define INT8_NATURAL (INT8_ACT && QMODE != MODE_AFFINE)

__device__ __forceinline__ int dp4a(int a, int b, int c) {
  int d;
  asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// One weight matrix [rows, cols] (for stacked experts: [E*rows_per_expert, cols]).
struct QW {
  const unsigned char* w;  // packed codes, rows * cols * QBITS / 8 bytes
  const unsigned char* s;  // scales: dtype QSDT (affine) or one byte (fp modes)
  const unsigned char* b;  // affine biases (same dtype as scales)
  int rows, cols, group;
  float gmul;  // nvfp4: global_scale / (448*6); else 1
};

// Routing parameters (Qwen softmax, or DeepSeek-V3/GLM-4.5 sigmoid + bias + groups).
struct Routing {
  const float* bias;  // e_score_correction_bias [E] or null
  int n_experts, k, sigmoid, norm, n_group, topk_group;
  float scale;  // routed_scaling_factor (1 for Qwen)
};

// Field-wise select, so that choosing between two weight parameters stays in registers
// (a reference to a kernel parameter would force a stack copy).
__device__ __forceinline__ QW pick(bool a, const QW& x, const QW& y) {
  QW r;
  r.w = a ? x.w : y.w; r.s = a ? x.s : y.s; r.b = a ? x.b : y.b;
  r.rows = a ? x.rows : y.rows; r.cols = a ? x.cols : y.cols; r.group = a ? x.group : y.group;
  r.gmul = a ? x.gmul : y.gmul;
  return r;
}

__device__ __forceinline__ u32 shl_signed(u32 x, int s) { return s >= 0 ? (x << s) : (x >> -s); }

// Weight loads: streamed from global memory past L1, or (W_SMEM, the streaming decode
// kernel in decode.cu) from shared memory where bulk copies staged them.
#ifdef W_SMEM
#define LDW16(p) (*(const uint4*)(p))
#define LDW8(p) (*(const uint2*)(p))
#define LDW4(p) (*(const u32*)(p))
#define LDS(p) (*(p))
#else
#define LDW16(p) ld_stream_v4(p)
#define LDW8(p) ld_stream_v2(p)
#define LDW4(p) ld_stream_u32(p)
#define LDS(p) __ldg(p)
#endif

__device__ __forceinline__ void load_chunk(const unsigned char* p, u32 (&w)[CHUNK_WORDS]) {
#if CHUNK_WORDS % 4 == 0
#pragma unroll
  for (int i = 0; i < CHUNK_WORDS / 4; i++) {
    uint4 v = LDW16(p + 16 * i);
    w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
  }
#elif CHUNK_WORDS % 2 == 0
#pragma unroll
  for (int i = 0; i < CHUNK_WORDS / 2; i++) {
    uint2 v = LDW8(p + 8 * i);
    w[2 * i] = v.x; w[2 * i + 1] = v.y;
  }
#else
#pragma unroll
  for (int i = 0; i < CHUNK_WORDS; i++) w[i] = LDW4(p + 4 * i);
#endif
}

// Weight j (0..31) of a chunk, in the module's pre-scaled form (see the header).
__device__ __forceinline__ float deq(const u32 (&w)[CHUNK_WORDS], int j) {
#if QMODE == MODE_AFFINE
  const int bit = j * QBITS, wi = bit >> 5, off = bit & 31, S = 23 - QBITS;
  u32 v;
  if (off + QBITS <= 32) {
    v = shl_signed(w[wi], S - off);
  } else {
    v = __funnelshift_r(w[wi], w[wi + 1 < CHUNK_WORDS ? wi + 1 : wi], off) << S;
  }
  return __uint_as_float((v & (((1u << QBITS) - 1u) << S)) | 0x3F800000u);
#elif QMODE == MODE_NVFP4 || QMODE == MODE_MXFP4
  const int off = (j & 7) * 4;
  const u32 x = w[j >> 3];
  return __uint_as_float((shl_signed(x, 22 - off) & 0x01C00000u) |
                         (shl_signed(x, 28 - off) & 0x80000000u));
#elif QMODE == MODE_MXFP8
  const int off = (j & 3) * 8;
  const u32 x = w[j >> 2];
  return __uint_as_float((shl_signed(x, 20 - off) & 0x07F00000u) |
                         (shl_signed(x, 24 - off) & 0x80000000u));
#elif QSDT == SDT_BF16
  const u32 x = w[j >> 1];
  return __uint_as_float((j & 1) ? (x & 0xFFFF0000u) : (x << 16));
#elif QSDT == SDT_F16
  const u32 x = w[j >> 1];
  return f16_to_f32((unsigned short)((j & 1) ? (x >> 16) : (x & 0xFFFFu)));
#else
  return __uint_as_float(w[j]);
#endif
}

// E4M3 as MLX decodes it (0x7F -> 480, no NaN); exact through the f32 subnormal range.
__device__ __forceinline__ float e4m3_f32(u32 b) {
  return __uint_as_float(((b & 0x80u) << 24) | ((b & 0x7Fu) << 20)) * 0x1p120f;
}
__device__ __forceinline__ float e8m0_f32(u32 b) {
  return b == 0 ? 0x1p-127f : __uint_as_float(b << 23);
}

// Eight E2M1 codes (one word, LSB-first) as twice their values in int8 (exact: 0, ±1,
// ±2, ±3, ±4, ±6, ±8, ±12): lo = codes 0..3, hi = codes 4..7. Per four codes two byte
// permutes look up the magnitude in the positive and the negative table, a third picks
// per byte by the sign bit (selector nibble k or k + 4).
__device__ __forceinline__ void fp4x8_i8(u32 w, u32& lo, u32& hi) {
  const u32 P0 = 0x03020100u, P1 = 0x0C080604u;  // 0, 1, 2, 3 | 4, 6, 8, 12
  const u32 N0 = 0xFDFEFF00u, N1 = 0xF4F8FAFCu;  // 0, -1, -2, -3 | -4, -6, -8, -12
  const u32 m = w & 0x77777777u;
  const u32 s = ((w >> 1) & 0x44444444u) | 0x32103210u;
  lo = __byte_perm(__byte_perm(P0, P1, m), __byte_perm(N0, N1, m), s);
  hi = __byte_perm(__byte_perm(P0, P1, m >> 16), __byte_perm(N0, N1, m >> 16), s >> 16);
}

__device__ __forceinline__ float f4c(const float4& v, int e) {
  return e == 0 ? v.x : (e == 1 ? v.y : (e == 2 ? v.z : v.w));
}

// Chunks each lane keeps in flight: ~64 bytes of weights per lane, so that enough
// loads are outstanding per SM to cover HBM latency (one 16-byte load per lane reached
// only ~40% of the read bandwidth on an H200).
#ifdef UNROLL_BYTES
#define UNROLL (UNROLL_BYTES / 4 / CHUNK_WORDS > 0 ? UNROLL_BYTES / 4 / CHUNK_WORDS : 1)
#else
#define UNROLL (16 / CHUNK_WORDS > 0 ? 16 / CHUNK_WORDS : 1)
#endif

// Raw scale (and bias) bits of the group(s) holding chunk c, loaded early with the weights.
struct SC {
  u32 a, b;
};
__device__ __forceinline__ SC load_scales(const QW& W, int row, int c) {
  SC r;
#if QMODE == MODE_AFFINE
  const size_t si = (size_t)row * (W.cols / W.group) + (c * 32) / W.group;
#if QSDT == SDT_F32
  r.a = LDS((const u32*)W.s + si); r.b = LDS((const u32*)W.b + si);
#else
  r.a = LDS((const unsigned short*)W.s + si); r.b = LDS((const unsigned short*)W.b + si);
#endif
#elif QMODE == MODE_NVFP4
  const size_t si = (size_t)row * (W.cols / 16) + 2 * c;
  r.a = LDS(W.s + si); r.b = LDS(W.s + si + 1);
#elif QMODE == MODE_MXFP4 || QMODE == MODE_MXFP8
  r.a = LDS(W.s + (size_t)row * (W.cols / 32) + c); r.b = 0;
#else
  r.a = 0; r.b = 0;
#endif
  return r;
}
__device__ __forceinline__ float sdt_bits(u32 v) {
#if QSDT == SDT_F32
  return __uint_as_float(v);
#elif QSDT == SDT_F16
  return f16_to_f32((unsigned short)v);
#else
  return bf16_to_f32((unsigned short)v);
#endif
}

// One chunk's dot product from its raw f32 accumulators: undo the dequant offsets and
// apply the group scale(s). a0: all 32 weights (nvfp4: the first 16), a1: nvfp4's second
// 16; X: the chunk's sum of x (affine).
__device__ __forceinline__ float chunk_finish(const QW& W, SC sc, float a0, float a1, float X) {
#if QMODE == MODE_AFFINE
  const float s = sdt_bits(sc.a) * (float)(1u << QBITS), b = sdt_bits(sc.b);
  return s * (a0 - X) + b * X;
#elif QMODE == MODE_NVFP4
  return (a0 * 0x1p26f) * (e4m3_f32(sc.a) * W.gmul) + (a1 * 0x1p26f) * (e4m3_f32(sc.b) * W.gmul);
#elif QMODE == MODE_MXFP4 || QMODE == MODE_MXFP8
  return (a0 * (QMODE == MODE_MXFP4 ? 0x1p26f : 0x1p20f)) * e8m0_f32(sc.a);
#else
  return a0;
#endif
}

