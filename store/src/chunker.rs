//! How files are cut into chunks.
//!
//! * CRIU memory images (`pages-*.img`) are cut on page boundaries (4 KiB): a page that is
//!   equal in two replicas, or in two generations of one container, is stored once, whatever
//!   its position in the file.
//! * Small files (up to [`WHOLE_FILE_MAX`]) are one chunk each: CRIU's many small images
//!   (core, mm, fdinfo, ...) and our metadata change as a whole.
//! * Other large files (the rootfs diff tar, big non-page images) are cut with content-defined
//!   chunking (FastCDC 2020, 16/64/256 KiB), so an insertion does not shift every later chunk.

use std::io::Read;

/// Page size of the memory images.
pub const PAGE_SIZE: usize = 4096;
/// Files at most this large are stored as a single chunk.
pub const WHOLE_FILE_MAX: u64 = 256 * 1024;
/// FastCDC minimum chunk size.
pub const CDC_MIN: u32 = 16 * 1024;
/// FastCDC average chunk size.
pub const CDC_AVG: u32 = 64 * 1024;
/// FastCDC maximum chunk size.
pub const CDC_MAX: u32 = 256 * 1024;

/// The chunking applied to one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunking {
    /// Fixed 4 KiB pages.
    Pages,
    /// The whole file is one chunk.
    Whole,
    /// Content-defined chunks.
    ContentDefined,
}

/// True for CRIU memory image names (`pages-<n>.img`).
pub fn is_page_image(file_name: &str) -> bool {
    file_name.starts_with("pages-") && file_name.ends_with(".img")
}

/// Chooses the chunking of a file from its name and size.
pub fn chunking_for(file_name: &str, size: Option<u64>) -> Chunking {
    if is_page_image(file_name) {
        Chunking::Pages
    } else if size.is_some_and(|s| s <= WHOLE_FILE_MAX) {
        Chunking::Whole
    } else {
        Chunking::ContentDefined
    }
}

/// Reads until `buf` is full or the input ends; returns the number of bytes read.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose() {
        assert_eq!(chunking_for("pages-1.img", Some(1)), Chunking::Pages);
        assert_eq!(chunking_for("core-1.img", Some(100)), Chunking::Whole);
        assert_eq!(
            chunking_for("rootfs-diff.tar", Some(10 << 20)),
            Chunking::ContentDefined
        );
        assert_eq!(chunking_for("x", None), Chunking::ContentDefined);
    }
}
