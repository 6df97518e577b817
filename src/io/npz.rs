//! The `.npz` sample batches the ADM evaluator (guided-diffusion `evaluations/evaluator.py`) reads:
//! one uint8 NHWC array under `arr_0`, in a zip archive.
//!
//! Written as a stored (uncompressed) zip64 entry, streamed image by image — 50k 256² images are
//! 9.8 GB, more than memory and more than plain zip allows — to a temporary file that is renamed
//! into place when complete. [`NpzReader`] reads stored `arr_0.npy` entries (ours and
//! `numpy.savez` files) for `dydit merge-npz`.

use anyhow::{bail, ensure, Context};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const ENTRY: &[u8] = b"arr_0.npy";

/// The NPY v1.0 header of a C-order uint8 array of `shape`, padded to a multiple of 64 bytes.
fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': {tuple}, }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    dict.push('\n');
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend((dict.len() as u16).to_le_bytes());
    h.extend(dict.as_bytes());
    h
}

/// Streams `[N, H, W, C]` uint8 images into `path` (atomically, on [`NpzWriter::finish`]).
pub struct NpzWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    crc: flate2::Crc,
    shape: [usize; 4],
    images: usize,
    data_bytes: u64,
}

impl NpzWriter {
    pub fn create(path: &Path, shape: [usize; 4]) -> anyhow::Result<Self> {
        let tmp = path.with_extension("npz.partial");
        let f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = Self {
            out: BufWriter::with_capacity(1 << 20, f),
            tmp,
            path: path.to_path_buf(),
            crc: flate2::Crc::new(),
            shape,
            images: 0,
            data_bytes: 0,
        };
        w.local_header(0, 0)?;
        let h = npy_header(&shape);
        w.crc.update(&h);
        w.out.write_all(&h)?;
        w.data_bytes = h.len() as u64;
        Ok(w)
    }

    fn local_header(&mut self, crc: u32, size: u64) -> std::io::Result<()> {
        let o = &mut self.out;
        o.write_all(&0x0403_4b50u32.to_le_bytes())?;
        o.write_all(&45u16.to_le_bytes())?; // version needed: zip64
        o.write_all(&[0; 6])?; // flags, method (stored), time
        o.write_all(&0x0021u16.to_le_bytes())?; // date 1980-01-01
        o.write_all(&crc.to_le_bytes())?;
        o.write_all(&u32::MAX.to_le_bytes())?; // sizes in the zip64 extra field
        o.write_all(&u32::MAX.to_le_bytes())?;
        o.write_all(&(ENTRY.len() as u16).to_le_bytes())?;
        o.write_all(&20u16.to_le_bytes())?;
        o.write_all(ENTRY)?;
        o.write_all(&1u16.to_le_bytes())?;
        o.write_all(&16u16.to_le_bytes())?;
        o.write_all(&size.to_le_bytes())?;
        o.write_all(&size.to_le_bytes())
    }

    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// Appends whole images (`k·H·W·C` bytes, NHWC).
    pub fn write_images(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let per = self.shape[1] * self.shape[2] * self.shape[3];
        ensure!(
            data.len().is_multiple_of(per),
            "npz: {} bytes is not a whole number of images",
            data.len()
        );
        let k = data.len() / per;
        ensure!(
            self.images + k <= self.shape[0],
            "npz: more than the {} announced images",
            self.shape[0]
        );
        self.crc.update(data);
        self.out.write_all(data)?;
        self.images += k;
        self.data_bytes += data.len() as u64;
        Ok(())
    }

    /// Writes the central directory, patches the local header, syncs, and renames into place.
    pub fn finish(mut self) -> anyhow::Result<PathBuf> {
        ensure!(
            self.images == self.shape[0],
            "npz: {} of {} images written",
            self.images,
            self.shape[0]
        );
        let crc = self.crc.sum();
        let size = self.data_bytes;
        let cd_offset = 30 + ENTRY.len() as u64 + 20 + size;
        let o = &mut self.out;
        o.write_all(&0x0201_4b50u32.to_le_bytes())?;
        o.write_all(&45u16.to_le_bytes())?;
        o.write_all(&45u16.to_le_bytes())?;
        o.write_all(&[0; 6])?;
        o.write_all(&0x0021u16.to_le_bytes())?;
        o.write_all(&crc.to_le_bytes())?;
        o.write_all(&u32::MAX.to_le_bytes())?;
        o.write_all(&u32::MAX.to_le_bytes())?;
        o.write_all(&(ENTRY.len() as u16).to_le_bytes())?;
        o.write_all(&28u16.to_le_bytes())?;
        o.write_all(&[0; 6])?; // comment length, disk, internal attributes
        o.write_all(&[0; 4])?; // external attributes
        o.write_all(&u32::MAX.to_le_bytes())?; // local header offset in the extra field
        o.write_all(ENTRY)?;
        o.write_all(&1u16.to_le_bytes())?;
        o.write_all(&24u16.to_le_bytes())?;
        o.write_all(&size.to_le_bytes())?;
        o.write_all(&size.to_le_bytes())?;
        o.write_all(&0u64.to_le_bytes())?;
        let cd_size = 46 + ENTRY.len() as u64 + 28;
        let eocd64 = cd_offset + cd_size;
        o.write_all(&0x0606_4b50u32.to_le_bytes())?;
        o.write_all(&44u64.to_le_bytes())?;
        o.write_all(&45u16.to_le_bytes())?;
        o.write_all(&45u16.to_le_bytes())?;
        o.write_all(&[0; 8])?;
        o.write_all(&1u64.to_le_bytes())?;
        o.write_all(&1u64.to_le_bytes())?;
        o.write_all(&cd_size.to_le_bytes())?;
        o.write_all(&cd_offset.to_le_bytes())?;
        o.write_all(&0x0706_4b50u32.to_le_bytes())?;
        o.write_all(&0u32.to_le_bytes())?;
        o.write_all(&eocd64.to_le_bytes())?;
        o.write_all(&1u32.to_le_bytes())?;
        o.write_all(&0x0605_4b50u32.to_le_bytes())?;
        o.write_all(&[0; 4])?;
        o.write_all(&u16::MAX.to_le_bytes())?;
        o.write_all(&u16::MAX.to_le_bytes())?;
        o.write_all(&u32::MAX.to_le_bytes())?;
        o.write_all(&u32::MAX.to_le_bytes())?;
        o.write_all(&0u16.to_le_bytes())?;
        o.flush()?;
        o.get_mut().seek(SeekFrom::Start(0))?;
        self.local_header(crc, size)?;
        self.out.flush()?;
        let f = self.out.get_mut();
        f.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot rename to {}", self.path.display()))?;
        Ok(self.path.clone())
    }
}

impl Drop for NpzWriter {
    fn drop(&mut self) {
        // An unfinished file never appears under the final name; its partial file is removed
        // (after a successful `finish` it no longer exists).
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// A stored `arr_0.npy` uint8 array inside an `.npz`, read in chunks.
pub struct NpzReader {
    file: File,
    pub shape: Vec<usize>,
    data_start: u64,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

impl NpzReader {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let name = path.display().to_string();
        let mut file = File::open(path).with_context(|| format!("cannot open {name}"))?;
        // Scan the local headers from the start for `arr_0.npy` (stored).
        let mut pos = 0u64;
        loop {
            let mut h = [0u8; 30];
            file.seek(SeekFrom::Start(pos))?;
            file.read_exact(&mut h)
                .with_context(|| format!("{name}: no arr_0.npy entry (truncated zip?)"))?;
            ensure!(
                u32_at(&h, 0) == 0x0403_4b50,
                "{name}: not a zip (.npz) file or no arr_0.npy entry"
            );
            let (method, nlen, xlen) = (
                u16_at(&h, 8),
                u16_at(&h, 26) as usize,
                u16_at(&h, 28) as usize,
            );
            let mut rest = vec![0u8; nlen + xlen];
            file.read_exact(&mut rest)
                .with_context(|| format!("{name}: truncated zip header"))?;
            let (entry, extra) = rest.split_at(nlen);
            let mut csize = u32_at(&h, 18) as u64;
            if csize == u32::MAX as u64 {
                let mut i = 0;
                while i + 4 <= extra.len() {
                    let (id, len) = (u16_at(extra, i), u16_at(extra, i + 2) as usize);
                    if id == 1 && len >= 16 {
                        csize = u64_at(extra, i + 12);
                    }
                    i += 4 + len;
                }
            }
            let data = pos + 30 + (nlen + xlen) as u64;
            if entry == ENTRY {
                ensure!(
                    method == 0,
                    "{name}: arr_0.npy is compressed; only stored entries (np.savez) are supported"
                );
                let mut pre = [0u8; 10];
                file.seek(SeekFrom::Start(data))?;
                file.read_exact(&mut pre)
                    .with_context(|| format!("{name}: truncated npy"))?;
                ensure!(
                    &pre[..6] == b"\x93NUMPY",
                    "{name}: arr_0 is not an npy array"
                );
                let (hlen, hstart) = match pre[6] {
                    1 => (u16_at(&pre, 8) as usize, 10u64),
                    2 | 3 => {
                        let mut more = [0u8; 2];
                        file.read_exact(&mut more)?;
                        (
                            u32::from_le_bytes([pre[8], pre[9], more[0], more[1]]) as usize,
                            12,
                        )
                    }
                    v => bail!("{name}: npy version {v} not supported"),
                };
                let mut dict = vec![0u8; hlen];
                file.read_exact(&mut dict)
                    .with_context(|| format!("{name}: truncated npy header"))?;
                let dict = String::from_utf8_lossy(&dict);
                ensure!(
                    dict.contains("'|u1'") || dict.contains("'u1'"),
                    "{name}: arr_0 is not uint8 ({dict})"
                );
                ensure!(
                    dict.contains("'fortran_order': False"),
                    "{name}: arr_0 is Fortran-ordered"
                );
                let shape: Vec<usize> = dict
                    .split("'shape': (")
                    .nth(1)
                    .and_then(|s| s.split(')').next())
                    .map(|s| s.split(',').filter_map(|d| d.trim().parse().ok()).collect())
                    .unwrap_or_default();
                ensure!(
                    shape.len() == 4,
                    "{name}: arr_0 has shape {shape:?}, expected N×H×W×C"
                );
                let start = data + hstart + hlen as u64;
                let need = shape.iter().product::<usize>() as u64;
                ensure!(
                    file.metadata()?.len() >= start + need,
                    "{name}: truncated: arr_0 needs {need} bytes"
                );
                return Ok(Self {
                    file,
                    shape,
                    data_start: start,
                });
            }
            pos = data + csize;
        }
    }

    /// Bytes of images `first..first + count`.
    pub fn read_images(&mut self, first: usize, count: usize) -> anyhow::Result<Vec<u8>> {
        let per: usize = self.shape[1..].iter().product();
        ensure!(
            first + count <= self.shape[0],
            "npz: images {first}..{} out of range",
            first + count
        );
        let mut buf = vec![0u8; count * per];
        self.file
            .seek(SeekFrom::Start(self.data_start + (first * per) as u64))?;
        self.file.read_exact(&mut buf)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_header_alignment() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.npz");
        let mut w = NpzWriter::create(&p, [3, 2, 4, 3]).unwrap();
        let data: Vec<u8> = (0..72).map(|i| i as u8).collect();
        w.write_images(&data[..24]).unwrap();
        w.write_images(&data[24..]).unwrap();
        w.finish().unwrap();
        assert!(!d.path().join("x.npz.partial").exists());
        let mut r = NpzReader::open(&p).unwrap();
        assert_eq!(r.shape, vec![3, 2, 4, 3]);
        assert_eq!(r.read_images(1, 2).unwrap(), data[24..].to_vec());
        assert_eq!(npy_header(&[50000, 256, 256, 3]).len() % 64, 0);
        // Wrong counts are errors, and the partial file is removed.
        let q = d.path().join("y.npz");
        let mut w = NpzWriter::create(&q, [2, 1, 1, 3]).unwrap();
        assert!(w.write_images(&[1, 2]).is_err());
        w.write_images(&[1, 2, 3]).unwrap();
        assert!(w.finish().is_err());
        assert!(!q.exists() && !d.path().join("y.npz.partial").exists());
    }
}
