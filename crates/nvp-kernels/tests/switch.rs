//! The global fast-path switch (own test binary: the switch is process-wide).

use candle_core::{Device, Tensor};
use nvp_kernels::{conv2d_3x3, fast_cpu_enabled, set_fast_cpu, uses_fast_path};

#[test]
fn switch_selects_the_path_and_results_agree() {
    let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 5.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3, 4, 5))
        .unwrap()
        .affine(0.01, -0.5)
        .unwrap();
    let w = Tensor::arange(0f32, 2.0 * 27.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3, 3, 3))
        .unwrap()
        .affine(0.02, -0.4)
        .unwrap();
    let b = Tensor::new(&[0.25f32, -0.5], &Device::Cpu).unwrap();

    let env_off = std::env::var("NVP_FAST_CPU").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "off" | "no"
        )
    });
    assert_eq!(fast_cpu_enabled(), !env_off);

    set_fast_cpu(true);
    assert!(fast_cpu_enabled() && uses_fast_path(&x, &w, Some(&b)));
    let fast = conv2d_3x3(&x, &w, Some(&b)).unwrap();

    set_fast_cpu(false);
    assert!(!fast_cpu_enabled() && !uses_fast_path(&x, &w, Some(&b)));
    let slow = conv2d_3x3(&x, &w, Some(&b)).unwrap();
    set_fast_cpu(true);

    let diff = (&fast - &slow)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = slow
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff <= 1e-5 * scale, "diff {diff} scale {scale}");
}
