//! Helpers shared by the training test binaries.

use std::path::Path;

/// An `n`-image, 3-class IDX set of 8×8 images (uncompressed) with its labels file.
pub fn write_idx(dir: &Path, n: usize) -> std::path::PathBuf {
    let mut img = vec![0, 0, 8, 3];
    img.extend((n as u32).to_be_bytes());
    img.extend(8u32.to_be_bytes());
    img.extend(8u32.to_be_bytes());
    let mut lab = vec![0, 0, 8, 1];
    lab.extend((n as u32).to_be_bytes());
    for i in 0..n {
        let class = (i % 3) as u8;
        lab.push(class);
        for p in 0..64 {
            img.push(((p * 7 + i * 13 + class as usize * 50) % 256) as u8);
        }
    }
    let ip = dir.join("train-images-idx3-ubyte");
    std::fs::write(&ip, img).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), lab).unwrap();
    ip
}
