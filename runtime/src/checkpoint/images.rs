//! Checks on a checkpoint's images before CRIU restores from them.
//!
//! CRIU trusts its images. A pages file shorter than its pagemap promises is the one
//! damage that does not make it fail: its restorer reads the pages of a mapping in a loop
//! that takes a read of zero bytes (end of file) as progress, and spins in the restored
//! task forever (CRIU 4.2). Truncation is what an interrupted copy or a full disk leaves,
//! so every restore first checks that each pages file holds at least what its pagemap
//! needs ([`check_pages`]); it reads only the small pagemap images.
//!
//! A pagemap image (`pagemap-ID.img`) is two little-endian u32 magics (CRIU's common image
//! magic, then the pagemap magic) and then entries, each a u32 length and a protobuf
//! message: one `pagemap_head` naming the pages file (`pages-PAGES_ID.img`), then one
//! `pagemap_entry` per run of pages (`criu/pagemap.proto` in the proto crate).

use std::path::Path;

use prost::Message;
use runc_architect_proto::criu::{PagemapEntry, PagemapHead};

const COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;

/// Pagemap entry flags (CRIU's `PE_*`).
const PE_PARENT: u32 = 1 << 0;
const PE_PRESENT: u32 = 1 << 2;

/// What one pagemap image says about its pages file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    pub pages_id: u32,
    /// Pages stored in the pages file.
    pub present_pages: u64,
    /// Some pages are in a parent checkpoint (an incremental dump).
    pub uses_parent: bool,
}

/// Decodes a pagemap image.
pub fn decode_pagemap(bytes: &[u8]) -> Result<Pagemap, String> {
    let word = |at: usize| -> Result<u32, String> {
        bytes
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| format!("ends inside a header at byte {at}"))
    };
    if word(0)? != COMMON_MAGIC || word(4)? != PAGEMAP_MAGIC {
        return Err(format!(
            "not a pagemap image (magic {:#x} {:#x})",
            word(0)?,
            word(4)?
        ));
    }
    let mut at = 8;
    let mut entry = || -> Result<Option<&[u8]>, String> {
        if at == bytes.len() {
            return Ok(None);
        }
        let len = word(at)? as usize;
        let body = bytes
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| format!("entry at byte {at} of {len} bytes is cut short"))?;
        at += 4 + len;
        Ok(Some(body))
    };
    let head = entry()?.ok_or("no pagemap head")?;
    let head = PagemapHead::decode(head).map_err(|e| format!("pagemap head: {e}"))?;
    let mut map = Pagemap {
        pages_id: head.pages_id,
        present_pages: 0,
        uses_parent: false,
    };
    while let Some(body) = entry()? {
        let e = PagemapEntry::decode(body).map_err(|e| format!("pagemap entry: {e}"))?;
        // Images without flags: a run is in the parent, or present here.
        let flags = e
            .flags
            .unwrap_or(if e.in_parent() { PE_PARENT } else { PE_PRESENT });
        let pages = e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages));
        if flags & PE_PARENT != 0 {
            map.uses_parent = true;
        } else if flags & PE_PRESENT != 0 {
            map.present_pages += pages;
        }
    }
    Ok(map)
}

/// Checks every pagemap image in `dir` against its pages file: the file must hold at
/// least the pages its pagemap stores there. Incremental checkpoints (pages in a parent)
/// are left to CRIU.
pub fn check_pages(dir: &Path) -> Result<(), String> {
    // SAFETY: sysconf has no preconditions.
    let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("pagemap-") && name.ends_with(".img")) {
            continue;
        }
        let bytes = std::fs::read(entry.path()).map_err(|e| format!("{name}: {e}"))?;
        let map = decode_pagemap(&bytes).map_err(|e| format!("{name}: {e}"))?;
        if map.uses_parent {
            continue;
        }
        let pages_name = format!("pages-{}.img", map.pages_id);
        let needed = map.present_pages * page_size;
        let held = match std::fs::metadata(dir.join(&pages_name)) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && needed == 0 => continue,
            Err(e) => return Err(format!("{pages_name} (for {name}): {e}")),
        };
        if held < needed {
            return Err(format!(
                "{pages_name} holds {held} bytes, but {name} stores {} pages ({needed} bytes) \
                 there: the checkpoint is damaged (cut short)",
                map.present_pages
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(head: u32, runs: &[(u64, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&COMMON_MAGIC.to_le_bytes());
        out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        let mut push = |body: Vec<u8>| {
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend_from_slice(&body);
        };
        push(PagemapHead { pages_id: head }.encode_to_vec());
        for &(pages, flags) in runs {
            push(
                PagemapEntry {
                    vaddr: 0x400000,
                    compat_nr_pages: pages as u32,
                    in_parent: None,
                    flags: Some(flags),
                    nr_pages: Some(pages),
                }
                .encode_to_vec(),
            );
        }
        out
    }

    #[test]
    fn counts_present_pages() {
        let map = decode_pagemap(&image(3, &[(2, PE_PRESENT), (5, PE_PRESENT | 2)])).unwrap();
        assert_eq!(
            map,
            Pagemap {
                pages_id: 3,
                present_pages: 7,
                uses_parent: false
            }
        );
        assert!(
            decode_pagemap(&image(1, &[(1, PE_PARENT)]))
                .unwrap()
                .uses_parent
        );
        assert!(decode_pagemap(b"garbage!").is_err());
        let mut cut = image(1, &[(1, PE_PRESENT)]);
        cut.truncate(cut.len() - 1);
        assert!(decode_pagemap(&cut).is_err());
    }

    #[test]
    fn finds_a_short_pages_file() {
        let dir = std::env::temp_dir().join(format!("ra-images-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pagemap-1.img"), image(7, &[(2, PE_PRESENT)])).unwrap();
        std::fs::write(dir.join("pages-7.img"), vec![0u8; 2 * 4096]).unwrap();
        let whole = check_pages(&dir);
        std::fs::write(dir.join("pages-7.img"), vec![0u8; 4096]).unwrap();
        let short = check_pages(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(whole, Ok(()));
        assert!(short.unwrap_err().contains("pages-7.img holds 4096 bytes"));
    }
}
