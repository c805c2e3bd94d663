//! ao-gpu-worker: parse the command line and run it; everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match ao_gpu_worker::cli::Cli::try_parse() {
        Ok(cli) => ao_gpu_worker::cli::main(cli),
        // `verify` reserves 2 for "cannot verify": its usage errors exit 64 (EX_USAGE).
        Err(e) if e.use_stderr() && std::env::args().nth(1).as_deref() == Some("verify") => {
            let _ = e.print();
            ExitCode::from(ao_gpu_worker::cli::verify::EXIT_USAGE)
        }
        Err(e) => e.exit(),
    }
}
