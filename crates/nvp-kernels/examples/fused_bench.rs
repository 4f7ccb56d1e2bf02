//! Times the fused batch-norm (+ ReLU) and coupling ops against candle's own ops,
//! forward + backward, f32 CPU, at the `cifar10-small` sizes: median ms of 7.
//!
//! `cargo run --release -p nvp-kernels --example fused_bench`

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use nvp_kernels::{batch_norm, batch_norm_reference, coupling, coupling_reference};

fn median_ms(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut v = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[3])
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, 32, 32, 32), &dev)?)?;
    let w = Var::ones(32, candle_core::DType::F32, &dev)?;
    let b = Var::zeros(32, candle_core::DType::F32, &dev)?;
    let r = Tensor::randn(0f32, 1.0, (64, 32, 32, 32), &dev)?;
    let aff = Some((w.as_tensor(), b.as_tensor()));
    let bn = |fast: bool, fused_relu: bool| -> Result<()> {
        let y = if fast {
            let o = batch_norm(&x, aff, None, 1e-5, fused_relu, false)?;
            if fused_relu {
                o.y
            } else {
                o.y.relu()?
            }
        } else {
            batch_norm_reference(&x, aff, None, 1e-5, true)?.y
        };
        (y * &r)?.sum_all()?.backward()?;
        Ok(())
    };
    println!("BN+ReLU train fwd+bwd (64,32,32,32):");
    println!(
        "  candle ops         {:8.1} ms",
        median_ms(|| bn(false, false))?
    );
    println!(
        "  fused BN, candle relu {:5.1} ms",
        median_ms(|| bn(true, false))?
    );
    println!(
        "  fused BN+ReLU      {:8.1} ms",
        median_ms(|| bn(true, true))?
    );

    let xc = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, 3, 32, 32), &dev)?)?;
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, 6, 32, 32), &dev)?)?;
    let sc = Var::ones((1, 3, 1, 1), candle_core::DType::F32, &dev)?;
    let mv: Vec<f32> = (0..3 * 32 * 32)
        .map(|i| ((i + i / 32) % 2) as f32)
        .collect();
    let mask = Tensor::from_vec(mv, (1, 3, 32, 32), &dev)?;
    let rc = Tensor::randn(0f32, 1.0, (64, 3, 32, 32), &dev)?;
    let cp = |fast: bool| -> Result<()> {
        let (y, ld) = if fast {
            coupling(&xc, &h, &sc, &mask)?
        } else {
            coupling_reference(&xc, &h, &sc, &mask)?
        };
        ((y * &rc)?.sum_all()? + ld.sum_all()?)?.backward()?;
        Ok(())
    };
    println!("coupling fwd+bwd (64,3,32,32):");
    println!("  candle ops         {:8.1} ms", median_ms(|| cp(false))?);
    println!("  fused              {:8.1} ms", median_ms(|| cp(true))?);
    Ok(())
}
