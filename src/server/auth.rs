//! Bearer-token authorisation: the tokens file, the roles, which role each RPC needs, and a
//! tower layer that answers `UNAUTHENTICATED` / `PERMISSION_DENIED` before a handler runs.
//!
//! Tokens file: one token a line, `ROLE NAME TOKEN`, separated by blanks; `#` at the start of
//! a line or after a blank starts a comment (inside a token it is part of the token). ROLE is `read` or `write` (write implies read); NAME is what logs and errors show
//! (never the token); TOKEN is the secret itself (at least 16 visible ASCII characters) or
//! `sha256:HEX`, the SHA-256 of the secret, so the file need not hold secrets. Only digests are
//! kept in memory and they are compared in constant time.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};

/// Shortest secret a tokens file may hold.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a token may do. `Write` implies `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Write,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Write => "write",
        })
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health checks: load balancer probes carry no token.
    Public,
    Needs(Role),
}

/// The access an RPC (its HTTP/2 path, `/package.Service/Method`) needs. Anything not named
/// here needs `write`, so a new RPC is closed until someone decides otherwise.
pub fn required_access(path: &str) -> Access {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    match service {
        "grpc.health.v1.Health" => Access::Public,
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => {
            Access::Needs(Role::Read)
        }
        "vitrine.v1.VisualSearch" => match method {
            "SearchByImage" | "SearchByVector" | "SearchBySku" | "GetIndexInfo" | "Get" => {
                Access::Needs(Role::Read)
            }
            _ => Access::Needs(Role::Write),
        },
        "vitrine.v1.Rollouts" if method == "Status" => Access::Needs(Role::Read),
        _ => Access::Needs(Role::Write),
    }
}

/// A tokens file that cannot be used. Tokens never appear in these messages.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read tokens file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {why}", path.display())]
    Line { path: PathBuf, line: usize, why: String },
    #[error("{}: no tokens (an empty tokens file would leave the server open)", path.display())]
    Empty { path: PathBuf },
}

struct Entry {
    name: String,
    role: Role,
    digest: [u8; 32],
}

/// The configured tokens (their digests, names and roles).
#[derive(Default)]
pub struct Tokens {
    entries: Vec<Entry>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.entries.iter().map(|e| format!("{}={}", e.name, e.role)).collect();
        f.debug_struct("Tokens").field("entries", &names).finish()
    }
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A tokens file line without its comment: from a `#` that starts the line or follows a blank.
fn without_comment(line: &str) -> &str {
    let b = line.as_bytes();
    match (0..b.len()).find(|&i| b[i] == b'#' && (i == 0 || b[i - 1].is_ascii_whitespace())) {
        Some(i) => &line[..i],
        None => line,
    }
}

impl Tokens {
    /// Reads a tokens file (format in the module docs).
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokensError::Read { path: path.to_path_buf(), source })?;
        let tokens = Self::parse(&text).map_err(|(line, why)| TokensError::Line {
            path: path.to_path_buf(),
            line,
            why,
        })?;
        if tokens.is_empty() {
            return Err(TokensError::Empty { path: path.to_path_buf() });
        }
        Ok(tokens)
    }

    /// Parses a tokens file's text; an error names the line (1-based) and what is wrong.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut entries: Vec<Entry> = Vec::new();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, raw) in text.lines().enumerate() {
            let line = without_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [role, name, secret] = fields[..] else {
                return Err((i + 1, format!("expected ROLE NAME TOKEN, found {} fields", fields.len())));
            };
            let role = match role {
                "read" => Role::Read,
                "write" => Role::Write,
                _ => return Err((i + 1, "the role must be read or write".into())),
            };
            if name.len() > 64 {
                return Err((i + 1, "the name is longer than 64 characters".into()));
            }
            let digest = match secret.strip_prefix("sha256:") {
                Some(hex) => parse_hex32(hex).ok_or((i + 1, "sha256: needs 64 hex digits".into()))?,
                None if secret.len() < MIN_TOKEN_LEN => {
                    return Err((
                        i + 1,
                        format!("token {name:?} is shorter than {MIN_TOKEN_LEN} characters"),
                    ));
                }
                None if !secret.bytes().all(|b| b.is_ascii_graphic()) => {
                    return Err((i + 1, format!("token {name:?} has characters other than visible ASCII")));
                }
                None => digest(secret.as_bytes()),
            };
            if entries.iter().any(|e| e.name == name) {
                return Err((i + 1, format!("the name {name:?} is used twice")));
            }
            if entries.iter().any(|e| bool::from(e.digest.ct_eq(&digest))) {
                return Err((i + 1, format!("token {name:?} repeats an earlier token")));
            }
            entries.push(Entry { name: name.to_string(), role, digest });
        }
        Ok(Self { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry whose secret this is. Every entry is compared, in constant time, whether or
    /// not an earlier one matched.
    fn find(&self, secret: &[u8]) -> Option<&Entry> {
        let d = digest(secret);
        let mut found = None;
        for e in &self.entries {
            if bool::from(e.digest.ct_eq(&d)) {
                found = Some(e);
            }
        }
        found
    }
}

/// Who may call what: the tokens, and whether reads need one.
#[derive(Debug, Default)]
pub struct AuthPolicy {
    /// No tokens: every call is allowed (the server then listens on loopback only, unless the
    /// operator said `--insecure`).
    pub tokens: Tokens,
    /// With tokens configured, let calls without a token read (search, info, get, status).
    pub allow_anonymous_read: bool,
}

impl AuthPolicy {
    /// Decides a call from its path and `authorization` header.
    pub fn check(&self, path: &str, authorization: Option<&[u8]>) -> Result<(), Status> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let needs = match required_access(path) {
            Access::Public => return Ok(()),
            Access::Needs(role) => role,
        };
        let Some(header) = authorization else {
            if needs == Role::Read && self.allow_anonymous_read {
                return Ok(());
            }
            return Err(Status::unauthenticated("this call needs a bearer token"));
        };
        let secret = bearer(header)
            .ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer TOKEN`"))?;
        let entry = self.tokens.find(secret).ok_or_else(|| Status::unauthenticated("unknown token"))?;
        if entry.role < needs {
            return Err(Status::permission_denied(format!(
                "token {:?} has the {} role; {} needs {needs}",
                entry.name,
                entry.role,
                shown_path(path)
            )));
        }
        Ok(())
    }
}

/// A request's path as messages show it: at most 100 characters of it.
fn shown_path(path: &str) -> String {
    path.chars().take(100).collect()
}

/// The secret of a `Bearer TOKEN` header value (scheme case-insensitive).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = (header.get(..7)?, header.get(7..)?);
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let secret = rest.trim_ascii();
    (!secret.is_empty()).then_some(secret)
}

/// Whether a server with this policy may listen on `addr`: without tokens only on loopback,
/// unless `insecure`.
pub fn check_exposure(addr: SocketAddr, policy: &AuthPolicy, insecure: bool) -> Result<(), ExposureError> {
    if policy.tokens.is_empty() && !addr.ip().is_loopback() && !insecure {
        return Err(ExposureError { addr });
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to serve {addr} without tokens: anyone who can reach it could change the catalogue; \
     pass --tokens FILE (see README, Security), listen on a loopback address, or pass --insecure"
)]
pub struct ExposureError {
    pub addr: SocketAddr,
}

/// A tower layer that checks every request against an [`AuthPolicy`].
#[derive(Clone)]
pub struct AuthLayer {
    policy: Arc<AuthPolicy>,
}

impl AuthLayer {
    pub fn new(policy: Arc<AuthPolicy>) -> Self {
        Self { policy }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, policy: Arc::clone(&self.policy) }
    }
}

/// The service [`AuthLayer`] wraps around the server's routes.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    policy: Arc<AuthPolicy>,
}

impl<S, B, R> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let header = req.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        match self.policy.check(req.uri().path(), header) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => {
                tracing::debug!(path = shown_path(req.uri().path()), code = ?status.code(), "call refused");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: &str = "write-secret-0123456789";
    const R: &str = "read-secret-0123456789";

    fn policy(anonymous: bool) -> AuthPolicy {
        let hashed: String = digest(R.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        let text = format!("# comment\nwrite deploy {W}\n\nread  web sha256:{hashed}  # hashed\n");
        AuthPolicy { tokens: Tokens::parse(&text).unwrap(), allow_anonymous_read: anonymous }
    }

    fn code(p: &AuthPolicy, path: &str, header: Option<&str>) -> tonic::Code {
        match p.check(path, header.map(str::as_bytes)) {
            Ok(()) => tonic::Code::Ok,
            Err(s) => s.code(),
        }
    }

    #[test]
    fn roles_and_paths() {
        use tonic::Code::*;
        let p = policy(false);
        let (w, r) = (format!("Bearer {W}"), format!("bearer {R}"));
        let search = "/vitrine.v1.VisualSearch/SearchBySku";
        let upsert = "/vitrine.v1.VisualSearch/UpsertStream";
        let promote = "/vitrine.v1.Rollouts/Promote";
        let status = "/vitrine.v1.Rollouts/Status";
        assert_eq!(code(&p, search, Some(&r)), Ok);
        assert_eq!(code(&p, search, Some(&w)), Ok, "write implies read");
        assert_eq!(code(&p, status, Some(&r)), Ok);
        assert_eq!(code(&p, upsert, Some(&w)), Ok);
        assert_eq!(code(&p, upsert, Some(&r)), PermissionDenied);
        assert_eq!(code(&p, promote, Some(&r)), PermissionDenied);
        assert_eq!(code(&p, "/vitrine.v1.VisualSearch/Delete", Some(&r)), PermissionDenied);
        assert_eq!(code(&p, "/vitrine.v1.VisualSearch/NewRpc", Some(&r)), PermissionDenied);
        assert_eq!(code(&p, search, None), Unauthenticated);
        assert_eq!(code(&p, search, Some("Bearer not-a-token-at-all")), Unauthenticated);
        assert_eq!(code(&p, search, Some(W)), Unauthenticated, "no scheme");
        assert_eq!(code(&p, search, Some("Bearer ")), Unauthenticated);
        assert_eq!(code(&p, "/grpc.health.v1.Health/Check", None), Ok);
        let long = format!("/vitrine.v1.VisualSearch/{}", "x".repeat(10_000));
        let refused = p.check(&long, Some(r.as_bytes())).unwrap_err();
        assert!(refused.message().len() < 300, "the path is cut short: {}", refused.message().len());
        assert_eq!(
            code(&p, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None),
            Unauthenticated
        );
    }

    #[test]
    fn anonymous_read_and_open_server() {
        use tonic::Code::*;
        let p = policy(true);
        assert_eq!(code(&p, "/vitrine.v1.VisualSearch/SearchByImage", None), Ok);
        assert_eq!(code(&p, "/vitrine.v1.VisualSearch/Upsert", None), Unauthenticated);
        assert_eq!(
            code(&p, "/vitrine.v1.VisualSearch/Get", Some("Bearer wrong-token-123456")),
            Unauthenticated
        );
        let open = AuthPolicy::default();
        assert_eq!(code(&open, "/vitrine.v1.VisualSearch/Upsert", None), Ok);
    }

    #[test]
    fn bad_files_name_the_line_not_the_token() {
        for (text, want) in [
            ("write a\n", "expected ROLE NAME TOKEN"),
            ("admin a 0123456789abcdefg\n", "role must be read or write"),
            ("read a short\n", "shorter than 16"),
            ("read a sha256:abcd\n", "64 hex digits"),
            ("read a 0123456789abcdefg\nwrite a 0123456789abcdefh\n", "used twice"),
            ("read a 0123456789abcdefg\nwrite b 0123456789abcdefg\n", "repeats"),
            ("read a 0123456789abcdéfg\n", "visible ASCII"),
            // A `#` inside a token is the token's: this one is 10 characters, not a comment.
            ("write a WRITE#abcd\n", "shorter than 16"),
        ] {
            let (line, why) = Tokens::parse(text).unwrap_err();
            assert!(why.contains(want), "{text:?}: {why}");
            assert!(!why.contains("0123456789abcdef") && !why.contains("short\""), "{why}");
            assert_eq!(line, text.lines().count(), "{text:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "# nothing\n").unwrap();
        assert!(matches!(Tokens::load(&f), Err(TokensError::Empty { .. })));
    }

    #[test]
    fn a_hash_inside_a_token_is_part_of_it() {
        let text = "\u{feff}# keys\nwrite deploy ABCDEFGHIJKLMNOPQRST#xyz # the deploy job\n\
                    read  dash   0123456789abcdefg\t# tab, then a comment\n";
        let tokens = Tokens::parse(text).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens.find(b"ABCDEFGHIJKLMNOPQRST#xyz").map(|e| e.role), Some(Role::Write));
        assert!(tokens.find(b"ABCDEFGHIJKLMNOPQRST").is_none(), "its prefix is no token");
        assert_eq!(tokens.find(b"0123456789abcdefg").map(|e| e.role), Some(Role::Read));
    }

    #[test]
    fn the_readme_example_parses() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let start = readme.find("# role  name").expect("the tokens example in README.md");
        let block = &readme[start..start + readme[start..].find("```").unwrap()];
        let tokens = Tokens::parse(block).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens.find(b"Zq0vY7h1kR3m9sT2wP5x").map(|e| e.role), Some(Role::Write));
    }

    #[test]
    fn exposure_needs_tokens_or_loopback_or_insecure() {
        let open = AuthPolicy::default();
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        assert!(check_exposure("127.0.0.1:1".parse().unwrap(), &open, false).is_ok());
        assert!(check_exposure("[::1]:1".parse().unwrap(), &open, false).is_ok());
        let e = check_exposure(any, &open, false).unwrap_err().to_string();
        assert!(e.contains("--insecure") && e.contains("0.0.0.0:50051"), "{e}");
        assert!(check_exposure(any, &open, true).is_ok());
        assert!(check_exposure(any, &policy(false), false).is_ok());
    }
}
