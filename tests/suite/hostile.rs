//! Hostile requests against a real server: every field is bounded and checked before any
//! expensive work, with INVALID_ARGUMENT and a message that never echoes unbounded input.

use crate::common::{self, Server};

use std::path::Path;

use tonic::Code;
use vitrine::proto::visual_search_client::VisualSearchClient;
use vitrine::proto::{self, SearchOptions};
use vitrine::server::{MAX_IMAGE_BYTES, ServeConfig};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The status is INVALID_ARGUMENT, short, and says `what`.
#[track_caller]
fn invalid(r: Result<impl std::fmt::Debug, tonic::Status>, what: &str) {
    let s = r.expect_err("must be refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().len() < 400, "message of {} bytes echoes the input", s.message().len());
    assert!(s.message().contains(what), "{:?} lacks {what:?}", s.message());
}

fn by_sku(sku: &str) -> proto::SearchBySkuRequest {
    proto::SearchBySkuRequest { sku: sku.into(), ..Default::default() }
}

fn by_image(image: Vec<u8>) -> proto::SearchByImageRequest {
    proto::SearchByImageRequest { image, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_with_short_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(ServeConfig::new(dir.path()), common::models()).await;
    let mut c = VisualSearchClient::new(server.channel().await).max_encoding_message_size(64 << 20);
    let huge = "S".repeat(1 << 20);
    invalid(c.search_by_sku(by_sku(&huge)).await, "limit is 256");
    invalid(c.search_by_sku(by_sku("MUG\u{7}042")).await, "control character");
    invalid(c.delete(proto::DeleteRequest { skus: vec![huge.clone()] }).await, "invalid sku");
    invalid(c.get(proto::GetRequest { skus: vec!["ok".into(), "\n".into()] }).await, "control character");
    let mut req = by_sku("MUG-042");
    req.routing_key = huge.clone();
    invalid(c.search_by_sku(req).await, "routing_key");
    let mut req = by_sku("MUG-042");
    req.options = Some(SearchOptions { k: 1_000_000, ..Default::default() });
    invalid(c.search_by_sku(req).await, "k = 1000000");
    let mut req = by_sku("MUG-042");
    req.options = Some(SearchOptions { filter_exprs: vec!["a=b".into(); 100_000], ..Default::default() });
    invalid(c.search_by_sku(req).await, "conditions");
    let mut req = by_sku("MUG-042");
    req.options = Some(SearchOptions { filter_exprs: vec![format!("{huge}=v")], ..Default::default() });
    invalid(c.search_by_sku(req).await, "filter");

    let upsert = |sku: &str, version: &str| proto::UpsertRequest {
        sku: sku.into(),
        attrs: None,
        payload: Some(proto::upsert_request::Payload::Vector(proto::VectorPayload {
            model_version: version.into(),
            values: vec![1.0; 4],
        })),
    };
    invalid(c.upsert(upsert(&huge, "efficientnet-lite0")).await, "invalid sku");
    invalid(c.upsert(upsert("MUG-042", &huge)).await, "model version");

    // Images: the size limit is the image's, checked before decoding; truncated and
    // decode-memory bombs are refused.
    invalid(c.search_by_image(by_image(vec![0xFF; MAX_IMAGE_BYTES + 1])).await, "limit is");
    let jpeg = std::fs::read(repo().join("data/bad/ok-2.jpg")).unwrap();
    invalid(c.search_by_image(by_image(jpeg[..jpeg.len() * 2 / 3].to_vec())).await, "truncated");
    let mut png = Vec::new();
    image::DynamicImage::ImageRgba16(image::ImageBuffer::new(6324, 6324))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    assert!(png.len() < 2 << 20, "{} bytes", png.len());
    invalid(c.search_by_image(by_image(png)).await, "decoding budget");

    // A client's deadline is honoured: an image query given 1 ms ends with the deadline.
    let jpeg = std::fs::read(repo().join("data/bad/ok-2.jpg")).unwrap();
    let mut req = tonic::Request::new(by_image(jpeg));
    req.set_timeout(std::time::Duration::from_millis(1));
    let err = c.search_by_image(req).await.expect_err("past its deadline");
    assert!(matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded), "{err:?}");
}

/// `Rollouts/Start` takes a golden set of up to 512 MiB; every other `Rollouts` method (a
/// `Status` read) has the same 40 MiB request limit as the search service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_reads_do_not_take_golden_set_sized_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(ServeConfig::new(dir.path()), common::models()).await;
    let channel = server.channel().await;
    let big = proto::RolloutStartRequest {
        model_version: "no-such-model".into(),
        golden: vec![proto::GoldenQuery {
            image: vec![7; 41 << 20],
            expected: vec!["X".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let call = |path: &'static str| {
        let (channel, big) = (channel.clone(), big.clone());
        async move {
            let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
            grpc.ready().await.unwrap();
            let codec =
                tonic_prost::ProstCodec::<proto::RolloutStartRequest, proto::RolloutStatus>::default();
            let path = http::uri::PathAndQuery::from_static(path);
            grpc.unary(tonic::Request::new(big), path, codec).await
        }
    };
    let err = call("/vitrine.v1.Rollouts/Status").await.expect_err("over the read limit");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // The same bytes are within Start's limit: decoded, then refused for what they say.
    let err = call("/vitrine.v1.Rollouts/Start").await.expect_err("no such model");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// A call the client abandons before its answer (an image query dropped while the server
/// decodes its 36-megapixel image) is logged and counted as `CANCELLED`, not lost from the
/// request counts, and its embedding stops after the decode (no forward pass: the
/// embedding slot is freed sooner). Every call that reaches the server is counted with some
/// code, so the test retries with another delay when the call ended first, never arrived, or
/// was dropped only during its forward pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_calls_are_counted_as_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(ServeConfig::new(dir.path()), common::models()).await;
    let c = VisualSearchClient::new(server.channel().await).max_encoding_message_size(64 << 20);
    let gradient =
        image::RgbImage::from_fn(6000, 6000, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, 90]));
    let mut png = Vec::new();
    gradient.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let sum = |prefix: String| {
        let server = &server;
        async move { server.metric(&prefix).await.iter().map(|(_, n)| n).sum::<f64>() }
    };
    let count =
        |code: &'static str| sum(format!("vitrine_requests_total{{rpc=\"SearchByImage\",code=\"{code}\""));
    let encoded = || sum("vitrine_encoded_images_total".to_string());
    let mut delay = std::time::Duration::from_millis(100);
    for attempt in 0..8 {
        let before = (count("CANCELLED").await, count("OK").await, encoded().await);
        let (mut c, png) = (c.clone(), png.clone());
        let call = tokio::spawn(async move { c.search_by_image(by_image(png)).await });
        tokio::time::sleep(delay).await;
        call.abort();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut cancelled = false;
        while std::time::Instant::now() < deadline {
            cancelled = count("CANCELLED").await > before.0;
            if cancelled || count("OK").await > before.1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if cancelled {
            // The abandoned task finishes its decode, then stops before the forward pass.
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            if encoded().await == before.2 {
                return;
            }
            println!("attempt {attempt}: cancelled, but the image was embedded (dropped mid forward pass?)");
            delay /= 2;
            continue;
        }
        // Answered before the abort: abort sooner; never arrived: later.
        delay = if count("OK").await > before.1 { delay / 2 } else { delay * 2 };
        println!("attempt {attempt}: no CANCELLED count, next delay {delay:?}");
    }
    panic!("an abandoned call was never counted as CANCELLED with its forward pass skipped");
}
