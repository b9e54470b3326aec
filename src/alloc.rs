//! The process's memory allocator: mimalloc for everyday allocations, the system's for huge
//! buffers.
//!
//! Each forwarded call allocates and frees many small buffers across threads. With glibc's
//! malloc alone, once 10,000 sessions had come and gone the relay's CPU per call at saturation
//! rose by a third and `connect`'s by half (a fragmented heap: `_int_malloc` and `unlink_chunk`
//! at the top of the profile); mimalloc keeps it flat. With mimalloc alone, buffers of tens of
//! MiB (a 100 MiB message read whole) were slower: growing one copies it, where glibc remaps
//! its pages (`mremap`). So allocations from
//! [`HUGE`] up go to the system allocator and the rest to mimalloc (BENCHMARKS.md, "The
//! allocator").

use std::alloc::{GlobalAlloc, Layout, System};

use mimalloc::MiMalloc;

/// From this size on, an allocation is the system allocator's: past glibc's default
/// `mmap` threshold range, where each block is its own mapping that `realloc` can remap.
pub const HUGE: usize = 4 << 20;

/// mimalloc below [`HUGE`], the system allocator from it. Every block is freed and resized by
/// the allocator that made it: Rust passes the block's allocation layout to `dealloc` and
/// `realloc`, so its size says which one that was.
pub struct Split;

impl Split {
    fn is_huge(size: usize) -> bool {
        size >= HUGE
    }
}

// SAFETY: each method forwards to an allocator upholding the `GlobalAlloc` contract, and a
// block is always returned to the allocator chosen by its own size (see `Split`); a realloc
// across the threshold allocates in the other allocator, copies the smaller of the two sizes
// and frees the old block in its own allocator.
unsafe impl GlobalAlloc for Split {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees (non-zero size).
        unsafe {
            if Self::is_huge(layout.size()) {
                System.alloc(layout)
            } else {
                MiMalloc.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if Self::is_huge(layout.size()) {
                System.alloc_zeroed(layout)
            } else {
                MiMalloc.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `layout` is the block's allocation layout, so its size picks the allocator
        // that made it.
        unsafe {
            if Self::is_huge(layout.size()) {
                System.dealloc(ptr, layout)
            } else {
                MiMalloc.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (was, will) = (Self::is_huge(layout.size()), Self::is_huge(new_size));
        // SAFETY: same-side resizes forward with the caller's guarantees; a move across sides
        // allocates a valid layout of `new_size` (same alignment, which the caller guarantees
        // valid for it), copies what both blocks hold, and frees the old block by its layout.
        unsafe {
            match (was, will) {
                (true, true) => System.realloc(ptr, layout, new_size),
                (false, false) => MiMalloc.realloc(ptr, layout, new_size),
                _ => {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}
