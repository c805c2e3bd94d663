//! ao-gpu-worker: parse the command line and run it; everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    ao_gpu_worker::cli::main(ao_gpu_worker::cli::Cli::parse())
}
