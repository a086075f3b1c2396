//! CI proof without a GPU: every kernel module compiles with NVRTC for Hopper (sm_90a),
//! Ada (sm_89) and Ampere (sm_80). NVRTC comes from the `nvidia-cuda-nvrtc` wheel
//! (tests/oracle/requirements-cuda.txt, installed into .venv by scripts/setup-oracle)
//! or from ROOFTOP_NVRTC; if it cannot be found this test fails, it does not skip.

use rooftop_cuda::nvrtc::{compile, ensure_nvrtc, ModuleSource};

#[test]
fn every_kernel_compiles_for_sm90a_sm89_sm80() {
    if let Err(e) = ensure_nvrtc() {
        panic!("{e}");
    }
    let modules = ModuleSource::all();
    let jobs: Vec<(ModuleSource, &'static str)> = ["compute_90a", "compute_89", "compute_80"]
        .iter()
        .flat_map(|a| modules.iter().map(move |m| (m.clone(), *a)))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let chunks: Vec<Vec<_>> = (0..threads)
        .map(|t| jobs.iter().skip(t).step_by(threads).cloned().collect())
        .collect();
    let failures: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = chunks
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    c.into_iter()
                        .filter_map(|(m, a)| match compile(&m, a, false) {
                            Ok(ptx) if ptx.contains(".entry") => None,
                            Ok(_) => Some(format!("{} {a}: PTX has no kernels", m.name)),
                            Err(e) => Some(e.to_string()),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(jobs.len(), 3 * modules.len());
}

#[test]
fn gemv_modules_export_every_kernel() {
    ensure_nvrtc().unwrap_or_else(|e| panic!("{e}"));
    let m = ModuleSource::all()
        .into_iter()
        .find(|m| m.name == "gemv_affine4_bf16")
        .unwrap();
    let ptx = compile(&m, "compute_90a", false).unwrap();
    for k in [
        "gemv1",
        "gemv2",
        "gemv4",
        "gemv8",
        "moe_router",
        "moe_gate_up",
        "moe_down",
        "gemv1_epi",
        "gemv_pre",
        "gemv8_epi",
        "embed_row",
        "embed_rows",
        "moe_route_n",
        "moe_gate_up_n",
        "moe_down_n",
    ] {
        assert!(ptx.contains(&format!(".entry {k}(")), "{k} missing");
    }
    // Weights are streamed with 16-byte loads past L1, or (gemv_pre) copied into shared
    // memory with 16-byte asynchronous copies.
    assert!(ptx.contains("ld.global.nc.L1::no_allocate.L2::256B.v4.u32"));
    assert!(ptx.contains("cp.async.cg.shared.global"));
    // ROOFTOP_DUMP_PTX=DIR keeps the PTX, for `ptxas -v` (registers, spills).
    if let Ok(dir) = std::env::var("ROOFTOP_DUMP_PTX") {
        std::fs::write(format!("{dir}/{}.ptx", m.name), &ptx).unwrap();
    }
}

#[test]
fn stream_module_has_the_bulk_copy_decode_kernel() {
    ensure_nvrtc().unwrap_or_else(|e| panic!("{e}"));
    let m = ModuleSource::all()
        .into_iter()
        .find(|m| m.name == "stream_affine4_bf16")
        .unwrap();
    let ptx = compile(&m, "compute_90a", false).unwrap();
    assert!(ptx.contains(".entry decode_layers("));
    // Weights reach shared memory by bulk copies completing on mbarriers, and the
    // chunk loaders read them there (no streaming global loads in the kernel).
    assert!(ptx.contains("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"));
    assert!(ptx.contains("mbarrier.try_wait.parity"));
    let body = &ptx[ptx.find(".entry decode_layers(").unwrap()..];
    assert!(!body.contains("ld.global.nc.L1::no_allocate"));
}

#[test]
fn mega_module_has_the_barrier_decode_kernel() {
    ensure_nvrtc().unwrap_or_else(|e| panic!("{e}"));
    for name in ["mega_affine4_bf16", "mega_nvfp4", "mega_dense_bf16"] {
        let m = ModuleSource::all()
            .into_iter()
            .find(|m| m.name == name)
            .unwrap();
        let ptx = compile(&m, "compute_90a", false).unwrap();
        let body = &ptx[ptx.find(".entry mega_layers(").expect(name)..];
        // Ops meet at grid barriers (release arrivals, relaxed polls, one acquire fence);
        // weights reach shared memory by bulk copies completing on mbarriers, and the
        // chunk loaders read them there (no streaming global loads).
        assert!(body.contains("red.release.gpu.global.add.u32"), "{name}");
        assert!(body.contains("ld.relaxed.gpu.global.u32"), "{name}");
        assert!(body.contains("fence.acq_rel.gpu"), "{name}");
        assert!(
            body.contains("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"),
            "{name}"
        );
        assert!(body.contains("mbarrier.try_wait.parity"), "{name}");
        assert!(!body.contains("ld.global.nc.L1::no_allocate"), "{name}");
    }
}

#[test]
fn ops_module_has_decode_and_prefill_chunk_kernels() {
    ensure_nvrtc().unwrap_or_else(|e| panic!("{e}"));
    let m = ModuleSource::ops();
    let ptx = compile(&m, "compute_90a", false).unwrap();
    if let Ok(dir) = std::env::var("ROOFTOP_DUMP_PTX") {
        std::fs::write(format!("{dir}/ops.ptx"), &ptx).unwrap();
    }
    for k in [
        "qkv_post",
        "qkv_post_n",
        "attn_partial",
        "attn_partial_n",
        "attn_decode",
        "attn_group",
        "attn_combine",
        "attn_combine_n",
        "argmax_step",
        "advance_pos",
    ] {
        assert!(ptx.contains(&format!(".entry {k}(")), "{k} missing");
    }
}

/// The prefill GEMM runs on tensor cores in every format (an `mma` in its PTX for the
/// oldest target too), and the ops it needs are exported.
#[test]
fn mma_modules_use_tensor_cores() {
    ensure_nvrtc().unwrap_or_else(|e| panic!("{e}"));
    for name in [
        "mma_affine4_bf16",
        "mma_affine3_f16",
        "mma_nvfp4",
        "mma_mxfp8",
        "mma_dense_f32",
    ] {
        let m = ModuleSource::all()
            .into_iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no module {name}"));
        for arch in ["compute_80", "compute_90a"] {
            let ptx = compile(&m, arch, false).unwrap();
            if let Some(dir) = std::env::var_os("ROOFTOP_DUMP_PTX") {
                let p = std::path::Path::new(&dir).join(format!("{name}_{arch}.ptx"));
                std::fs::write(p, &ptx).unwrap();
            }
            assert!(ptx.contains(".entry tc_gemm("), "{name} {arch}");
            assert!(ptx.contains("mma.sync.aligned.m16n8k16"), "{name} {arch}");
            assert!(ptx.contains("ldmatrix"), "{name} {arch}");
        }
    }
    let ops = ModuleSource::ops();
    let ptx = compile(&ops, "compute_80", false).unwrap();
    for k in [
        "rows_bf16",
        "moe_sort",
        "attn_prefill_32",
        "attn_prefill_64",
        "attn_prefill_128",
    ] {
        assert!(ptx.contains(&format!(".entry {k}")), "ops lacks {k}");
    }
}
