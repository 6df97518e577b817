//! Helpers shared by the integration test binaries.
#![allow(dead_code)]

use std::io;
use std::process::{Child, Command, Output};

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

/// Spawning the CLI under test, retried when the OS refuses the spawn itself for a transient
/// reason (a CI sandbox once answered `fork`/`exec` with EFAULT under load). Only the spawn is
/// retried: a command that ran and failed is returned as it is.
pub trait SpawnRetry {
    fn output_retry(&mut self) -> io::Result<Output>;
    fn spawn_retry(&mut self) -> io::Result<Child>;
}

fn transient(e: &io::Error) -> bool {
    // EINTR, EAGAIN, ENOMEM, EFAULT, ETXTBSY
    matches!(e.raw_os_error(), Some(4 | 11 | 12 | 14 | 26))
}

fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut attempt = 0;
    loop {
        match f() {
            Err(e) if transient(&e) && attempt < 5 => {
                attempt += 1;
                eprintln!("spawn failed ({e}); retry {attempt}/5");
                std::thread::sleep(std::time::Duration::from_millis(200 << attempt));
            }
            r => return r,
        }
    }
}

impl SpawnRetry for Command {
    fn output_retry(&mut self) -> io::Result<Output> {
        retry(|| self.output())
    }
    fn spawn_retry(&mut self) -> io::Result<Child> {
        retry(|| self.spawn())
    }
}
