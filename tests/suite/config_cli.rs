//! `vitrine serve`'s settings through the real binary: a config file, VITRINE_* variables and
//! flags in their precedence, `--print-config`, and errors that name the key and the file.

use std::path::Path;
use std::process::{Command, Output};

fn serve(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vitrine"));
    cmd.arg("serve").args(args);
    // Only the variables the test sets.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("VITRINE_")) {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, body: &str) -> String {
    let path = dir.join("vitrine.toml");
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

#[test]
fn print_config_shows_the_effective_settings_with_their_sources() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "data-dir = \"/srv/v\"\nlisten = \"127.0.0.1:7001\"\nseal_items = 10\n");
    let env = [("VITRINE_LISTEN", "127.0.0.1:7002"), ("VITRINE_LOG_FORMAT", "json")];
    let out = serve(&["--config", &file, "--seal-items", "20", "--print-config"], &env);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));
    for line in [
        "data_dir = \"/srv/v\" # config file",
        "listen = \"127.0.0.1:7002\" # VITRINE_LISTEN",
        "seal_items = 20 # command line",
        "log_format = \"json\" # VITRINE_LOG_FORMAT",
        "max_segments = 8 # default",
        "# metrics_listen is not set (VITRINE_METRICS_LISTEN)",
    ] {
        assert!(stdout.lines().any(|l| l == line), "no {line:?} in\n{stdout}");
    }
    // What it prints is a config file giving the same settings.
    let again = write(dir.path(), &stdout);
    let out = serve(&["--config", &again, "--print-config"], &[]);
    assert!(text(&out.stdout).contains("listen = \"127.0.0.1:7002\" # config file"), "{}", text(&out.stdout));
}

#[test]
fn bad_settings_stop_serve_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "data_dir = \"/srv/v\"\nlisten-address = \"x\"\n");
    let out = serve(&["--config", &file], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("unknown key `listen-address` in config file {file}")), "{err}");

    let file = write(dir.path(), "data_dir = \"/srv/v\"\nmax_segments = \"eight\"\n");
    let err = text(&serve(&["--config", &file], &[]).stderr);
    assert!(err.contains("key `max_segments`") && err.contains(&file) && err.contains("eight"), "{err}");

    let err = text(&serve(&["--data-dir", "/srv/v"], &[("VITRINE_LOG_FORMAT", "xml")]).stderr);
    assert!(err.contains("VITRINE_LOG_FORMAT") && err.contains("xml"), "{err}");

    // Without a data directory anywhere, clap's own error (exit 2).
    let out = serve(&[], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--data-dir"), "{}", text(&out.stderr));
}

/// `--print-config` makes the checks `serve` makes before it opens anything: a setting serve
/// refuses is not reported as fine, and serve refuses it before creating the data directory.
#[test]
fn print_config_fails_where_serve_would() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_line = format!("data_dir = {:?}\n", data.display().to_string());
    for (body, want) in [
        ("listen = 5\n", "key `listen` in config file"),
        ("listen = \"localhost\"\n", "is not HOST:PORT"),
        ("max_concurrent_searches = 0\n", "search concurrency must be at least 1"),
        ("guardrail_max_p99_ratio = nan\n", "max_p99_ratio is NaN"),
    ] {
        let file = write(dir.path(), &format!("{data_line}{body}"));
        let out = serve(&["--config", &file, "--print-config"], &[]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{body}: {err}");
        assert!(err.contains("would refuse") && err.contains(want), "{body}: {err}");
        let out = serve(&["--config", &file], &[]);
        assert_eq!(out.status.code(), Some(1), "{body}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(want), "{body}: {}", text(&out.stderr));
        assert!(!data.exists(), "{body}: serve created the data directory before refusing");
    }
}

#[test]
fn search_k_out_of_range_is_a_usage_error() {
    for k in ["0", "1001"] {
        let out = Command::new(env!("CARGO_BIN_EXE_vitrine"))
            .args(["search", "--addr", "127.0.0.1:9", "--sku", "X", "-k", k])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "-k {k}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("1..=1000"), "-k {k}: {}", text(&out.stderr));
    }
}
