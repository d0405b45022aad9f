//! The request checks the gRPC handlers run before any work, callable without a server, for
//! the fuzz targets in `fuzz/`. Each returns whether its check passed and why not; not a
//! stable API.

use crate::proto;

/// The `options` of every search request (`k`, `ef`, filter conditions and expressions).
pub fn search_options(o: Option<proto::SearchOptions>) -> Result<(), String> {
    super::options(o).map(drop).map_err(|e| e.to_string())
}

/// A request's SKU, as `SearchBySku` checks it.
pub fn request_sku(raw: &str) -> Result<(), String> {
    super::request_sku(raw).map(drop).map_err(|e| e.to_string())
}

/// A search's routing key.
pub fn routing_key(key: &str) -> Result<(), String> {
    super::check_routing_key(key).map_err(|e| e.to_string())
}

/// The SKUs of a `Delete` or `Get` request.
pub fn sku_list(raw: &[String]) -> Result<(), String> {
    super::sku_list(raw).map(drop).map_err(|e| e.to_string())
}

/// One `Upsert` item: SKU, attributes and payload.
pub fn upsert_request(req: proto::UpsertRequest) -> Result<(), String> {
    super::writes::validate(req).map(drop)
}
