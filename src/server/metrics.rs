//! The server's Prometheus metrics: per-RPC request counts and latency histograms, encoder
//! time per model version (atomics on the hot path), and, at scrape time, gauges read from the
//! server's state (admission queues, segments, log, rollout), rendered in the text format.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

use super::ServerState;
use super::admission::Work;

/// Upper bounds (seconds) of the latency buckets: 1 ms to 10 s.
pub const BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A histogram with fixed buckets; observing is a few relaxed atomic adds.
#[derive(Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (+Inf last) and the sum in seconds.
    fn snapshot(&self) -> ([u64; BUCKETS.len() + 1], f64) {
        let mut out = [0; BUCKETS.len() + 1];
        let mut total = 0;
        for (o, c) in out.iter_mut().zip(&self.counts) {
            total += c.load(Ordering::Relaxed);
            *o = total;
        }
        (out, self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let (cumulative, sum) = self.snapshot();
        let sep = if labels.is_empty() { "" } else { "," };
        for (le, n) in BUCKETS.iter().map(|b| b.to_string()).chain(["+Inf".to_string()]).zip(cumulative) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", cumulative[BUCKETS.len()]);
    }
}

/// The labels of one RPC series; `model_version` and `arm` are empty where unknown.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RpcLabels {
    pub rpc: Arc<str>,
    pub model_version: String,
    /// `champion` or `challenger`, only while a canary takes traffic.
    pub arm: &'static str,
}

#[derive(Default)]
struct RpcSeries {
    /// Requests per gRPC code (indexed by the code's number).
    codes: [AtomicU64; 17],
    latency: Histogram,
}

#[derive(Default)]
struct EncodeSeries {
    images: AtomicU64,
    latency: Histogram,
}

/// The registry. A new label set takes a write lock once; after that, recording takes a read
/// lock and atomic adds.
#[derive(Default)]
pub struct Metrics {
    rpcs: RwLock<HashMap<RpcLabels, Arc<RpcSeries>>>,
    encode: RwLock<HashMap<String, Arc<EncodeSeries>>>,
}

fn series<K: Eq + std::hash::Hash + Clone, V: Default>(map: &RwLock<HashMap<K, Arc<V>>>, key: &K) -> Arc<V> {
    if let Some(s) = map.read().get(key) {
        return Arc::clone(s);
    }
    Arc::clone(map.write().entry(key.clone()).or_default())
}

/// The canonical upper-case name of a gRPC status code (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `a="x",b="y"` for the non-empty values.
fn labels(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

impl Metrics {
    /// Records one answered request.
    pub fn record_rpc(&self, labels: &RpcLabels, code: tonic::Code, latency: Duration) {
        let s = series(&self.rpcs, labels);
        s.codes[(code as usize).min(16)].fetch_add(1, Ordering::Relaxed);
        s.latency.observe(latency);
    }

    /// Records one call of a model version's encoder over `images` images.
    pub fn record_encode(&self, model_version: &str, images: usize, took: Duration) {
        let s = series(&self.encode, &model_version.to_string());
        s.images.fetch_add(images as u64, Ordering::Relaxed);
        s.latency.observe(took);
    }

    /// The request and encoder families.
    fn render_own(&self, out: &mut String) {
        let mut rpcs: Vec<(RpcLabels, Arc<RpcSeries>)> =
            self.rpcs.read().iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect();
        rpcs.sort_by(|a, b| a.0.cmp(&b.0));
        fn base(l: &RpcLabels) -> [(&'static str, &str); 3] {
            [("rpc", l.rpc.as_ref()), ("model_version", l.model_version.as_str()), ("arm", l.arm)]
        }
        header(
            out,
            "vitrine_requests_total",
            "counter",
            "gRPC requests answered, by RPC, status code, model version and rollout arm.",
        );
        for (l, s) in &rpcs {
            for (i, c) in s.codes.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let code = code_name(tonic::Code::from_i32(i as i32));
                    let [r, m, a] = base(l);
                    let _ =
                        writeln!(out, "vitrine_requests_total{{{}}} {n}", labels(&[r, ("code", code), m, a]));
                }
            }
        }
        header(
            out,
            "vitrine_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its response headers, by RPC, model version and rollout arm.",
        );
        for (l, s) in &rpcs {
            s.latency.render(out, "vitrine_request_duration_seconds", &labels(&base(l)));
        }
        let mut enc: Vec<(String, Arc<EncodeSeries>)> =
            self.encode.read().iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect();
        enc.sort_by(|a, b| a.0.cmp(&b.0));
        header(
            out,
            "vitrine_encode_seconds",
            "histogram",
            "Encoder time per call (one query image or one write batch), by model version.",
        );
        for (v, s) in &enc {
            s.latency.render(out, "vitrine_encode_seconds", &labels(&[("model_version", v)]));
        }
        header(out, "vitrine_encoded_images_total", "counter", "Images embedded, by model version.");
        for (v, s) in &enc {
            let n = s.images.load(Ordering::Relaxed);
            let _ = writeln!(out, "vitrine_encoded_images_total{{{}}} {n}", labels(&[("model_version", v)]));
        }
    }

    /// The whole exposition: the recorded families and the state's gauges.
    pub fn render(&self, state: &ServerState) -> String {
        let mut out = String::new();
        self.render_own(&mut out);
        render_state(&mut out, state);
        out
    }
}

/// Gauges and counters read from the server's state at scrape time.
fn render_state(out: &mut String, state: &ServerState) {
    let work = [(Work::Embed, "embed"), (Work::Search, "search"), (Work::Write, "write")];
    header(
        out,
        "vitrine_admission_queue_depth",
        "gauge",
        "Requests waiting for an admission slot, by kind of work.",
    );
    for (w, name) in work {
        let _ = writeln!(
            out,
            "vitrine_admission_queue_depth{{work=\"{name}\"}} {}",
            state.admission.queue_depth(w)
        );
    }
    header(out, "vitrine_admission_running", "gauge", "Admitted requests holding a slot, by kind of work.");
    for (w, name) in work {
        let _ = writeln!(out, "vitrine_admission_running{{work=\"{name}\"}} {}", state.admission.running(w));
    }
    header(
        out,
        "vitrine_admission_shed_total",
        "counter",
        "Requests shed with RESOURCE_EXHAUSTED, by kind of work.",
    );
    let (e, s, w) = state.admission.shed_counts();
    for (n, name) in [(e, "embed"), (s, "search"), (w, "write")] {
        let _ = writeln!(out, "vitrine_admission_shed_total{{work=\"{name}\"}} {n}");
    }
    header(
        out,
        "vitrine_admission_service_seconds",
        "gauge",
        "Moving average of how long admitted requests hold their slot, by kind of work (queries that would wait longer than about this are shed).",
    );
    for (w, name) in work {
        let secs = state.admission.mean_service(w).as_secs_f64();
        let _ = writeln!(out, "vitrine_admission_service_seconds{{work=\"{name}\"}} {secs}");
    }

    let live = state.live();
    header(
        out,
        "vitrine_model_serving",
        "gauge",
        "1 for the model version that answers image and SKU queries, 0 for the others.",
    );
    for v in live.versions.keys() {
        let serving = u8::from(live.serving.as_ref() == Some(v));
        let _ = writeln!(out, "vitrine_model_serving{{model_version=\"{}\"}} {serving}", escape(v.as_str()));
    }
    header(out, "vitrine_segments", "gauge", "Sealed (HNSW) segments, by model version.");
    for (v, view) in &live.versions {
        let _ = writeln!(
            out,
            "vitrine_segments{{model_version=\"{}\"}} {}",
            escape(v.as_str()),
            view.sealed.len()
        );
    }
    header(out, "vitrine_items", "gauge", "Live (searchable) items, by model version.");
    for (v, view) in &live.versions {
        let _ =
            writeln!(out, "vitrine_items{{model_version=\"{}\"}} {}", escape(v.as_str()), view.live_items());
    }
    header(
        out,
        "vitrine_unsealed_items",
        "gauge",
        "Items written to the log but not yet in a sealed segment (in memory; replayed from the log after a crash), by model version.",
    );
    for (v, view) in &live.versions {
        let n = view.mutable.len() + view.frozen.iter().map(|f| f.len()).sum::<usize>();
        let _ = writeln!(out, "vitrine_unsealed_items{{model_version=\"{}\"}} {n}", escape(v.as_str()));
    }
    header(out, "vitrine_wal_bytes", "gauge", "Bytes of write-ahead log on disk.");
    let _ = writeln!(out, "vitrine_wal_bytes {}", state.writer.wal_bytes());
    header(out, "vitrine_manifest_generation", "gauge", "The data directory's manifest generation.");
    let _ = writeln!(out, "vitrine_manifest_generation {}", live.generation);
    header(
        out,
        "vitrine_integrity_problems",
        "gauge",
        "Damage found at start (segments left out, damaged records, versions not served); writes are refused while above 0.",
    );
    let _ = writeln!(out, "vitrine_integrity_problems {}", state.problems().len());

    let status = state.rollout.status(&live);
    if status.state != "none" {
        let b = status.backfill.unwrap_or_default();
        let l = labels(&[
            ("state", &status.state),
            ("champion", &status.champion),
            ("challenger", &status.challenger),
        ]);
        header(
            out,
            "vitrine_rollout_info",
            "gauge",
            "1, labelled with the current rollout's state and versions.",
        );
        let _ = writeln!(out, "vitrine_rollout_info{{{l}}} 1");
        let cl = labels(&[("challenger", &status.challenger)]);
        header(out, "vitrine_rollout_backfill_done", "gauge", "Items of the challenger's backfill done.");
        let _ = writeln!(out, "vitrine_rollout_backfill_done{{{cl}}} {}", b.done);
        header(out, "vitrine_rollout_backfill_total", "gauge", "Items the challenger's backfill has to do.");
        let _ = writeln!(out, "vitrine_rollout_backfill_total{{{cl}}} {}", b.total);
        header(out, "vitrine_rollout_canary_fraction", "gauge", "Share of queries routed to the challenger.");
        let _ = writeln!(out, "vitrine_rollout_canary_fraction{{{cl}}} {}", status.fraction);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counters_split_by_code() {
        let m = Metrics::default();
        let l = RpcLabels { rpc: "SearchBySku".into(), model_version: "m1".into(), arm: "" };
        m.record_rpc(&l, tonic::Code::Ok, Duration::from_micros(500));
        m.record_rpc(&l, tonic::Code::Ok, Duration::from_millis(20));
        m.record_rpc(&l, tonic::Code::NotFound, Duration::from_secs(60));
        let mut out = String::new();
        m.render_own(&mut out);
        assert!(
            out.contains("vitrine_requests_total{rpc=\"SearchBySku\",code=\"OK\",model_version=\"m1\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "vitrine_requests_total{rpc=\"SearchBySku\",code=\"NOT_FOUND\",model_version=\"m1\"} 1\n"
            ),
            "{out}"
        );
        let h = "vitrine_request_duration_seconds";
        assert!(
            out.contains(&format!("{h}_bucket{{rpc=\"SearchBySku\",model_version=\"m1\",le=\"0.001\"}} 1\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{h}_bucket{{rpc=\"SearchBySku\",model_version=\"m1\",le=\"0.025\"}} 2\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{h}_bucket{{rpc=\"SearchBySku\",model_version=\"m1\",le=\"+Inf\"}} 3\n")),
            "{out}"
        );
        assert!(out.contains(&format!("{h}_count{{rpc=\"SearchBySku\",model_version=\"m1\"}} 3\n")), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[("a", "x\"y\\z\n"), ("b", "")]), "a=\"x\\\"y\\\\z\\n\"");
    }
}
