//! The `crypt-vfio` command: measure throughput; find, bind, inspect and self-test devices;
//! serve volumes over NBD.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crypt-vfio: {e:#}");
            ExitCode::FAILURE
        }
    }
}
