//! Bits per dimension.
//!
//! For 8-bit images dequantised to `x ∈ [0, 256)^D`, the model density
//! `p(x)` (in pixel units, i.e. including every preprocessing log-det such as
//! the `1/256` scaling and the logit) bounds the probability of the discrete
//! image, and `bits/dim = −log p(x) / (D · ln 2)`.

use std::f64::consts::LN_2;

/// Bits per dimension of a log-density (nats) over `dims` dimensions.
pub fn bits_per_dim(log_p: f64, dims: usize) -> f64 {
    -log_p / (dims as f64 * LN_2)
}

/// Mean and standard error of the mean of per-sample bits/dim.
pub fn mean_and_stderr(bpd: &[f64]) -> (f64, f64) {
    let n = bpd.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = bpd.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = bpd.iter().map(|b| (b - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}
