//! Benchmark of the 3×3 convolution: forward and forward + backward medians, the fast
//! CPU path of `nvp_kernels::conv2d_3x3` against candle's own `conv2d` (+ bias), with
//! the fast path's parts (forward op, input-gradient op, weight-gradient op) timed
//! alone. Runs are interleaved (fast, reference, fast, ...) because the machine's speed
//! drifts.
//!
//! Usage: `conv_bench [--reps N] [--ref-reps N] [--no-ref] [--shape N,C,K,H,W]...
//! [--tile BYTES] [--tile-wgrad BYTES] [--no-split] [--no-winograd] [--wino-block BYTES]
//! [--wgrad-factor F] [--wgrad-always] [--no-avx512] [--bf16]` (default shapes: 64,64,64,32,32;
//! 64,128,128,16,16; 64,32,64,32,32; the other flags set the hidden tuning knobs; `--no-avx512`:
//! the AVX2 compilation of the Winograd blocks also where the CPU has AVX-512; `--bf16`: bf16
//! products, where the CPU has AVX512-BF16).

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use nvp_kernels::{
    conv2d_3x3, conv2d_3x3_reference, Conv3x3Bias, Conv3x3GradInput, Conv3x3GradWeight,
};

type ConvFn = fn(&Tensor, &Tensor, Option<&Tensor>) -> candle_core::Result<Tensor>;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift; no RNG dependency).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(dims: &[usize], seed: u64, scale: f32) -> Tensor {
    let len = dims.iter().product();
    let v: Vec<f32> = values(len, seed).into_iter().map(|x| x * scale).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor")
}

fn time_ms(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

struct Inputs {
    x: Var,
    w: Var,
    b: Var,
}

fn fwd(conv: ConvFn, i: &Inputs) -> Tensor {
    conv(i.x.as_tensor(), i.w.as_tensor(), Some(i.b.as_tensor())).expect("forward")
}

fn fwd_bwd(conv: ConvFn, i: &Inputs) {
    let y = fwd(conv, i);
    // Seeds the backward pass with dy = 1 (no extra loss ops to time).
    let g = y.backward().expect("backward");
    assert!(g.get(i.x.as_tensor()).is_some() && g.get(i.w.as_tensor()).is_some());
}

fn run_shape(n: usize, c: usize, k: usize, h: usize, w: usize, reps: usize, ref_reps: usize) {
    let inputs = Inputs {
        x: Var::from_tensor(&tensor(&[n, c, h, w], 1, 1.0)).expect("x"),
        w: Var::from_tensor(&tensor(&[k, c, 3, 3], 2, 1.0 / (9.0 * c as f32).sqrt())).expect("w"),
        b: Var::from_tensor(&tensor(&[k], 3, 0.1)).expect("b"),
    };
    let dy = tensor(&[n, k, h, w], 4, 1.0);
    let gflop = 2.0 * (n * k * c * 9 * h * w) as f64 / 1e9;

    // Warm-up (thread pool, scratch buffers, page faults of the first allocations).
    fwd_bwd(conv2d_3x3, &inputs);
    if ref_reps > 0 {
        fwd(conv2d_3x3_reference, &inputs);
    }

    let (mut f_fwd, mut f_all, mut r_fwd, mut r_all) = (vec![], vec![], vec![], vec![]);
    let (mut p_fwd, mut p_dx, mut p_dw) = (vec![], vec![], vec![]);
    let (x, wt, b) = (
        inputs.x.as_tensor(),
        inputs.w.as_tensor(),
        inputs.b.as_tensor(),
    );
    for rep in 0..reps {
        f_fwd.push(time_ms(|| drop(fwd(conv2d_3x3, &inputs))));
        if rep < ref_reps {
            r_fwd.push(time_ms(|| drop(fwd(conv2d_3x3_reference, &inputs))));
        }
        f_all.push(time_ms(|| fwd_bwd(conv2d_3x3, &inputs)));
        if rep < ref_reps {
            r_all.push(time_ms(|| fwd_bwd(conv2d_3x3_reference, &inputs)));
        }
        p_fwd.push(time_ms(|| {
            drop(x.apply_op3_no_bwd(wt, b, &Conv3x3Bias).expect("op"))
        }));
        p_dx.push(time_ms(|| {
            drop(dy.apply_op2_no_bwd(wt, &Conv3x3GradInput).expect("op"))
        }));
        p_dw.push(time_ms(|| {
            drop(x.apply_op2_no_bwd(&dy, &Conv3x3GradWeight).expect("op"))
        }));
    }
    let row = |name: &str, v: &mut Vec<f64>, flop: f64| {
        if !v.is_empty() {
            let m = median(v);
            println!("  {name:<28} {m:9.2} ms  {:7.1} GFLOP/s", flop / (m / 1e3));
        }
    };
    println!("shape (N={n}, Cin={c}, Cout={k}, H={h}, W={w}), {gflop:.2} GFLOP per conv");
    row("fast forward", &mut f_fwd, gflop);
    row("candle forward", &mut r_fwd, gflop);
    row("fast forward+backward", &mut f_all, 3.0 * gflop);
    row("candle forward+backward", &mut r_all, 3.0 * gflop);
    row("  op: forward (bias)", &mut p_fwd, gflop);
    row("  op: input gradient", &mut p_dx, gflop);
    row("  op: weight gradient", &mut p_dw, gflop);
    if !r_fwd.is_empty() {
        println!(
            "  speed-up: forward {:.2}x, forward+backward {:.2}x",
            median(&mut r_fwd) / median(&mut f_fwd),
            median(&mut r_all) / median(&mut f_all)
        );
    }
}

pub fn main() {
    let mut reps = 9;
    let mut ref_reps = 5;
    let mut shapes: Vec<[usize; 5]> = Vec::new();
    // Held to the end of `main`: the switch is per thread, and the ops run on this one.
    let mut bf16_scope = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).expect("--reps N"),
            "--ref-reps" => {
                ref_reps = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--ref-reps N")
            }
            "--no-ref" => ref_reps = 0,
            "--shape" => {
                let s = args.next().expect("--shape N,C,K,H,W");
                let v: Vec<usize> = s
                    .split(',')
                    .map(|t| t.trim().parse().expect("number"))
                    .collect();
                shapes.push(v.try_into().expect("five numbers: N,C,K,H,W"));
            }
            "--wino-block" => {
                let b = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--wino-block BYTES");
                nvp_kernels::tuning::set_winograd_block_bytes(b);
            }
            "--wgrad-factor" => {
                let f = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--wgrad-factor F");
                nvp_kernels::tuning::set_winograd_wgrad_factor(f);
            }
            "--no-winograd" => nvp_kernels::tuning::set_winograd(false),
            "--no-avx512" => nvp_kernels::tuning::set_winograd_avx512(false),
            "--bf16" => bf16_scope.push(nvp_kernels::Bf16Products::enable()),
            "--wgrad-always" => nvp_kernels::tuning::set_winograd_wgrad_always(true),
            "--tile" => {
                let b = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--tile BYTES");
                nvp_kernels::tuning::set_tile_bytes(b);
            }
            "--tile-wgrad" => {
                let b = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--tile-wgrad BYTES");
                nvp_kernels::tuning::set_tile_bytes_wgrad(b);
            }
            "--no-split" => nvp_kernels::tuning::set_batch_split(false),
            // Ignore the flags cargo bench passes to harness-less benches.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    if shapes.is_empty() {
        shapes = vec![
            [64, 64, 64, 32, 32],
            [64, 128, 128, 16, 16],
            [64, 32, 64, 32, 32],
        ];
    }
    let ref_reps = ref_reps.min(reps);
    println!(
        "conv3x3 bench: rayon threads {}, fast path {}, reps {reps} (reference {ref_reps})",
        nvp_kernels::num_threads(),
        nvp_kernels::fast_cpu_enabled()
    );
    for [n, c, k, h, w] in shapes {
        run_shape(n, c, k, h, w, reps, ref_reps);
    }
}
