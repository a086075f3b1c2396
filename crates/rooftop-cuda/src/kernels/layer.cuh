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
