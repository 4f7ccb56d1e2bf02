//! `nvp` — the command-line face of the Real NVP crates.

mod checkpoint;
mod cli;
mod commands;
mod data;
mod engine;
mod model;
mod report;
mod settings;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    if let Err(e) = commands::run(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
