//! Bad input is a clear error naming what is wrong — never a panic or a silent result.

use rooftop_quant::{
    dequantize, quantize, QuantError, QuantMode, QuantSpec, QuantView, QuantizeOptions,
};

fn opts() -> QuantizeOptions {
    QuantizeOptions::default()
}

#[test]
fn nan_and_inf_name_tensor_row_and_column() {
    for (bad, what) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
    ] {
        let mut w = vec![0.5f32; 4 * 64];
        w[2 * 64 + 17] = bad;
        for spec in [
            QuantSpec::affine(4, 64).unwrap(),
            QuantSpec::nvfp4(),
            QuantSpec::mxfp8(),
        ] {
            let err =
                quantize("layers.3.mlp.down_proj.weight", &w, &[4, 64], spec, opts()).unwrap_err();
            match &err {
                QuantError::NonFinite {
                    tensor, row, col, ..
                } => {
                    assert_eq!(tensor, "layers.3.mlp.down_proj.weight");
                    assert_eq!((*row, *col), (2, 17), "{what}");
                }
                e => panic!("expected NonFinite, got {e}"),
            }
            let msg = err.to_string();
            assert!(
                msg.contains("layers.3.mlp.down_proj.weight") && msg.contains("row 2"),
                "{msg}"
            );
        }
    }
}

#[test]
fn shapes_that_do_not_fit_are_errors() {
    let w = vec![0.0f32; 2 * 96];
    let s64 = QuantSpec::affine(4, 64).unwrap();
    let e = quantize("w", &w, &[2, 96], s64, opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("96") && e.contains("64"), "{e}");
    let e = quantize("w", &w, &[192], QuantSpec::affine(4, 32).unwrap(), opts()).unwrap_err();
    assert!(e.to_string().contains("2 or more dimensions"), "{e}");
    let e = quantize("w", &w, &[4, 64], s64, opts()).unwrap_err();
    assert!(e.to_string().contains("192"), "{e}");
}

#[test]
fn invalid_specs_are_rejected() {
    for (mode, bits, g) in [
        (QuantMode::Affine, 7, 64),
        (QuantMode::Affine, 4, 16),
        (QuantMode::Affine, 9, 64),
        (QuantMode::Nvfp4, 4, 32),
        (QuantMode::Mxfp4, 8, 32),
        (QuantMode::Mxfp8, 8, 16),
    ] {
        let e = QuantSpec::new(mode, bits, g).unwrap_err();
        assert!(matches!(e, QuantError::Unsupported(_)), "{mode} {bits} {g}");
    }
    assert!("fp5".parse::<QuantMode>().is_err());
}

#[test]
fn global_scale_only_for_nvfp4_and_must_be_positive() {
    let w = vec![0.1f32; 2 * 32];
    let o = |g| QuantizeOptions {
        global_scale: Some(g),
        ..Default::default()
    };
    assert!(quantize("w", &w, &[2, 32], QuantSpec::mxfp4(), o(1.0)).is_err());
    assert!(quantize("w", &w, &[2, 32], QuantSpec::nvfp4(), o(-1.0)).is_err());
    assert!(quantize("w", &w, &[2, 32], QuantSpec::nvfp4(), o(f32::NAN)).is_err());
    assert!(quantize("w", &w, &[2, 32], QuantSpec::nvfp4(), o(2.0)).is_ok());
}

#[test]
fn truncated_buffers_are_rejected_before_reading() {
    let w: Vec<f32> = (0..4 * 64).map(|i| i as f32 / 100.0).collect();
    let q = quantize("w", &w, &[4, 64], QuantSpec::affine(3, 64).unwrap(), opts()).unwrap();
    let v = q.view();
    let short_w = QuantView {
        weight: &v.weight[..v.weight.len() - 4],
        ..v
    };
    assert!(matches!(
        dequantize::<f32>(&short_w),
        Err(QuantError::Shape(_))
    ));
    let short_s = QuantView {
        scales: &v.scales[..2],
        ..v
    };
    assert!(dequantize::<f32>(&short_s).is_err());
    let no_bias = QuantView { biases: None, ..v };
    assert!(dequantize::<f32>(&no_bias).is_err());
    let bad_cols = QuantView { cols: 60, ..v };
    assert!(dequantize::<f32>(&bad_cols).is_err());
}
