//! Giving freed expert weights back to the operating system. Expert weights are many
//! megabyte-sized buffers; glibc's allocator keeps freed ones in its arenas (its mmap threshold
//! rises to the largest buffer freed, so later ones live in the heap), so a node that unloaded
//! half its experts would keep their memory resident. After every load (whose staging buffers
//! are freed) and unload the node asks the allocator to return free pages ([`release_to_os`]),
//! and reports the bytes of its experts next to its private memory
//! ([`moe_meta::telemetry::process::private_bytes`]).
//! The one `unsafe` call is the C library's `malloc_trim`.
#![allow(unsafe_code)]

/// Returns the allocator's free pages to the operating system (glibc `malloc_trim`, which
/// releases whole free pages inside every arena, not only at the top of the heap). A no-op
/// where the C library is not glibc.
pub fn release_to_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
