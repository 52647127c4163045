//! Giving freed memory back to the operating system. glibc's allocator keeps freed buffers in
//! its arenas (its mmap threshold rises to the largest buffer freed, so later ones live in the
//! heap), so memory a process used once stays resident: an expert node that unloaded half its
//! experts, or a router that tokenized a multi-megabyte prompt (its pre-tokenizer's splits
//! and offsets are hundreds of small allocations per kilobyte of text) before refusing it for
//! length. Expert nodes call [`release_to_os`] after every load and unload; routers after
//! preparing a large request body. Both report their private memory
//! ([`crate::telemetry::process::private_bytes`]).
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
