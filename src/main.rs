//! The `vitrine` command: ingest a catalogue, serve it over gRPC, query it, run the demo.

use std::process::ExitCode;

use vitrine::cli;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cli::error_report(&e));
            ExitCode::FAILURE
        }
    }
}
