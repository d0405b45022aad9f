//! TLS, bearer tokens and the client's manners, through the real `vitrine` binary: servers
//! started with `vitrine serve` (TLS from a CA generated here, a tokens file), clients run as
//! `vitrine info/search/upsert/...`, and their exit codes and stderr checked.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const WRITE_TOKEN: &str = "write-token-5d1c0e7f4a9b";
const READ_TOKEN: &str = "read-token-8e2f6a1b3c7d";
/// A bound on any one CLI run: it only catches hangs.
const NO_HANG: Duration = Duration::from_secs(60);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the CLI with `args` (no `VITRINE_TOKEN` unless `token_env`), killing it if it hangs.
fn vitrine_env(args: &[&str], token_env: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vitrine"));
    cmd.args(args)
        .env_remove("VITRINE_TOKEN")
        .env_remove("VITRINE_TOKENS_FILE")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(t) = token_env {
        cmd.env("VITRINE_TOKEN", t);
    }
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > NO_HANG {
            child.kill().unwrap();
            panic!("vitrine {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn vitrine(args: &[&str]) -> Output {
    vitrine_env(args, None)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> String {
    let o = vitrine(args);
    assert!(o.status.success(), "vitrine {args:?} failed:\n{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `args`, expects exit status 1 and returns stderr.
fn fails(args: &[&str]) -> String {
    let o = vitrine(args);
    assert_eq!(o.status.code(), Some(1), "vitrine {args:?}: {}\n{}", o.status, stderr(&o));
    stderr(&o)
}

/// A test CA and a server certificate it signed for `localhost` and 127.0.0.1, as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "vitrine test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let p = Pki { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key") };
    std::fs::write(&p.ca, ca_cert.pem()).unwrap();
    std::fs::write(&p.cert, cert.pem()).unwrap();
    std::fs::write(&p.key, key.serialize_pem()).unwrap();
    p
}

/// A `vitrine serve` process, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Serves an empty data directory on `listen` with `extra` flags; waits for its
    /// "vitrine serving" line and reads the port from it.
    fn start(listen: &str, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_vitrine"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", listen])
            .arg("--models")
            .arg(repo().join("models"))
            .args(extra)
            .env_remove("VITRINE_TOKENS_FILE")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,hnsw_rs=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("vitrine serving")) {
                let at = line.find("addr=").expect("addr= in the serving line") + 5;
                let addr = line[at..].split_whitespace().next().unwrap().parse().unwrap();
                return Server { child, addr, log, _dir: dir };
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the server exited at start ({status}):\n{text}");
            }
            assert!(started.elapsed() < Duration::from_secs(120), "the server did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A catalogue of one row, SKU T-2, in `dir/cat`.
fn one_row_catalog(dir: &Path) -> PathBuf {
    let cat = dir.join("cat");
    std::fs::create_dir(&cat).unwrap();
    std::fs::copy(repo().join("tests/fixtures/chelsea.png"), cat.join("chelsea.png")).unwrap();
    std::fs::write(cat.join("catalog.jsonl"), "{\"sku\": \"T-2\", \"image\": \"chelsea.png\"}\n").unwrap();
    cat.join("catalog.jsonl")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn tls_and_tokens_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "# role name token\nwrite deploy {WRITE_TOKEN}\nread web sha256:{}\n",
            hex(&Sha256::digest(READ_TOKEN))
        ),
    )
    .unwrap();
    let (cert, key, tokens_arg) =
        (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap(), tokens.to_str().unwrap());
    let server =
        Server::start("127.0.0.1:0", &["--tls-cert", cert, "--tls-key", key, "--tokens", tokens_arg]);
    let https = format!("https://localhost:{}", server.port());
    let ca = pki.ca.to_str().unwrap();
    let image = repo().join("tests/fixtures/coffee.png");
    let image = image.to_str().unwrap();
    let with = |token: &str, args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--addr", &https, "--ca", ca, "--token", token].map(str::to_string));
        v
    };
    let run_ok = |token: &str, args: &[&str]| {
        let v = with(token, args);
        ok(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let run_fails = |token: &str, args: &[&str]| {
        let v = with(token, args);
        fails(&v.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // The right token and role work over verified TLS.
    assert!(run_ok(WRITE_TOKEN, &["upsert", "--sku", "T-1", "--image", image]).contains("T-1: added"));
    let info = vitrine_env(&["info", "--json", "--addr", &https, "--ca", ca], Some(READ_TOKEN));
    assert!(info.status.success(), "{}", stderr(&info));
    assert!(String::from_utf8_lossy(&info.stdout).contains("\"live_items\":1"));
    assert!(run_ok(READ_TOKEN, &["get", "--sku", "T-1"]).contains("T-1"));
    assert!(run_ok(READ_TOKEN, &["search", "--image", image, "-k", "1"]).contains("T-1"));
    assert!(run_ok(READ_TOKEN, &["rollout", "status"]).contains("rollout: none"));
    assert!(run_ok(WRITE_TOKEN, &["info"]).contains("1 live items"), "write implies read");

    // A catalogue streamed with ingest --addr (its own flag set) with the write token.
    let catalog = one_row_catalog(dir.path());
    let out = run_ok(WRITE_TOKEN, &["ingest", "--quiet", "--catalog", catalog.to_str().unwrap()]);
    assert!(out.contains("1 added"), "{out}");

    // No token, a wrong token: UNAUTHENTICATED, and the token is never echoed.
    let e = fails(&["info", "--addr", &https, "--ca", ca]);
    assert!(e.contains("Unauthenticated"), "{e}");
    let wrong = "wrong-token-3f9a8b7c6d5e";
    let e = run_fails(wrong, &["search", "--sku", "T-1"]);
    assert!(e.contains("Unauthenticated") && !e.contains(wrong), "{e}");

    // A read token cannot write: upsert, delete, ingest, rollout commands.
    for args in [
        &["upsert", "--sku", "T-3", "--image", image][..],
        &["delete", "--sku", "T-1"],
        &["ingest", "--quiet", "--catalog", catalog.to_str().unwrap()],
        &["rollout", "promote"],
        &["rollout", "set", "--fraction", "0.5"],
    ] {
        let e = run_fails(READ_TOKEN, args);
        assert!(e.contains("PermissionDenied") && !e.contains(READ_TOKEN), "{args:?}: {e}");
    }
    assert!(run_ok(READ_TOKEN, &["get", "--sku", "T-1"]).contains("T-1"), "T-1 was not deleted");

    // The health service answers without a token (load balancer probes).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let serving = rt.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&pki.ca).unwrap()));
        let channel = tonic::transport::Endpoint::from_shared(https.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        health
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(serving.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // Plaintext to the TLS port fails promptly, whichever form the address takes.
    for addr in [format!("127.0.0.1:{}", server.port()), format!("http://localhost:{}", server.port())] {
        let started = Instant::now();
        let e = fails(&["info", "--addr", &addr, "--token", WRITE_TOKEN, "--timeout", "5"]);
        assert!(started.elapsed() < Duration::from_secs(30), "{addr}: took {:?}", started.elapsed());
        assert!(e.contains("https://"), "{addr}: the error should point at TLS: {e}");
    }
    // Without --ca the system's roots do not know the test CA.
    let e = fails(&["info", "--addr", &https, "--token", WRITE_TOKEN]);
    assert!(e.contains("certificate"), "{e}");
}

/// A plaintext server on a host name: `host:port` and http:// reach it, https:// never falls
/// back to plaintext.
#[test]
fn plaintext_server_address_forms_and_no_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = Server::start("localhost:0", &[]);
    assert!(server.addr.ip().is_loopback());
    let port = server.port();
    let host = if server.addr.is_ipv4() { "127.0.0.1" } else { "[::1]" };
    for addr in [format!("{host}:{port}"), format!("http://localhost:{port}")] {
        assert!(ok(&["info", "--addr", &addr]).contains("manifest generation"), "{addr}");
    }
    let https = format!("https://localhost:{port}");
    let e = fails(&["info", "--addr", &https, "--ca", pki.ca.to_str().unwrap()]);
    assert!(e.contains("cannot connect") && e.contains("does not speak TLS"), "{e}");
    // A --ca file without a certificate is named, not silently ignored.
    let e = fails(&["info", "--addr", &https, "--ca", pki.key.to_str().unwrap()]);
    assert!(e.contains("holds no PEM certificate"), "{e}");
    let log = server.log();
    assert!(log.contains("no tokens configured") && log.contains("loopback only"), "{log}");
}

/// With tokens, --allow-anonymous-read lets calls without a token read, not write; a wrong
/// token is still refused.
#[test]
fn anonymous_reads_only_when_turned_on() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("write deploy {WRITE_TOKEN}\n")).unwrap();
    let server =
        Server::start("127.0.0.1:0", &["--tokens", tokens.to_str().unwrap(), "--allow-anonymous-read"]);
    let addr = server.addr.to_string();
    assert!(ok(&["info", "--addr", &addr]).contains("manifest generation"));
    let e = fails(&["delete", "--addr", &addr, "--sku", "X"]);
    assert!(e.contains("Unauthenticated"), "{e}");
    let e = fails(&["info", "--addr", &addr, "--token", "wrong-token-3f9a8b7c6d5e"]);
    assert!(e.contains("Unauthenticated"), "{e}");
    assert!(ok(&["delete", "--addr", &addr, "--sku", "X", "--token", WRITE_TOKEN]).contains("missing 1"));
    assert!(server.log().contains("--allow-anonymous-read"));
}

/// Unusable TLS files stop the server at start with the file named.
#[test]
fn unusable_tls_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let data = dir.path().join("data");
    let models = repo().join("models");
    let serve = |cert: &Path, key: &Path| {
        let args = [
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--models",
            models.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ];
        fails(&args)
    };
    let missing = dir.path().join("missing.pem");
    let e = serve(&missing, &garbage);
    assert!(e.contains("cannot read TLS certificate") && e.contains("missing.pem"), "{e}");
    let e = serve(&garbage, &garbage);
    assert!(e.contains("garbage.pem") && e.contains("not usable"), "{e}");
    let o =
        vitrine(&["serve", "--data-dir", data.to_str().unwrap(), "--tls-cert", garbage.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "--tls-cert needs --tls-key: {}", stderr(&o));
    assert!(stderr(&o).contains("--tls-cert and --tls-key"), "{}", stderr(&o));
}

#[test]
fn serving_every_address_without_tokens_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let o = vitrine(&[
        "serve",
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
        "--models",
        repo().join("models").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("without tokens") && e.contains("--insecure") && e.contains("--tokens"), "{e}");
}

/// A listener that accepts and never answers: the CLI gives up after --timeout.
#[test]
fn client_times_out_against_a_silent_server() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path()).ca;
    for (addr, extra) in [
        (format!("127.0.0.1:{port}"), vec![]),
        (format!("https://localhost:{port}"), vec!["--ca", ca.to_str().unwrap()]),
    ] {
        let started = Instant::now();
        let mut args = vec!["info", "--addr", &addr, "--timeout", "1"];
        args.extend(&extra);
        let e = fails(&args);
        assert!(e.contains("within 1 s (--timeout)"), "{addr}: {e}");
        assert!(started.elapsed() < Duration::from_secs(20), "{addr}: took {:?}", started.elapsed());
    }
    // A streamed ingest has no total deadline, but gives up once the server takes nothing.
    let catalog = one_row_catalog(dir.path());
    let started = Instant::now();
    let addr = format!("127.0.0.1:{port}");
    let e = fails(&[
        "ingest",
        "--quiet",
        "--addr",
        &addr,
        "--catalog",
        catalog.to_str().unwrap(),
        "--timeout",
        "1",
    ]);
    assert!(e.contains("sent no answer for 1 s (--timeout)"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
}

/// Each cause of an error is printed once (messages used to embed their source as well).
#[test]
fn error_causes_are_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for args in [
        vec!["search", "--addr", "127.0.0.1:1", "--sku", "X"],
        vec!["ingest", "--data-dir", data.to_str().unwrap(), "--catalog", "/nonexistent/catalog.jsonl"],
        vec!["verify", "--data-dir", "/nonexistent/data"],
        vec!["upsert", "--sku", "X", "--image", "/nonexistent/x.png"],
    ] {
        let e = fails(&args);
        let line = e.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{args:?}: {e}"));
        let parts: Vec<&str> = line.split(": ").collect();
        for (i, p) in parts.iter().enumerate() {
            assert!(!parts[i + 1..].contains(p), "{args:?}: {p:?} repeats in {line}");
            let inner = p.split(" (os error").next().unwrap();
            assert!(
                line.matches(inner).count() == 1 || inner.len() < 8,
                "{args:?}: {inner:?} repeats in {line}"
            );
        }
    }
}
