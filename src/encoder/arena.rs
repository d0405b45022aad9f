//! Recycled `f32` buffers for the CPU forward pass: a layer takes its output buffer from the
//! calling thread's spares, and the buffer goes back there when dropped, so a warm pass
//! allocates, zeroes and page-faults nothing.
//!
//! Why: a fresh output per layer (a 1.6 MB one out of Lite0's stem) is an allocation the
//! kernel zero-fills page by page, then zeroed again by `vec![0; n]`: about 4% of a batch-1
//! pass on 2 threads (`perf`: `clear_page_erms`, `memset`, the parallel zeroing), and the
//! parallel zeroing of large outputs was one more meeting point of the threads per layer.
//! A taken buffer holds whatever its last user wrote: every kernel it is handed to writes
//! each value of its output (with debug assertions on, as under `cargo test`, buffers are
//! handed out filled with NaN, so that a value left unwritten shows in the tests' results).

use std::cell::RefCell;

/// Buffers kept per thread; more are freed when dropped. A pass holds three at a time (a
/// layer's input and output, and a block's channel groups), a per-image task two.
const SPARES: usize = 3;
/// Buffers larger than this are freed when dropped, not kept (a batch of 32 needs 8 MB at
/// most; the cap bounds what an unusual batch leaves behind on each pool thread).
const KEEP_BYTES: usize = 32 << 20;

thread_local! {
    static SPARE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` values from the calling thread's spares (or a new one), returned to the
/// spares of the thread that drops it.
#[derive(Debug)]
pub struct Buffer {
    /// At least `len` values; those past `len` belong to no one.
    data: Vec<f32>,
    len: usize,
}

impl Buffer {
    /// A buffer of `len` values whose contents are unspecified (written by an earlier user).
    pub fn take(len: usize) -> Self {
        let mut data = SPARE
            .with_borrow_mut(|spare| {
                // The smallest spare that holds `len`, else the largest (grown below).
                let fits = spare
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.len() >= len)
                    .min_by_key(|(_, b)| b.len())
                    .map(|(i, _)| i);
                let pick = fits.or_else(|| (0..spare.len()).max_by_key(|&i| spare[i].len()));
                pick.map(|i| spare.swap_remove(i))
            })
            .unwrap_or_default();
        if data.len() < len {
            data.resize(len, 0.0);
        }
        if cfg!(debug_assertions) {
            data[..len].fill(f32::NAN);
        }
        Self { data, len }
    }

    /// The buffer's values.
    pub fn as_slice(&self) -> &[f32] {
        &self.data[..self.len]
    }

    /// The buffer's values, to write.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data[..self.len]
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        if data.is_empty() || data.len() * 4 > KEEP_BYTES {
            return;
        }
        // `try_with`: a buffer dropped while its thread's locals are torn down is just freed.
        let _ = SPARE.try_with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < SPARES {
                spare.push(data);
            } else if let Some(smallest) = spare.iter_mut().min_by_key(|b| b.len())
                && smallest.len() < data.len()
            {
                *smallest = data;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_handed_out_again_without_new_memory() {
        let first = Buffer::take(1000);
        let at = first.as_slice().as_ptr();
        drop(first);
        let again = Buffer::take(600);
        assert_eq!(again.as_slice().as_ptr(), at, "the spare was reused");
        assert_eq!(again.as_slice().len(), 600);
        // Two live buffers never share memory.
        let other = Buffer::take(600);
        assert_ne!(other.as_slice().as_ptr(), at);
    }

    #[test]
    fn a_spare_too_small_is_grown_and_with_debug_assertions_every_value_starts_as_nan() {
        drop(Buffer::take(10));
        let mut b = Buffer::take(5000);
        assert_eq!(b.as_slice().len(), 5000);
        b.as_mut_slice().fill(1.0);
        drop(b);
        let again = Buffer::take(5000);
        let poisoned = again.as_slice().iter().all(|v| v.is_nan());
        assert_eq!(poisoned, cfg!(debug_assertions), "a reused buffer is poisoned exactly in debug builds");
    }

    #[test]
    fn buffers_past_the_cap_are_not_kept() {
        let big = Buffer::take(KEEP_BYTES / 4 + 1);
        let at = big.as_slice().as_ptr();
        drop(big);
        SPARE.with_borrow(|spare| assert!(spare.iter().all(|b| b.as_ptr() != at)));
    }
}
