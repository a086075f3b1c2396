//! `rooftop bench --model` on an mlx-lm-made model: it runs the engine end to end, its
//! bytes per token (from the weight files) agree with the count from config.json
//! within 2% (issue 6), and int8 activations stay close to exact ones.

use rooftop_oracle::TempDir;
use std::path::Path;
use std::process::Command;

#[test]
fn bench_model_reports_bytes_speed_and_fidelity() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    let tmp = TempDir::new("cli-bench");
    let out = tmp.path().join("m");
    rooftop_oracle::run(
        "mlx_lm_model.py",
        &[Path::new("qwen3_moe"), &out, Path::new("affine4,nvfp4")],
    );
    for variant in ["affine4", "nvfp4", "hf"] {
        let o = Command::new(env!("CARGO_BIN_EXE_rooftop"))
            .args(["bench", "--json", "--fidelity", "--prompt-tokens", "16"])
            .args(["--gen-tokens", "4", "--bandwidth-mib", "16", "--model"])
            .arg(out.join(variant))
            .output()
            .expect("run rooftop");
        assert!(
            o.status.success(),
            "{variant}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let (got, want) = (
            r["bytes_per_token"].as_f64().unwrap(),
            r["bytes_per_token_config"].as_f64().unwrap(),
        );
        assert!(
            (got - want).abs() / want < 0.02,
            "{variant}: {got} bytes/token from the files vs {want} from the config"
        );
        assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0, "{variant}");
        let f = &r["fidelity"];
        let kl = f["kl_mean"].as_f64().unwrap();
        let top1 = f["top1_agree"].as_f64().unwrap();
        // Random tiny models have near-ties, so a few argmax flips are expected; a
        // wrong kernel gives KL of order 1.
        assert!(kl < 1e-2 && top1 >= 0.8, "{variant}: KL {kl}, top-1 {top1}");
        if variant == "hf" {
            // bf16 weights run f32 activations either way.
            assert_eq!(kl, 0.0, "dense weights must not change with the mode");
        }
    }
}
