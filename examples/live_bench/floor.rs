//! Phase 2f, the floor under phase 2a: a bare gRPC server beside vitrine's, on the same runtime,
//! that answers `Upsert` with nothing but group commit. Each request's SKU and vector go, framed
//! with a CRC, to one thread that writes every record waiting with one positional write into a
//! preallocated, zero-filled file and calls `sync_data` before it answers them (as vitrine's log
//! does, without its spare files, validation, index, seals or merges). The same clients at the
//! same rate then measure what tonic, group commit and this disk alone give on this machine,
//! and 2a's p99 reads as a ratio to it, measured in the same run.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::Context;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};
use vitrine::proto;
use vitrine::proto::visual_search_server::{VisualSearch, VisualSearchServer};

/// Bytes of the preallocated file at most: a longer phase wraps around and overwrites its start
/// (zeros or earlier records: either way no file size or extent changes, as in vitrine's log).
const MAX_FILE: u64 = 512 << 20;

/// One record for the committer and the answer it sends once the record is on disk.
type Pending = (Vec<u8>, oneshot::Sender<()>);

/// The floor server, running until [`Floor::stop`].
pub struct Floor {
    pub url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    committer: std::thread::JoinHandle<std::io::Result<u64>>,
}

impl Floor {
    /// Zero-fills `bytes` (rounded up to a MiB, at most [`MAX_FILE`]) of a file in `dir`, syncs
    /// it, then serves on 127.0.0.1:0 with TCP_NODELAY, as vitrine does.
    pub async fn start(dir: &Path, bytes: u64) -> anyhow::Result<Self> {
        let path = dir.join("floor-log");
        let size = bytes.div_ceil(1 << 20).clamp(1, MAX_FILE >> 20) << 20;
        let file = {
            let at = path.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .read(true)
                    .write(true)
                    .open(&at)?;
                let zeros = vec![0u8; 1 << 20];
                for at in (0..size).step_by(zeros.len()) {
                    file.write_all_at(&zeros, at)?;
                }
                file.sync_all()?;
                Ok(file)
            })
            .await?
            .with_context(|| format!("preallocating {}", path.display()))?
        };
        let (tx, rx) = mpsc::channel::<Pending>();
        let committer = std::thread::Builder::new()
            .name("floor-commit".into())
            .spawn(move || commit(&file, size, &rx))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stop, stopped) = oneshot::channel::<()>();
        let service = VisualSearchServer::new(FloorService { tx }).max_decoding_message_size(64 << 20);
        let task = tokio::spawn(
            tonic::transport::Server::builder().add_service(service).serve_with_incoming_shutdown(
                incoming,
                async {
                    let _ = stopped.await;
                },
            ),
        );
        Ok(Self { url, stop, task, committer })
    }

    /// Stops the server and its committer; returns the number of `sync_data` calls it made.
    pub async fn stop(self) -> anyhow::Result<u64> {
        let _ = self.stop.send(());
        // The service (and with it the committer's channel) is dropped when the server ends.
        self.task.await?.context("the floor server")?;
        let syncs = tokio::task::spawn_blocking(move || self.committer.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the floor's committer panicked"))??;
        // The file stays until the bench removes its directory: deleting 100s of MiB here
        // could issue discards while the next phase is measured.
        Ok(syncs)
    }
}

/// Group commit: waits for one record, takes every other one already waiting, writes them all
/// with one positional write, syncs, answers. Returns the number of syncs once every sender is gone.
fn commit(file: &std::fs::File, size: u64, rx: &mpsc::Receiver<Pending>) -> std::io::Result<u64> {
    let (mut at, mut syncs) = (0u64, 0u64);
    let mut buf = Vec::new();
    let mut answers = Vec::new();
    while let Ok(first) = rx.recv() {
        buf.clear();
        for (record, answer) in std::iter::once(first).chain(rx.try_iter()) {
            buf.extend_from_slice(&record);
            answers.push(answer);
        }
        if at + buf.len() as u64 > size {
            at = 0;
        }
        file.write_all_at(&buf, at)?;
        file.sync_data()?;
        // As vitrine's log does: background file writes in this process slow down meanwhile.
        vitrine::fsutil::note_log_sync();
        syncs += 1;
        at += buf.len() as u64;
        for answer in answers.drain(..) {
            let _ = answer.send(());
        }
    }
    Ok(syncs)
}

/// Diagnostic (`--floor-background`): rewrites a file of `bytes` zeros in `dir` through
/// [`vitrine::fsutil::Paced`] and syncs it, over and over from an idle-class thread, as
/// vitrine's spare log files are prepared, until `stop`: the floor with that IO beside it.
pub fn background_writer(
    dir: &Path,
    bytes: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<std::io::Result<u64>>> {
    let dir = dir.to_path_buf();
    // FLOOR_BG_NEW: unset, the same file overwritten in place; `1` a new file each time, the
    // last one deleted at once; `keep` new files, none deleted; `trickle` new files, each dead
    // one shrunk 1 MiB at a time while the next is written.
    let mode = std::env::var("FLOOR_BG_NEW").unwrap_or_default();
    std::thread::Builder::new().name("floor-bg".into()).spawn(move || {
        vitrine::background::lower_current_thread();
        let zeros = vec![0u8; 1 << 20];
        let mut files = 0;
        let mut dead: std::collections::VecDeque<(PathBuf, u64)> = Default::default();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            // Only while the floor acknowledges writes (not while the clients draw vectors).
            if !vitrine::fsutil::log_is_live() {
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            let path = if mode.is_empty() {
                dir.join("floor-background")
            } else {
                dir.join(format!("floor-background-{files}"))
            };
            let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, vitrine::fsutil::Paced::new(&file));
            for _ in 0..bytes.div_ceil(zeros.len() as u64) {
                std::io::Write::write_all(&mut w, &zeros)?;
                if let Some((p, len)) = dead.front_mut() {
                    *len = len.saturating_sub(1 << 20);
                    if *len == 0 {
                        std::fs::remove_file(&*p)?;
                        dead.pop_front();
                    } else {
                        std::fs::OpenOptions::new().write(true).open(&*p)?.set_len(*len)?;
                    }
                }
            }
            std::io::Write::flush(&mut w)?;
            drop(w);
            file.sync_all()?;
            files += 1;
            match mode.as_str() {
                "1" => std::fs::remove_file(&path)?,
                "trickle" => dead.push_back((path, bytes)),
                _ => {}
            }
        }
        for (p, _) in dead {
            let _ = std::fs::remove_file(p);
        }
        Ok(files)
    })
}

/// Diagnostic (`--floor-background-cpu`): an idle-class thread that computes (dot products
/// over 4 MiB, yielding through [`vitrine::background::yield_point`] as graph builds do) until
/// `stop`, while the floor acknowledges writes.
pub fn background_spinner(
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<f32>> {
    std::thread::Builder::new().name("floor-cpu".into()).spawn(move || {
        vitrine::background::lower_current_thread();
        let data: Vec<f32> = (0..1 << 20).map(|i| (i % 97) as f32 * 0.01).collect();
        let mut acc = 0f32;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if !vitrine::fsutil::log_is_live() {
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            for row in data.chunks(1280) {
                acc += row.iter().zip(&data[..row.len()]).map(|(a, b)| a * b).sum::<f32>();
                vitrine::background::yield_point();
            }
        }
        acc
    })
}

/// `Upsert` only; every other method is UNIMPLEMENTED.
struct FloorService {
    tx: mpsc::Sender<Pending>,
}

#[tonic::async_trait]
impl VisualSearch for FloorService {
    async fn upsert(
        &self,
        request: Request<proto::UpsertRequest>,
    ) -> Result<Response<proto::UpsertResponse>, Status> {
        let req = request.into_inner();
        let Some(proto::upsert_request::Payload::Vector(v)) = &req.payload else {
            return Err(Status::invalid_argument("the floor takes vectors only"));
        };
        // Frame: length, CRC-32 of the body, body (SKU length, SKU, values), as a log record.
        let values: &[u8] = bytemuck::cast_slice(&v.values);
        let mut body = Vec::with_capacity(4 + req.sku.len() + values.len());
        body.extend_from_slice(&(req.sku.len() as u32).to_le_bytes());
        body.extend_from_slice(req.sku.as_bytes());
        body.extend_from_slice(values);
        let mut record = Vec::with_capacity(8 + body.len());
        record.extend_from_slice(&(body.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        record.extend_from_slice(&body);
        let (done, on_disk) = oneshot::channel();
        self.tx.send((record, done)).map_err(|_| Status::unavailable("the floor's committer stopped"))?;
        on_disk.await.map_err(|_| Status::internal("the floor's committer failed"))?;
        Ok(Response::new(proto::UpsertResponse { sku: req.sku, outcome: proto::UpsertOutcome::Added as i32 }))
    }

    async fn search_by_image(
        &self,
        _: Request<proto::SearchByImageRequest>,
    ) -> Result<Response<proto::SearchResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn search_by_vector(
        &self,
        _: Request<proto::SearchByVectorRequest>,
    ) -> Result<Response<proto::SearchResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn search_by_sku(
        &self,
        _: Request<proto::SearchBySkuRequest>,
    ) -> Result<Response<proto::SearchResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn get_index_info(
        &self,
        _: Request<proto::GetIndexInfoRequest>,
    ) -> Result<Response<proto::IndexInfo>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn upsert_stream(
        &self,
        _: Request<Streaming<proto::UpsertRequest>>,
    ) -> Result<Response<proto::UpsertStreamResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn delete(
        &self,
        _: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }

    async fn get(&self, _: Request<proto::GetRequest>) -> Result<Response<proto::GetResponse>, Status> {
        Err(Status::unimplemented("floor"))
    }
}
