//! One module per subcommand.

mod bench;
mod eval;
mod interpolate;
mod sample;
mod train;

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::Device;
use nvp_data::Split;
use nvp_flow::{ParamStore, RealNvp};

use crate::cli::Command;
use crate::settings::{open_device, Settings};

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Interpolate(a) => interpolate::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// A trained model from `--ckpt`, its settings and its device.
pub(crate) struct Loaded {
    pub settings: Settings,
    pub device: Device,
    #[allow(dead_code)]
    pub store: ParamStore,
    pub model: RealNvp,
}

pub(crate) fn load(ckpt: &Path, device: Option<&str>) -> Result<Loaded> {
    let dir = crate::checkpoint::resolve(ckpt)?;
    let settings = crate::checkpoint::load_settings(&dir)?;
    let device = open_device(device.unwrap_or("cpu"))?;
    let (store, model) = crate::checkpoint::load_model(&dir, &settings, &device)?;
    Ok(Loaded {
        settings,
        device,
        store,
        model,
    })
}

pub(crate) fn parse_split(s: &str) -> Result<Split> {
    match s {
        "test" => Ok(Split::Test),
        "train" => Ok(Split::Train),
        _ => bail!("--split must be `test` or `train`, got `{s}`"),
    }
}
