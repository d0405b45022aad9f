//! A real vitrine server on 127.0.0.1:0 for integration tests (gRPC and a metrics listener),
//! shared by the test files that need one.
#![allow(dead_code)] // each test module uses its own part

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use vitrine::models::ModelRegistry;
use vitrine::proto::{self, visual_search_client::VisualSearchClient};
use vitrine::server::{ServeConfig, serve_with_metrics};

/// The shipped models, on the default device.
pub fn models() -> Arc<ModelRegistry> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    Arc::new(ModelRegistry::new(root, vitrine::encoder::default_device().unwrap()))
}

pub struct Server {
    pub addr: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    pub async fn start(config: ServeConfig, models: Arc<ModelRegistry>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = metrics_listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task =
            tokio::spawn(serve_with_metrics(config, models, listener, Some(metrics_listener), async move {
                let _ = rx.await;
            }));
        Self { addr, metrics, stop, task }
    }

    /// The value of each sample of `GET /metrics` whose line starts with `prefix`.
    pub async fn metric(&self, prefix: &str) -> Vec<(String, f64)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut raw = String::new();
        conn.read_to_string(&mut raw).await.unwrap();
        raw.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap();
                (series.to_string(), value.parse().unwrap())
            })
            .collect()
    }

    pub async fn channel(&mut self) -> Channel {
        let url = format!("http://{}", self.addr);
        for _ in 0..600 {
            if self.task.is_finished() {
                let ended = (&mut self.task).await;
                panic!("server at {url} stopped before answering: {ended:?}");
            }
            if let Ok(c) = Channel::from_shared(url.clone()).unwrap().connect().await {
                let mut probe = VisualSearchClient::new(c.clone());
                if probe.get_index_info(proto::GetIndexInfoRequest {}).await.is_ok() {
                    return c;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server at {url} never came up");
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}
