//! A tower layer around every gRPC request: one log line (method, status code, latency, model
//! version) and the per-RPC metrics. Handlers name the model version and rollout arm that
//! answered in internal response headers, which this layer reads and removes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::HeaderMap;
use prost::Message;
use tonic::metadata::{MetadataMap, MetadataValue};

use super::metrics::{Metrics, RpcLabels, code_name};

/// Internal response header: the model version that answered.
pub const MODEL_VERSION_HEADER: &str = "x-vitrine-model-version";
/// Internal response header: the rollout arm that answered, while a canary takes traffic.
pub const ARM_HEADER: &str = "x-vitrine-arm";
/// Longest error message written to a request's log line.
const MAX_LOGGED_MESSAGE: usize = 200;

/// Names the model version (and rollout arm, while a canary runs) of a response or error.
pub fn tag(md: &mut MetadataMap, model_version: &str, arm: Option<&'static str>) {
    if let Ok(v) = model_version.parse() {
        md.insert(MODEL_VERSION_HEADER, v);
    }
    if let Some(arm) = arm {
        md.insert(ARM_HEADER, MetadataValue::from_static(arm));
    }
}

/// What the log line and the metrics call a request: its method path and its method name.
type Names = (Arc<str>, Arc<str>);

/// The RPCs the server knows, path → names: only these become label values (any other path is
/// `unknown`, so a client cannot grow the number of series).
fn known_rpcs() -> HashMap<String, Names> {
    let sets = [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut out = HashMap::new();
    for set in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else { continue };
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    let names = (Arc::from(path.as_str()), Arc::from(method.name()));
                    out.insert(path, names);
                }
            }
        }
    }
    out
}

#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
    rpcs: Arc<HashMap<String, Names>>,
    unknown: Names,
}

impl ObserveLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let unknown: Arc<str> = Arc::from("unknown");
        Self { metrics, rpcs: Arc::new(known_rpcs()), unknown: (Arc::clone(&unknown), unknown) }
    }
}

impl<S> tower_layer::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

/// The gRPC code of a response: its `grpc-status` header (errors of unary calls come as a
/// trailers-only response), else OK (the status follows in the trailers).
fn response_code(headers: &HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

fn take_header(headers: &mut HeaderMap, name: &str) -> String {
    headers.remove(name).and_then(|v| v.to_str().ok().map(str::to_string)).unwrap_or_default()
}

/// A `grpc-message` header's text (percent-decoded), cut to [`MAX_LOGGED_MESSAGE`] bytes.
fn error_message(headers: &HeaderMap) -> String {
    let raw = headers.get("grpc-message").map_or(&[][..], |v| v.as_bytes());
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = raw.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (raw[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                bytes.push(b);
                i += 3;
            }
            (b, _) => {
                bytes.push(b);
                i += 1;
            }
        }
    }
    let mut message = String::from_utf8_lossy(&bytes).into_owned();
    if message.len() > MAX_LOGGED_MESSAGE {
        let cut = (0..=MAX_LOGGED_MESSAGE).rev().find(|i| message.is_char_boundary(*i)).unwrap_or(0);
        message.truncate(cut);
        message.push_str("...");
    }
    message
}

/// The log line of one request (the model version only where known; the error's message for
/// a failure).
fn log(method: &str, code: tonic::Code, latency_ms: f64, model_version: &str, headers: &HeaderMap) {
    let model_version = (!model_version.is_empty()).then_some(model_version);
    let latency_ms = (latency_ms * 1000.0).round() / 1000.0;
    let error = (code != tonic::Code::Ok).then(|| error_message(headers));
    let code = code_name(code);
    tracing::info!(target: "vitrine::request", method, code, latency_ms, model_version, error, "request");
}

/// A call whose answer was never produced, logged and counted as `CANCELLED` when dropped
/// with `rpc` still set.
struct Unanswered<'a> {
    method: &'a str,
    rpc: Option<Arc<str>>,
    metrics: &'a Metrics,
    started: Instant,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let Some(rpc) = self.rpc.take() else { return };
        let latency = self.started.elapsed();
        let latency_ms = (latency.as_secs_f64() * 1e6).round() / 1000.0;
        tracing::info!(
            target: "vitrine::request",
            method = self.method,
            code = code_name(tonic::Code::Cancelled),
            latency_ms,
            error = "ended before its answer (the client cancelled, its deadline passed, or the server stopped)",
            "request"
        );
        let labels = RpcLabels { rpc, model_version: String::new(), arm: "" };
        self.metrics.record_rpc(&labels, tonic::Code::Cancelled, latency);
    }
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Observe<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let (method, rpc) = self.layer.rpcs.get(req.uri().path()).unwrap_or(&self.layer.unknown).clone();
        let metrics = Arc::clone(&self.layer.metrics);
        let fut = self.inner.call(req);
        Box::pin(async move {
            // Logs and counts the call if its future is dropped before the answer: the client
            // reset the stream (it cancelled, or its deadline passed) or the server stopped.
            let mut unanswered =
                Unanswered { method: &method, rpc: Some(rpc.clone()), metrics: &metrics, started };
            let mut result = fut.await;
            unanswered.rpc = None;
            let latency = started.elapsed();
            let (code, model_version, arm) = match &mut result {
                Ok(resp) => {
                    let h = resp.headers_mut();
                    let mv = take_header(h, MODEL_VERSION_HEADER);
                    let arm = match take_header(h, ARM_HEADER).as_str() {
                        "champion" => "champion",
                        "challenger" => "challenger",
                        _ => "",
                    };
                    (response_code(h), mv, arm)
                }
                Err(_) => (tonic::Code::Unknown, String::new(), ""),
            };
            let empty = HeaderMap::new();
            let headers = result.as_ref().map_or(&empty, |r| r.headers());
            log(&method, code, latency.as_secs_f64() * 1e3, &model_version, headers);
            metrics.record_rpc(&RpcLabels { rpc, model_version, arm }, code, latency);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_decoded_and_cut() {
        let mut h = HeaderMap::new();
        h.insert("grpc-message", "sku%20%22X%22%20is%20not%20here%ZZ%".parse().unwrap());
        assert_eq!(error_message(&h), "sku \"X\" is not here%ZZ%");
        // 300 bytes of two-byte characters: cut on a character boundary.
        h.insert("grpc-message", "%C3%A9".repeat(150).parse().unwrap());
        let m = error_message(&h);
        assert_eq!(m, format!("{}...", "é".repeat(MAX_LOGGED_MESSAGE / 2)));
        assert_eq!(error_message(&HeaderMap::new()), "");
    }
}
