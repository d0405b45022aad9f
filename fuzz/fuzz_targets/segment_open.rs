//! Fuzz target: `Segment::open` on any bytes, then every read the index makes of an open
//! segment (checksums, structure, SKUs, vectors, SKU lookup, HNSW and exact search). Each
//! input is tried twice: as given, and with its header, section and footer checksums
//! recomputed, so the fuzzer also reaches the structural checks and the graph walk behind the
//! crcs. Search runs whether or not `verify` passed: the reader must be robust on any file
//! `open` accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vitrine::segment::Segment;
use vitrine::segment::format::{FOOTER_LEN, Footer, HEADER_LEN, Header, SectionId};

fuzz_target!(|data: &[u8]| {
    exercise(data);
    if let Some(fixed) = with_checksums_fixed(data) {
        exercise(&fixed);
    }
});

fn exercise(bytes: &[u8]) {
    let (_dir, path) = vitrine_fuzz::temp_file("seg.vseg", bytes);
    let Ok(seg) = Segment::open(&path) else { return };
    let _ = seg.verify_checksums();
    let verified = seg.verify().is_ok();
    let (n, dim) = (seg.len(), seg.dim());
    assert!(n >= 1 && dim >= 1, "open accepted an empty segment");
    let _ = (seg.m(), seg.max_level(), seg.entry_point(), seg.is_quantised(), seg.sections());
    let shown = n.min(64) as u32;
    for i in 0..shown {
        assert_eq!(seg.vector(i).len(), dim);
        let sku = seg.sku(i).to_owned();
        let found = seg.find_sku(&sku);
        if verified {
            assert_eq!(found, Some(i), "a verified segment must find its own SKU {sku:?}");
        }
    }
    let _ = seg.find_sku("");
    let _ = seg.find_sku("\u{10ffff}");
    // A fixed query, and the first stored vector (which may be anything in an unverified file).
    let fixed: Vec<f32> = (0..dim).map(|j| (j % 5) as f32 - 1.5).collect();
    let stored = seg.vector(0).to_vec();
    let even = |idx: u32| idx % 2 == 0;
    for q in [&fixed, &stored] {
        for (k, ef) in [(1, 1), (3, 2), (10, 64)] {
            let hits = seg.search(q, k, ef, None);
            if let Ok(hits) = &hits {
                assert!(hits.len() <= k);
                assert!(hits.iter().all(|h| (h.idx as usize) < n), "hit out of range");
            }
            let _ = seg.search(q, k, ef, Some(&even));
        }
        if let Ok(hits) = seg.brute_force(q, 5, None) {
            assert!(hits.len() <= 5.min(n));
        }
    }
    // A query of the wrong length is refused, not read past.
    assert!(seg.search(&vec![1.0; dim + 1], 1, 1, None).is_err());
}

/// `bytes` with `file_len`, every crc the footer holds and the footer's own crc recomputed;
/// `None` if it is too short to hold a header and a footer.
fn with_checksums_fixed(bytes: &[u8]) -> Option<Vec<u8>> {
    let (header_len, footer_len) = (HEADER_LEN as usize, FOOTER_LEN as usize);
    if bytes.len() < header_len + footer_len {
        return None;
    }
    let mut out = bytes.to_vec();
    let mut header: Header = bytemuck::pod_read_unaligned(&out[..header_len]);
    header.file_len = out.len() as u64;
    out[..header_len].copy_from_slice(bytemuck::bytes_of(&header));
    let footer_at = out.len() - footer_len;
    let mut footer: Footer = bytemuck::pod_read_unaligned(&out[footer_at..]);
    footer.header_crc = header.compute_crc();
    for id in SectionId::ALL {
        let s = header.section(id);
        let range = usize::try_from(s.offset).ok().zip(usize::try_from(s.offset.saturating_add(s.len)).ok());
        if let Some(section) = range.and_then(|(start, end)| out.get(start..end)) {
            footer.section_crc[id as usize] = crc32fast::hash(section);
        }
    }
    footer.footer_crc = footer.compute_crc();
    out[footer_at..].copy_from_slice(bytemuck::bytes_of(&footer));
    Some(out)
}
