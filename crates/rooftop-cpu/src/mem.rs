//! Weight buffers on transparent huge pages.
//!
//! Why: a decode token streams hundreds of MB, 4 KiB at a time per page; with 4 KiB
//! pages every page costs a TLB miss and a page walk, and the hardware prefetcher
//! stops at every page boundary. On 2 MiB pages both go away. Linux gives anonymous
//! memory huge pages when asked with `madvise(MADV_HUGEPAGE)` (the default THP mode
//! on many distributions is `madvise`, so without asking there are none).

use std::ops::{Deref, DerefMut};

const HUGE: usize = 2 << 20;

/// Whether new buffers ask for huge pages: yes unless `ROOFTOP_HUGEPAGES=0` (for A/B
/// measurements).
pub fn huge_pages() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ROOFTOP_HUGEPAGES").map_or(true, |v| v != "0"))
}

/// A zero-initialised byte buffer, 2 MiB aligned, huge pages requested (on Linux;
/// elsewhere, or if the kernel declines, plain pages).
pub struct HugeBuf {
    ptr: *mut u8,
    len: usize,
    /// Mapped bytes (`len` rounded up to 2 MiB); 0 for the heap fallback.
    mapped: usize,
    heap: Vec<u8>,
}

// SAFETY: owns its memory exclusively, like a Vec<u8>.
unsafe impl Send for HugeBuf {}
unsafe impl Sync for HugeBuf {}

impl HugeBuf {
    pub fn zeroed(len: usize) -> HugeBuf {
        #[cfg(target_os = "linux")]
        if len >= HUGE && huge_pages() {
            let mapped = len.div_ceil(HUGE) * HUGE;
            // Map 2 MiB more, then trim to an aligned start.
            // SAFETY: plain anonymous mappings; every pointer stays inside them.
            unsafe {
                let raw = libc::mmap(
                    std::ptr::null_mut(),
                    mapped + HUGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if raw != libc::MAP_FAILED {
                    let start = (raw as usize).div_ceil(HUGE) * HUGE;
                    let head = start - raw as usize;
                    if head > 0 {
                        libc::munmap(raw, head);
                    }
                    let tail = HUGE - head;
                    if tail > 0 {
                        libc::munmap((start + mapped) as *mut libc::c_void, tail);
                    }
                    libc::madvise(start as *mut libc::c_void, mapped, libc::MADV_HUGEPAGE);
                    return HugeBuf {
                        ptr: start as *mut u8,
                        len,
                        mapped,
                        heap: Vec::new(),
                    };
                }
            }
        }
        let mut heap = vec![0u8; len];
        HugeBuf {
            ptr: heap.as_mut_ptr(),
            len,
            mapped: 0,
            heap,
        }
    }
}

impl HugeBuf {
    /// Give the pages back to the OS, keeping the mapping: the bytes read as zeros
    /// afterwards. For weights whose packed copy ([`crate::lanes`]) replaced them. A
    /// heap-backed (small) buffer is zeroed in place instead.
    pub fn discard(&mut self) {
        #[cfg(target_os = "linux")]
        if self.mapped > 0 {
            // SAFETY: our own private anonymous mapping; MADV_DONTNEED on it makes
            // later reads see zero pages (still valid, initialised memory).
            unsafe {
                libc::madvise(
                    self.ptr as *mut libc::c_void,
                    self.mapped,
                    libc::MADV_DONTNEED,
                )
            };
            return;
        }
        self.fill(0);
    }
}

impl Deref for HugeBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if self.mapped == 0 {
            return &self.heap;
        }
        // SAFETY: `len` bytes mapped and owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl DerefMut for HugeBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        if self.mapped == 0 {
            return &mut self.heap;
        }
        // SAFETY: as above, exclusive through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if self.mapped > 0 {
            // SAFETY: the mapping made in `zeroed`.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.mapped) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_and_small_buffers_are_zeroed_and_writable() {
        for len in [0usize, 100, HUGE + 12345] {
            let mut b = HugeBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0));
            for (i, v) in b.iter_mut().enumerate() {
                *v = i as u8;
            }
            assert!(b.iter().enumerate().all(|(i, &v)| v == i as u8));
        }
    }
}
