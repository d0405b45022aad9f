//! How every client command reaches a server: the address forms, TLS verification, the bearer
//! token and the time limits (`--addr`, `--ca`, `--token`, `--timeout`).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::proto::rollouts_client::RolloutsClient;
use crate::proto::visual_search_client::VisualSearchClient;
use anyhow::Context;
use clap::Args;
use tokio_stream::Stream;
use tonic::codegen::InterceptedService;
use tonic::codegen::http::Uri;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// Where client commands go when `--addr` is left out.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";
/// `--timeout` when left out, in seconds.
const DEFAULT_TIMEOUT_SECS: u64 = 30;

/// The server to talk to and how.
#[derive(Args, Clone)]
pub struct ConnectArgs {
    /// Server address: HOST:PORT or http://HOST:PORT (plaintext), https://HOST:PORT (TLS; the
    /// certificate is verified, never skipped).
    #[arg(long, default_value = DEFAULT_ADDR, value_name = "ADDR")]
    pub addr: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Token, trust and time limits of a client command (with or without its own `--addr`).
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Bearer token sent with every call (needed when the server has --tokens).
    #[arg(long, env = "VITRINE_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// PEM file of the CA certificate(s) that verify an https:// server (default: the system's
    /// trusted roots).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Seconds allowed to connect and for each answer (for `ingest --addr`: how long the server
    /// may go without taking a row or answering).
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_timeout)]
    pub timeout: Duration,
}

impl Default for ClientArgs {
    /// What the flags default to: no token, the system's roots, `DEFAULT_TIMEOUT_SECS`.
    fn default() -> Self {
        Self { token: None, ca: None, timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS) }
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| "expected a number of seconds".to_string())?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err("must be more than 0 and at most 86400 seconds".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// How a PEM certificate starts.
const PEM_CERT: &[u8] = b"-----BEGIN CERTIFICATE-----";

/// A parsed `--addr`.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub uri: Uri,
    pub tls: bool,
}

/// Accepts `HOST:PORT` (plaintext, as `serve --listen` and grpcurl spell it), `http://...` and
/// `https://...`.
pub fn parse_addr(addr: &str) -> anyhow::Result<Target> {
    let shown: String = addr.chars().take(200).collect();
    let (url, tls) = if let Some(rest) = addr.strip_prefix("https://") {
        (format!("https://{rest}"), true)
    } else if addr.starts_with("http://") {
        (addr.to_string(), false)
    } else if addr.contains("://") {
        anyhow::bail!("--addr {shown:?}: the scheme must be http:// or https://");
    } else {
        (format!("http://{addr}"), false)
    };
    let uri: Uri = url.parse().map_err(|_| anyhow::anyhow!("--addr {shown:?} is not HOST:PORT or a URL"))?;
    if uri.host().is_none_or(str::is_empty) {
        anyhow::bail!("--addr {shown:?} names no host");
    }
    if uri.port().is_none() && !addr.contains("://") {
        anyhow::bail!("--addr {shown:?} needs a port (HOST:PORT)");
    }
    Ok(Target { uri, tls })
}

/// Adds `authorization: Bearer TOKEN` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The channel every client is built on.
pub type Chan = InterceptedService<Channel, Bearer>;

/// A connected server.
pub struct Conn {
    channel: Channel,
    bearer: Bearer,
    timeout: Duration,
    addr: String,
}

impl ClientArgs {
    /// Connects to `addr` (TLS for https://, verified with `--ca` or the system's roots), within
    /// `--timeout`.
    pub async fn connect(&self, addr: &str) -> anyhow::Result<Conn> {
        let target = parse_addr(addr)?;
        let bearer = match self.token.as_deref().map(str::trim) {
            None | Some("") => Bearer(None),
            Some(t) => {
                let mut v: MetadataValue<Ascii> = format!("Bearer {t}")
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--token (or VITRINE_TOKEN) is not visible ASCII"))?;
                v.set_sensitive(true);
                Bearer(Some(v))
            }
        };
        let mut endpoint = Endpoint::from(target.uri.clone()).connect_timeout(self.timeout).tcp_nodelay(true);
        if target.tls {
            // No handshake timeout of its own: the connect timeout below covers the handshake.
            let mut tls = ClientTlsConfig::new();
            tls = match &self.ca {
                Some(ca) => {
                    let pem =
                        std::fs::read(ca).with_context(|| format!("cannot read --ca {}", ca.display()))?;
                    // tonic skips what it cannot parse: a file without a certificate would
                    // only fail later, as an unknown issuer.
                    if !pem.windows(PEM_CERT.len()).any(|w| w == PEM_CERT) {
                        anyhow::bail!("--ca {} holds no PEM certificate", ca.display());
                    }
                    tls.ca_certificate(Certificate::from_pem(pem))
                }
                None => tls.with_native_roots(),
            };
            endpoint = endpoint.tls_config(tls).context("TLS settings")?;
        }
        let addr = target.uri.to_string().trim_end_matches('/').to_string();
        if !target.tls && self.ca.is_some() {
            anyhow::bail!("--ca verifies https:// servers; {addr} is plaintext (use https://)");
        }
        let channel = match tokio::time::timeout(self.timeout, endpoint.connect()).await {
            Err(_) => anyhow::bail!("cannot connect to {addr} within {} (--timeout)", secs(self.timeout)),
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                // rustls's words for a server that answered the TLS hello in plaintext.
                let plaintext = target.tls && crate::report::chain(&e).contains("corrupt message");
                let why = if plaintext {
                    " (it does not speak TLS; for a plaintext server use http:// or HOST:PORT)"
                } else {
                    ""
                };
                return Err(anyhow::Error::new(e).context(format!("cannot connect to {addr}{why}")));
            }
        };
        Ok(Conn { channel, bearer, timeout: self.timeout, addr })
    }
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

impl Conn {
    pub fn search(&self) -> VisualSearchClient<Chan> {
        VisualSearchClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(crate::server::MAX_REQUEST_BYTES)
    }

    pub fn rollouts(&self) -> RolloutsClient<Chan> {
        RolloutsClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Awaits one unary call within `--timeout`; a refusal becomes an error naming its code.
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => anyhow::bail!("no answer from {} within {} (--timeout)", self.addr, secs(self.timeout)),
            Ok(r) => Ok(r.map_err(|s| status_error(&self.addr, s))?.into_inner()),
        }
    }

    /// Runs a client-streaming call with an idle bound instead of a deadline: it fails once the
    /// server has taken no message and given no answer for `--timeout`, however long the whole
    /// stream takes.
    pub async fn call_streaming<M, T, F>(
        &self,
        messages: Vec<M>,
        call: impl FnOnce(std::pin::Pin<Box<dyn Stream<Item = M> + Send>>) -> F,
    ) -> anyhow::Result<T>
    where
        M: Send + 'static,
        F: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let taken_ms = Arc::new(AtomicU64::new(0));
        let stream = {
            let taken_ms = Arc::clone(&taken_ms);
            tokio_stream::iter(messages.into_iter().inspect(move |_| {
                taken_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            }))
        };
        let call = call(Box::pin(stream));
        tokio::pin!(call);
        loop {
            let idle =
                started.elapsed().saturating_sub(Duration::from_millis(taken_ms.load(Ordering::Relaxed)));
            if idle >= self.timeout {
                anyhow::bail!(
                    "{} took no message and sent no answer for {} (--timeout)",
                    self.addr,
                    secs(self.timeout)
                );
            }
            tokio::select! {
                r = &mut call => return Ok(r.map_err(|s| status_error(&self.addr, s))?.into_inner()),
                _ = tokio::time::sleep(self.timeout - idle) => {}
            }
        }
    }
}

/// A server's refusal (or a failed call) as a CLI error: the code, the message, and a hint
/// for the mistakes that look alike from the client.
pub fn status_error(addr: &str, s: Status) -> anyhow::Error {
    use tonic::Code;
    // A status the server sent is decoded from its answer and carries no source error; one
    // the client made from a failed connection or a broken stream (what a plaintext client
    // meets at a TLS server) does. Only the latter can be the wrong scheme.
    let from_transport = std::error::Error::source(&s).is_some();
    let hint = match s.code() {
        Code::Unauthenticated => " (pass --token or set VITRINE_TOKEN)",
        Code::Unavailable | Code::Unknown | Code::Internal
            if from_transport && addr.starts_with("http://") =>
        {
            " (if the server serves TLS, use https:// and --ca)"
        }
        _ => "",
    };
    let message: String = s.message().chars().take(2000).collect();
    anyhow::anyhow!("{addr} answered {:?}: {message}{hint}", s.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_forms() {
        let t = parse_addr("127.0.0.1:50051").unwrap();
        assert_eq!((t.uri.to_string().as_str(), t.tls), ("http://127.0.0.1:50051/", false));
        let t = parse_addr("localhost:1").unwrap();
        assert_eq!((t.uri.host(), t.uri.port_u16(), t.tls), (Some("localhost"), Some(1), false));
        assert!(parse_addr("[::1]:50051").is_ok());
        assert!(!parse_addr("http://h:1").unwrap().tls);
        assert!(parse_addr("https://h:1").unwrap().tls);
        assert!(parse_addr("https://h").unwrap().tls, "a URL may leave the port to its scheme");
        for bad in ["localhost", "ftp://h:1", "http://", ":50051", "a b:1"] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_tls_hint_is_only_for_transport_failures() {
        let answered = Status::unavailable("write failed: the index writer takes no writes");
        let msg = status_error("http://h:1", answered).to_string();
        assert!(!msg.contains("TLS"), "a server's own answer is not a scheme mistake: {msg}");
        let broken = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert!(status_error("http://h:1", broken.clone()).to_string().contains("use https://"));
        assert!(!status_error("https://h:1", broken).to_string().contains("use https://"));
    }

    #[test]
    fn timeouts() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            c: ConnectArgs,
        }
        let parsed = <Cli as clap::Parser>::parse_from(["x"]);
        assert_eq!(parsed.c.client.timeout, ClientArgs::default().timeout, "clap's default is Default's");
        assert_eq!(parse_timeout("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_timeout("0.5").unwrap(), Duration::from_millis(500));
        for bad in ["0", "-1", "nan", "inf", "x"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
