//! A minimal, bounds-checked zip reader for the archives `torch.save` writes.
//!
//! torch writes every entry STORED (uncompressed, 64-byte aligned through the local header's extra
//! field) and switches to zip64 records past 4 GiB. Reading only that subset by hand lets every
//! offset be checked against the real file length before anything is read or allocated, and lets
//! tensor data be sliced straight out of the caller's bytes (or read by range from a file) instead
//! of being copied through a decompressor.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use crate::{show, Bad};

/// Random access to the checkpoint bytes: a borrowed slice, or a file read by range so that a
/// multi-GB training checkpoint need not be held in memory to take its `ema` weights.
pub(crate) trait Source {
    fn len(&self) -> u64;
    /// `offset + len <= self.len()` is checked by the caller; implementations re-check it anyway.
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Cow<'_, [u8]>>;
}

pub(crate) struct BytesSource<'a>(pub &'a [u8]);

impl Source for BytesSource<'_> {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Cow<'_, [u8]>> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(len).ok_or_else(eof)?;
        self.0.get(start..end).map(Cow::Borrowed).ok_or_else(eof)
    }
}

pub(crate) struct FileSource {
    pub file: File,
    pub len: u64,
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Cow<'_, [u8]>> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(eof());
        }
        let mut buf = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "out of memory"))?;
        buf.resize(len, 0);
        let mut f = &self.file;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut buf)?;
        Ok(Cow::Owned(buf))
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the file",
    )
}

/// One central-directory record.
pub(crate) struct Entry {
    pub name: String,
    method: u16,
    flags: u16,
    pub crc: u32,
    compressed: u64,
    uncompressed: u64,
    local_offset: u64,
}

pub(crate) struct Archive {
    pub entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn io_err(what: &str, e: io::Error) -> Bad {
    Bad::io(format!("reading {what}"), e)
}

/// Reads `len` bytes at `offset` after checking the range against the source length.
fn read_checked<'s>(
    src: &'s dyn Source,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Cow<'s, [u8]>, Bad> {
    let end = offset.checked_add(len);
    if end.is_none_or(|e| e > src.len()) {
        return Err(Bad::malformed(format!(
            "truncated zip archive ({what} at offset {offset}, {len} bytes, runs past the end of the {}-byte file)",
            src.len()
        )));
    }
    let len = usize::try_from(len).map_err(|_| Bad::unsupported(format!("{what} is too large")))?;
    src.read_at(offset, len).map_err(|e| io_err(what, e))
}

impl Archive {
    /// Parses the end-of-central-directory records and the central directory.
    pub fn open(src: &dyn Source) -> Result<Archive, Bad> {
        let file_len = src.len();
        // The EOCD is 22 bytes plus a comment of at most 65535 bytes, at the very end.
        let tail_len = file_len.min(22 + 0xFFFF);
        let tail_start = file_len - tail_len;
        let tail = read_checked(src, tail_start, tail_len, "end of archive")?;
        let eocd_at = (0..tail.len().saturating_sub(21)).rev().find(|&i| {
            u32_at(&tail, i) == EOCD_SIG
                && i + 22 + usize::from(u16_at(&tail, i + 20)) <= tail.len()
        });
        let Some(eocd_at) = eocd_at else {
            return Err(not_a_zip(src));
        };
        let eocd = &tail[eocd_at..eocd_at + 22];
        let eocd_pos = tail_start + eocd_at as u64;
        let mut count = u64::from(u16_at(eocd, 10));
        let mut cd_size = u64::from(u32_at(eocd, 12));
        let mut cd_offset = u64::from(u32_at(eocd, 16));

        // zip64: a locator sits right before the EOCD and points at the zip64 EOCD record.
        let has_locator = eocd_pos >= 20 && {
            let loc = read_checked(src, eocd_pos - 20, 20, "zip64 locator")?;
            u32_at(&loc, 0) == EOCD64_LOCATOR_SIG
        };
        if has_locator {
            let loc = read_checked(src, eocd_pos - 20, 20, "zip64 locator")?;
            let rec_offset = u64_at(&loc, 8);
            let rec = read_checked(src, rec_offset, 56, "zip64 end of central directory")?;
            if u32_at(&rec, 0) != EOCD64_SIG {
                return Err(Bad::malformed(
                    "corrupt zip archive (bad zip64 end of central directory signature)",
                ));
            }
            count = u64_at(&rec, 32);
            cd_size = u64_at(&rec, 40);
            cd_offset = u64_at(&rec, 48);
        } else if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
            return Err(Bad::malformed(
                "corrupt zip archive (zip64 sizes without a zip64 locator)",
            ));
        }
        if cd_offset
            .checked_add(cd_size)
            .is_none_or(|end| end > eocd_pos)
        {
            return Err(Bad::malformed(format!(
                "truncated zip archive (central directory at {cd_offset}+{cd_size} overlaps the end record at {eocd_pos})"
            )));
        }
        let cd = read_checked(src, cd_offset, cd_size, "central directory")?;
        let mut entries = Vec::new();
        let mut by_name = HashMap::new();
        let mut pos = 0usize;
        while pos < cd.len() {
            let entry = parse_central(&cd, &mut pos)?;
            if by_name.insert(entry.name.clone(), entries.len()).is_some() {
                return Err(Bad::malformed(format!(
                    "corrupt zip archive (entry '{}' appears twice)",
                    show(&entry.name)
                )));
            }
            entries.push(entry);
        }
        if entries.len() as u64 != count {
            return Err(Bad::malformed(format!(
                "corrupt zip archive (end record announces {count} entries, central directory holds {})",
                entries.len()
            )));
        }
        Ok(Archive { entries, by_name })
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Offset and length of an entry's bytes, after checking its local header and method.
    pub fn data_range(&self, src: &dyn Source, idx: usize) -> Result<(u64, u64), Bad> {
        let e = &self.entries[idx];
        let what = format!("local header of '{}'", show(&e.name));
        let head = read_checked(src, e.local_offset, 30, &what)?;
        if u32_at(&head, 0) != LOCAL_SIG {
            return Err(Bad::malformed(format!(
                "corrupt zip archive (bad local header signature for '{}')",
                show(&e.name)
            )));
        }
        let name_len = u64::from(u16_at(&head, 26));
        let extra_len = u64::from(u16_at(&head, 28));
        let name = read_checked(src, e.local_offset + 30, name_len, &what)?;
        if *name != *e.name.as_bytes() {
            return Err(Bad::malformed(format!(
                "corrupt zip archive (local header name differs from central directory for '{}')",
                show(&e.name)
            )));
        }
        if e.flags & 1 != 0 {
            return Err(Bad::unsupported(format!(
                "zip entry '{}' is encrypted",
                show(&e.name)
            )));
        }
        match e.method {
            0 => {}
            8 => {
                return Err(Bad::unsupported(format!(
                    "zip entry '{}' is deflate-compressed; torch.save writes uncompressed (stored) \
                     entries only — was the archive re-zipped? Re-save it with torch.save",
                    show(&e.name)
                )))
            }
            m => {
                return Err(Bad::unsupported(format!(
                    "zip entry '{}' uses compression method {m}; only stored entries (as torch.save writes) are supported",
                    show(&e.name)
                )))
            }
        }
        if e.compressed != e.uncompressed {
            return Err(Bad::malformed(format!(
                "corrupt zip archive (stored entry '{}' has compressed size {} but size {})",
                show(&e.name),
                e.compressed,
                e.uncompressed
            )));
        }
        let start = e.local_offset + 30 + name_len + extra_len;
        if start
            .checked_add(e.compressed)
            .is_none_or(|end| end > src.len())
        {
            return Err(Bad::malformed(format!(
                "truncated zip archive (entry '{}' needs {} bytes at offset {start}, the file has {})",
                show(&e.name),
                e.compressed,
                src.len()
            )));
        }
        Ok((start, e.compressed))
    }
}

fn not_a_zip(src: &dyn Source) -> Bad {
    let head = src
        .read_at(0, src.len().min(16) as usize)
        .map(|c| c.into_owned())
        .unwrap_or_default();
    if head.starts_with(b"PK\x03\x04") {
        Bad::malformed("truncated zip archive (end of central directory not found)")
    } else if head.starts_with(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19") {
        Bad::unsupported(
            "legacy (pre-1.6, non-zip) torch.save format; load and re-save it with torch >= 1.6",
        )
    } else if head.is_empty() {
        Bad::malformed("empty file")
    } else {
        Bad::malformed(
            "not a zip archive (no end of central directory record); torch.save writes zip archives since torch 1.6",
        )
    }
}

/// Parses one central-directory record at `*pos`, advancing it.
fn parse_central(cd: &[u8], pos: &mut usize) -> Result<Entry, Bad> {
    let p = *pos;
    let fixed = cd.get(p..p + 46).ok_or_else(|| {
        Bad::malformed("corrupt zip archive (central directory record cut short)")
    })?;
    if u32_at(fixed, 0) != CENTRAL_SIG {
        return Err(Bad::malformed(
            "corrupt zip archive (bad central directory record signature)",
        ));
    }
    let flags = u16_at(fixed, 8);
    let method = u16_at(fixed, 10);
    let crc = u32_at(fixed, 16);
    let mut compressed = u64::from(u32_at(fixed, 20));
    let mut uncompressed = u64::from(u32_at(fixed, 24));
    let name_len = usize::from(u16_at(fixed, 28));
    let extra_len = usize::from(u16_at(fixed, 30));
    let comment_len = usize::from(u16_at(fixed, 32));
    let mut local_offset = u64::from(u32_at(fixed, 42));
    let end = p + 46 + name_len + extra_len + comment_len;
    if end > cd.len() {
        return Err(Bad::malformed(
            "corrupt zip archive (central directory record runs past the directory)",
        ));
    }
    let name = std::str::from_utf8(&cd[p + 46..p + 46 + name_len])
        .map_err(|_| Bad::malformed("corrupt zip archive (entry name is not UTF-8)"))?
        .to_owned();
    // zip64 extended information: the 8-byte values of the fields that were set to 0xFFFFFFFF,
    // in this order.
    let mut extra = &cd[p + 46 + name_len..p + 46 + name_len + extra_len];
    while extra.len() >= 4 {
        let id = u16_at(extra, 0);
        let size = usize::from(u16_at(extra, 2));
        let body = extra.get(4..4 + size).ok_or_else(|| {
            Bad::malformed(format!(
                "corrupt zip archive (extra field of '{}' is cut short)",
                show(&name)
            ))
        })?;
        if id == 0x0001 {
            let mut at = 0;
            for field in [&mut uncompressed, &mut compressed, &mut local_offset] {
                if *field == 0xFFFF_FFFF {
                    if at + 8 > body.len() {
                        return Err(Bad::malformed(format!(
                            "corrupt zip archive (zip64 field of '{}' is cut short)",
                            show(&name)
                        )));
                    }
                    *field = u64_at(body, at);
                    at += 8;
                }
            }
        }
        extra = &extra[4 + size..];
    }
    *pos = end;
    Ok(Entry {
        name,
        method,
        flags,
        crc,
        compressed,
        uncompressed,
        local_offset,
    })
}

/// CRC-32 of `len` bytes at `offset`, read in bounded chunks.
pub(crate) fn crc32(src: &dyn Source, offset: u64, len: u64, what: &str) -> Result<u32, Bad> {
    const CHUNK: u64 = 1 << 20;
    let mut h = crc32fast::Hasher::new();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let buf = src
            .read_at(offset + done, n as usize)
            .map_err(|e| io_err(what, e))?;
        h.update(&buf);
        done += n;
    }
    Ok(h.finalize())
}
