//! Fuzz target: the write-ahead log's recovery (`Wal::open`) on any log files, and
//! `Change::decode` on its records. The input's first three bytes pick the checkpoint, the
//! first file's seq and whether the rest is split into two files; the rest is file content.
//! A log that opens must take an append and replay it on the next open; a record that
//! decodes must encode and decode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vitrine::index::entry::Change;
use vitrine::index::wal::{Wal, file_name};

/// Checkpoints and first seqs worth trying: the start, small values, and the top of the range.
const SEQS: [u64; 8] = [0, 1, 2, 3, 7, 100, u64::MAX - 1, u64::MAX];

fuzz_target!(|data: &[u8]| {
    let Some((&[ckpt, first, split], body)) = data.split_first_chunk::<3>() else { return };
    check_record(body);
    let after_seq = SEQS[usize::from(ckpt) % SEQS.len()];
    let first_seq = SEQS[usize::from(first) % SEQS.len()].max(1);
    let dir = tempfile::tempdir().expect("temporary folder");
    let wal_dir = dir.path().join("wal");
    std::fs::create_dir(&wal_dir).expect("wal folder");
    if split % 2 == 1 {
        // Two files: the second starts `split / 16` seqs after the first.
        let at = usize::from(split) * body.len() / 256;
        let second_seq = first_seq.saturating_add(u64::from(split / 16));
        std::fs::write(wal_dir.join(file_name(first_seq)), &body[..at]).expect("write log");
        std::fs::write(wal_dir.join(file_name(second_seq)), &body[at..]).expect("write log");
    } else {
        std::fs::write(wal_dir.join(file_name(first_seq)), body).expect("write log");
    }
    let Ok((wal, replayed)) = Wal::open(&wal_dir, after_seq) else { return };
    let mut prev = after_seq;
    for (seq, record) in &replayed.records {
        assert!(*seq > prev, "records must be replayed in seq order, after the checkpoint");
        prev = *seq;
        check_record(record);
    }
    let seq = wal.append(b"fuzz").expect("a log that opened takes an append");
    assert_eq!(seq, wal.last_seq());
    drop(wal);
    let (_, again) = Wal::open(&wal_dir, after_seq).expect("a log that took an append must reopen");
    assert_eq!(again.records.last(), Some(&(seq, b"fuzz".to_vec())), "the appended record is replayed");
});

fn check_record(bytes: &[u8]) {
    if let Ok(change) = Change::decode(bytes) {
        let encoded = change.encode();
        let again = Change::decode(&encoded).expect("an encoded change decodes");
        assert_eq!(again.encode(), encoded);
    }
}
