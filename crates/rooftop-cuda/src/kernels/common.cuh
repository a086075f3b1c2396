// Shared helpers for every rooftop kernel. NVRTC-only: no standard headers; half and
// bfloat16 conversions are done with PTX so that cuda_fp16.h is not needed.
typedef unsigned int u32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Scale / dense element dtypes (DType order in rooftop_quant is irrelevant: these are ours).
#define SDT_F32 0
#define SDT_F16 1
#define SDT_BF16 2

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ unsigned short f32_to_f16(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
  return __uint_as_float(((u32)h) << 16);
}

// Streaming loads of weights: read once, so skip L1 (keeps activations resident there)
// and are not `volatile`, so the compiler may hoist several ahead of their first use;
// and ask L2 for 256-byte sectors (sm_80+).
__device__ __forceinline__ uint4 ld_stream_v4(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}
__device__ __forceinline__ uint2 ld_stream_v2(const void* p) {
  uint2 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];"
               : "=r"(r.x), "=r"(r.y)
               : "l"(p));
  return r;
}
__device__ __forceinline__ u32 ld_stream_u32(const void* p) {
  u32 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
}

__device__ __forceinline__ u64 globaltimer() {
  u64 t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// RoPE of element d < rot of a head: its frequency index and the element it rotates
// with (traditional: adjacent pairs; else the two halves), and the rotation itself.
struct RopePair {
  int i, partner;
  bool first;
};
__device__ __forceinline__ RopePair rope_pair(int d, int rot, int traditional) {
  RopePair r;
  if (traditional) { r.i = d >> 1; r.first = (d & 1) == 0; r.partner = r.first ? d + 1 : d - 1; }
  else { const int half = rot / 2; r.first = d < half; r.i = r.first ? d : d - half; r.partner = r.first ? d + half : d - half; }
  return r;
}
__device__ __forceinline__ float rope_rotate(float x, float other, float sn, float cs, bool first) {
  return first ? x * cs - other * sn : other * sn + x * cs;
}

// Dimension d of one head's attention output from its splits' partials ph[split] =
// (o[hd], m, l). Through L2 (`ld.cg`): where a split's last CTA merges, other CTAs
// wrote them in the same launch (ops.cu's merge_if_last, mega.cu).
__device__ __forceinline__ float merge_dim(const float* ph, int splits, int head_dim, int d) {
  float M = -INFINITY;
  for (int s = 0; s < splits; s++) M = fmaxf(M, __ldcg(ph + s * (head_dim + 2) + head_dim));
  float L = 0.f, acc = 0.f;
  for (int s = 0; s < splits; s++) {
    const float ms = __ldcg(ph + s * (head_dim + 2) + head_dim);
    if (ms == -INFINITY) continue;
    const float e = expf(ms - M);
    L += e * __ldcg(ph + s * (head_dim + 2) + head_dim + 1);
    acc += e * __ldcg(ph + s * (head_dim + 2) + d);
  }
  return acc / L;
}
__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

// Programmatic dependent launch (sm_90+). A kernel launched with programmatic stream
// serialization may start while the previous kernel drains: pdl_wait() blocks until that
// kernel has finished and its writes are visible; pdl_trigger() lets the next kernel
// start launching. Every kernel waits before touching memory an earlier kernel wrote
// and triggers only after waiting, so the chain stays ordered. No-ops on older GPUs and
// for ordinary launches.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Ask L2 to fetch [p, p+n): weights a kernel will read soon, so that HBM streams while
// the chain of small dependent steps (norm, staging, the previous kernel's tail) runs.
// Thread t of nt issues every nt-th 16 KB piece: one bulk prefetch each on sm_90+, line
// prefetches before. The range is widened to 16-byte alignment (allocations are
// 256-byte aligned, so this never leaves them).
__device__ __forceinline__ void prefetch_l2(const void* p, u64 n, int t, int nt) {
  if (p == nullptr || n == 0) return;
  const u64 a = (u64)p & ~15ull, end = ((u64)p + n + 15) & ~15ull;
#if __CUDA_ARCH__ >= 900
  const u64 piece = 16384;
  for (u64 o = a + (u64)t * piece; o < end; o += (u64)nt * piece) {
    const u32 sz = (u32)(end - o < piece ? end - o : piece);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(o), "r"(sz) : "memory");
  }
#else
  for (u64 o = (a & ~127ull) + (u64)t * 128; o < end; o += (u64)nt * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(o));
#endif
}

// Up to three byte ranges a kernel prefetches for the launch after it (its CTAs split
// them). Zero lengths are skipped.
struct Pf {
  const unsigned char* p[3];
  u64 n[3];
};
__device__ __forceinline__ void prefetch_next(const Pf& f) {
#if defined(PREFETCH) && PREFETCH == 0
  return;
#endif
  const int t = blockIdx.x * blockDim.x + threadIdx.x, nt = gridDim.x * blockDim.x;
#pragma unroll
  for (int i = 0; i < 3; i++) prefetch_l2(f.p[i], f.n[i], t, nt);
}

// A wait that should end in microseconds: after ~4 s it traps instead of hanging the
// GPU (the host sees a launch failure). Call with the spin count; t0 is its clock.
__device__ __forceinline__ void check_stuck(int i, u64& t0) {
  if (i == 64) t0 = globaltimer();
  if (i > 64 && (i & 255) == 0 && globaltimer() - t0 > 4000000000ull) __trap();
}

// ---- Tensor-core helpers (sm_80+: mma.cu's GEMM, ops.cu's prefill attention) -------
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ unsigned short f32_bf16(float f) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ u32 pack_f16(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
// Four 8x8 b16 matrices from shared memory (lane l gives a row address of matrix l/8);
// TRANS hands each lane a column pair instead of a row pair (B operands stored [k][n]).
template <bool TRANS = false>
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const void* p) {
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
// d += a · b on one m16n8k16 tile, f32 accumulate; BF16 picks bf16 inputs, else f16.
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  if (BF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#if __CUDA_ARCH__ >= 900
// ---- mbarriers and bulk copies (sm_90+: decode.cu, mega.cu) -----------------------
__device__ __forceinline__ u32 saddr(const void* p) {
  u64 a;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
  return (u32)a;
}
__device__ __forceinline__ void mb_init(u64* b, u32 n) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" ::"r"(saddr(b)), "r"(n) : "memory");
}
__device__ __forceinline__ void mb_expect(u64* b, u32 tx) {
  u64 st;
  asm volatile("mbarrier.arrive.expect_tx.shared.b64 %0, [%1], %2;" : "=l"(st) : "r"(saddr(b)), "r"(tx) : "memory");
}
__device__ __forceinline__ void mb_arrive(u64* b) {
  u64 st;
  asm volatile("mbarrier.arrive.shared.b64 %0, [%1];" : "=l"(st) : "r"(saddr(b)) : "memory");
}
__device__ __forceinline__ void mb_wait(u64* b, u32 parity) {
  u32 ok = 0;
  u64 t0 = 0;
  for (int i = 0;; i++) {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(ok)
        : "r"(saddr(b)), "r"(parity)
        : "memory");
    if (ok) return;
    check_stuck(i, t0);
  }
}
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, u32 n, u64* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   saddr(dst)),
               "l"(src), "r"(n), "r"(saddr(bar))
               : "memory");
}
// Raise the bytes the current phase of `b` waits for, without arriving (each bulk
// copy announces its own bytes just before it is issued).
__device__ __forceinline__ void mb_expect_tx(u64* b, u32 tx) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(saddr(b)), "r"(tx) : "memory");
}
#endif
