//! `dydit merge-npz`: joins the `.npz` shards of `dydit sample --npz --shard i/n` (in the order
//! given) into one file for the ADM evaluator, streaming, without loading the images in memory.

use crate::io::npz::{NpzReader, NpzWriter};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Shards, in sample order (shard 0 first).
    #[arg(required = true)]
    pub parts: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// Fail unless the merged file holds exactly this many images.
    #[arg(long)]
    pub expect: Option<usize>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    crate::io::atomic::check_writable(&a.out)?;
    let mut readers = a
        .parts
        .iter()
        .map(|p| NpzReader::open(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shape = readers[0].shape.clone();
    for (r, p) in readers.iter().zip(&a.parts) {
        anyhow::ensure!(
            r.shape[1..] == shape[1..],
            "{}: images are {:?}, but {} has {:?}",
            p.display(),
            &r.shape[1..],
            a.parts[0].display(),
            &shape[1..]
        );
    }
    let total: usize = readers.iter().map(|r| r.shape[0]).sum();
    if let Some(e) = a.expect {
        anyhow::ensure!(total == e, "the parts hold {total} images, --expect {e}");
    }
    let mut w = NpzWriter::create(&a.out, [total, shape[1], shape[2], shape[3]])?;
    for r in &mut readers {
        let n = r.shape[0];
        let mut k = 0;
        while k < n {
            let m = 256.min(n - k);
            w.write_images(&r.read_images(k, m)?)?;
            k += m;
        }
    }
    let out = w.finish()?;
    println!(
        "merged {} parts: {total} images {}×{}×{} → {}",
        a.parts.len(),
        shape[1],
        shape[2],
        shape[3],
        out.display()
    );
    Ok(0)
}
