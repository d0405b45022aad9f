//! The `vitrine` command: ingest a catalogue, serve it over gRPC, query it, run the demo.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cli::error_report(&e));
            ExitCode::FAILURE
        }
    }
}
