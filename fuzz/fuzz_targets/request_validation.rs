//! Fuzz target: any bytes as gRPC request messages (`SearchBySkuRequest`, `SearchOptions`,
//! `SearchByImageRequest`, `UpsertRequest`, `DeleteRequest`), each run through the checks its
//! handler makes before any work (`vitrine::server::fuzzing`), and as text through the filter
//! expression parser. A condition that parses must print (`Display`, the CLI syntax) to text
//! that parses back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use vitrine::index::filter::{Condition, Filter};
use vitrine::proto;
use vitrine::server::filter::from_options;
use vitrine::server::fuzzing;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = proto::SearchBySkuRequest::decode(data) {
        let _ = fuzzing::search_options(req.options);
        let _ = fuzzing::request_sku(&req.sku);
        let _ = fuzzing::routing_key(&req.routing_key);
    }
    if let Ok(o) = proto::SearchOptions::decode(data) {
        let _ = from_options(&o);
        let _ = fuzzing::search_options(Some(o));
    }
    if let Ok(req) = proto::SearchByImageRequest::decode(data) {
        let _ = fuzzing::search_options(req.options);
        let _ = fuzzing::routing_key(&req.routing_key);
    }
    if let Ok(req) = proto::UpsertRequest::decode(data) {
        let _ = fuzzing::upsert_request(req);
    }
    if let Ok(req) = proto::DeleteRequest::decode(data) {
        let _ = fuzzing::sku_list(&req.skus);
    }
    let text = String::from_utf8_lossy(data);
    for expr in text.lines() {
        if let Ok(c) = expr.parse::<Condition>() {
            let printed = c.to_string();
            assert_eq!(printed.parse::<Condition>().as_ref(), Ok(&c), "{expr:?} printed as {printed:?}");
        }
    }
    let _ = Filter::parse(text.lines());
});
