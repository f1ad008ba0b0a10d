//! A counting global allocator: the largest single allocation (or reallocation) made by the
//! current thread since [`reset`]. Shared by `tests/fuzz.rs` and the cargo-fuzz targets.
//!
//! Per thread, so the tests of one binary that run in parallel do not see each other's
//! allocations. The counter is a `const`-initialised thread-local `Cell` without a destructor:
//! reading it never allocates, so the allocator cannot recurse into itself.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Wraps the system allocator and records, per thread, the largest request.
pub struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: a thread that is being torn down has no counter any more; its allocations
    // are not a target's.
    let _ = LARGEST.try_with(|largest| {
        if size > largest.get() {
            largest.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping neither allocates nor
// touches the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was handed out by `System` through this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`; `new_size` is the caller's, checked by the caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Forgets the largest allocation seen so far on this thread.
pub fn reset() {
    LARGEST.with(|largest| largest.set(0));
}

/// The largest single allocation on this thread since [`reset`], in bytes.
pub fn largest() -> usize {
    LARGEST.with(Cell::get)
}

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    reset();
    let out = f();
    (out, largest())
}
