// One decoder layer as the single-launch decode kernels (decode.cu, mega.cu) see it:
// every weight, norm and cache of the layer, field for field `LayerDesc` in
// persistent.rs. Needs gemv.cu's QW and Routing.
struct __align__(16) LayerDesc {  // 16: mega.cu bulk-copies one into shared memory
  QW qkv, o, router, gate, up, down, sg, su, sd;
  Routing rt;  // rt.k = 0: dense MLP (sg/su/sd), no router
  const float *attn_norm, *ffn_norm, *qkv_bias, *o_bias, *q_norm, *k_norm, *inv_freq;
  unsigned short *kc, *vc;
  float eps, qk_eps, mscale, scale;
  int heads, kv_heads, head_dim, rot, traditional, inter, inter_sh, pad;
};

// Row sizes of W in bytes: codes, scales, biases (0 where the format has none), as the
// single-launch kernels copy rows.
__device__ __forceinline__ u32 wrow_bytes(const QW& W) { return (u32)(W.cols / 32) * CHUNK_WORDS * 4; }
__device__ __forceinline__ u32 srow_bytes(const QW& W) {
#if QMODE == MODE_AFFINE
  return (u32)(W.cols / W.group) * (QSDT == SDT_F32 ? 4 : 2);
#elif QMODE == MODE_NVFP4
  return (u32)(W.cols / 16);
#elif QMODE == MODE_MXFP4 || QMODE == MODE_MXFP8
  return (u32)(W.cols / 32);
#else
  return 0;
#endif
}
__device__ __forceinline__ u32 brow_bytes(const QW& W) { return QMODE == MODE_AFFINE ? srow_bytes(W) : 0; }

// This CTA's contiguous share [a, b) of n items (rows * c / grid).
__device__ __forceinline__ void share(int n, int& a, int& b) {
  a = (int)((long long)n * blockIdx.x / gridDim.x);
  b = (int)((long long)n * (blockIdx.x + 1) / gridDim.x);
}
