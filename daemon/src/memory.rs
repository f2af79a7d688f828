//! Giving freed memory back to the kernel. glibc's malloc keeps what the program frees for
//! reuse, and only hands back the top of the heap; after the first index of a large repository
//! (hundreds of thousands of transient paths) or a released git index, megabytes of free
//! chunks stay resident between live ones, and the daemon's RSS stays at its high-water mark.
//! `malloc_trim(0)` returns every whole free page of every arena. This is the one module with
//! `unsafe`: the call has no Rust binding.
#![allow(unsafe_code)]

/// Work that frees at least this many entries (files indexed, index entries dropped) is worth
/// a trim; below it the free chunks are reused soon enough.
pub(crate) const TRIM_AFTER: usize = 10_000;

/// Return free heap pages to the kernel (glibc's `malloc_trim`); a no-op on other C libraries,
/// whose allocators trim on their own or offer no such call. It walks the arenas under their
/// locks, so it runs after large one-off work, never per request.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes no pointers; it only walks glibc's own arenas, under their
        // locks, and is safe to call from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}
