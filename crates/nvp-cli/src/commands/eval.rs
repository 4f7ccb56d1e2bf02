//! `nvp eval`: bits/dim of a checkpoint on a split, in evaluation mode, with
//! its standard error (the paper's Table 1 metric).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use nvp_data::{Loader, LoaderConfig, Prefix};

use crate::cli::EvalArgs;
use crate::engine;

pub fn run(a: EvalArgs) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let split = super::parse_split(&a.split)?;
    let mut l = super::load(&a.ckpt, a.device.as_deref())?;
    if let Some(d) = &a.data {
        l.settings.data.path = Some(d.clone());
    }
    let mut set = crate::data::open(&l.settings, split)?;
    if let Some(n) = a.limit {
        if n == 0 {
            bail!("--limit must be at least 1");
        }
        set = Arc::new(Prefix::new(set, n));
    }
    let n = set.len();
    let mut cfg = LoaderConfig::eval(a.batch, a.seed);
    cfg.alpha = l.settings.data.alpha;
    cfg.device = l.device.clone();
    let loader = Loader::from_source(set, cfg)?;
    let t0 = Instant::now();
    // --classify scores the images under every class, their own included: those scores
    // are the evaluation's bits/dim, not computed a second time.
    let (bpd, classified) = if a.classify {
        let mut c = engine::evaluate_classified(&l.model, loader.eval_batches()?)?;
        (std::mem::take(&mut c.conditional), Some(c))
    } else {
        (engine::evaluate(&l.model, loader.eval_batches()?)?, None)
    };
    let secs = t0.elapsed().as_secs_f64();
    let weights = l
        .weights
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (mean, se) = nvp_flow::bits::mean_and_stderr(&bpd);
    let inv = if a.check_inverse {
        Some(engine::inverse_error(&l.model, loader.eval_batches()?)?)
    } else {
        None
    };
    let num = |v: f64| {
        if v.is_finite() {
            v.to_string()
        } else {
            "null".into()
        }
    };
    // (marginal bits/dim, its standard error, accuracy) of --classify
    let cls = classified.as_ref().map(|c| {
        let (m, mse) = nvp_flow::bits::mean_and_stderr(&c.marginal);
        (m, mse, c.correct as f64 / n as f64)
    });
    if a.json {
        println!(
            "{{\"split\":\"{}\",\"images\":{n},\"bpd\":{},\"stderr\":{},\"seconds\":{secs:.3},\"img_per_s\":{:.3},\"weights\":\"{weights}\"{}{}}}",
            a.split,
            num(mean),
            num(se),
            n as f64 / secs,
            inv.map(|e| format!(",\"inverse_max_abs_error\":{e:e}")).unwrap_or_default(),
            cls.map(|(m, mse, acc)| format!(
                ",\"marginal_bpd\":{},\"marginal_stderr\":{},\"accuracy\":{acc}",
                num(m),
                num(mse)
            ))
            .unwrap_or_default()
        );
    } else {
        println!(
            "{} bits/dim: {mean:.5} ± {se:.5} (standard error, {n} images, {:.1} img/s; weights {weights})",
            a.split,
            n as f64 / secs
        );
        if let Some(e) = inv {
            println!("inverse: max |f⁻¹(f(y)) − y| = {e:.3e} (logit space)");
        }
        if let Some((m, mse, acc)) = cls {
            println!(
                "marginal p(x) = Σ_y p(x | y) / {}: {m:.5} ± {mse:.5} bits/dim; \
                 classification by argmax_y p(x | y): {:.2} % correct",
                l.settings.model.classes,
                100.0 * acc
            );
        }
    }
    Ok(())
}
