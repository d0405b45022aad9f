//! The metrics listener: a minimal HTTP/1.1 server answering `GET /metrics` with the
//! Prometheus text format (one response per connection), 404 for other paths.

use std::sync::Weak;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::ServerState;

/// Largest request head read.
const MAX_HEAD: usize = 8 << 10;
/// Longest a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The status of the answer to a request line (200 only for `GET /metrics`).
pub fn route(request_line: &str) -> &'static str {
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => "200 OK",
        ("GET", _) => "404 Not Found",
        _ => "405 Method Not Allowed",
    }
}

async fn answer(mut conn: TcpStream, state: Weak<ServerState>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(READ_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&head);
    let status = route(text.lines().next().unwrap_or(""));
    let body = match state.upgrade() {
        Some(state) if status == "200 OK" => state.metrics.render(&state),
        _ => format!("{status}\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}

/// Serves `/metrics` on `listener` until the task is aborted; holds the state only while a
/// scrape renders, so it never delays the server's shutdown.
pub fn spawn(listener: TcpListener, state: Weak<ServerState>) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let state = Weak::clone(&state);
                    tokio::spawn(async move {
                        if let Err(e) = answer(conn, state).await {
                            tracing::debug!("metrics connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route("GET /metrics HTTP/1.1"), "200 OK");
        assert_eq!(route("GET /metrics?x=1 HTTP/1.1"), "200 OK");
        assert_eq!(route("GET / HTTP/1.1"), "404 Not Found");
        assert_eq!(route("POST /metrics HTTP/1.1"), "405 Method Not Allowed");
        assert_eq!(route(""), "405 Method Not Allowed");
    }
}
