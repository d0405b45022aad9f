//! The `vitrine` command: ingest a catalogue, serve it over gRPC, query it, run the demo.

use std::process::ExitCode;

use vitrine::cli;

fn main() -> ExitCode {
    quiet_when_stdout_closes();
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cli::error_report(&e));
            ExitCode::FAILURE
        }
    }
}

/// A reader that stops early (`vitrine search ... | head`) closes the pipe, and `println!`
/// then panics (Rust ignores SIGPIPE). Stop quietly instead, with the status of a command that
/// SIGPIPE ended (128 + 13), as other Unix tools do.
fn quiet_when_stdout_closes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("os error 32") {
            std::process::exit(141);
        }
        default(info);
    }));
}
