//! The `Rollouts` service with a request size limit per method: tonic sets one limit per
//! service, and only `Start` carries a golden set of images.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::{Body, StdError};
use tonic::server::NamedService;
use tower_service::Service;

use crate::proto::rollouts_server::{Rollouts, RolloutsServer};

/// The one method whose requests may be large.
const START_PATH: &str = "/vitrine.v1.Rollouts/Start";

/// Routes `Start` to a server that decodes requests of up to `start_limit` bytes and every
/// other method (`Status`, `Promote`, ...: a few bytes each) to one with `other_limit`, so that
/// a read cannot make the server buffer a golden set's worth of bytes (four 400 MB `Status`
/// calls took the server to 1.2 GB). A request over its limit is `OUT_OF_RANGE`, as before.
pub struct RolloutsByMethod<T> {
    start: RolloutsServer<T>,
    other: RolloutsServer<T>,
}

impl<T> RolloutsByMethod<T> {
    pub fn new(service: T, start_limit: usize, other_limit: usize) -> Self {
        let service = Arc::new(service);
        Self {
            start: RolloutsServer::from_arc(Arc::clone(&service)).max_decoding_message_size(start_limit),
            other: RolloutsServer::from_arc(service).max_decoding_message_size(other_limit),
        }
    }
}

impl<T> Clone for RolloutsByMethod<T> {
    fn clone(&self) -> Self {
        Self { start: self.start.clone(), other: self.other.clone() }
    }
}

impl<T> NamedService for RolloutsByMethod<T> {
    const NAME: &'static str = <RolloutsServer<T> as NamedService>::NAME;
}

impl<T, B> Service<http::Request<B>> for RolloutsByMethod<T>
where
    T: Rollouts,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = <RolloutsServer<T> as Service<http::Request<B>>>::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both inner servers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == START_PATH { self.start.call(req) } else { self.other.call(req) }
    }
}
