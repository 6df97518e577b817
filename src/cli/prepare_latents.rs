//! `dydit prepare-latents`: encode an image folder with the SD VAE once, into a latent cache that
//! `dydit train`/`finetune --data` read (resumable; the finished file appears atomically).

use crate::data::image_folder::ImageFolder;
use crate::data::latents::prepare_latents;
use crate::data::Dataset;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// ImageFolder root: one sub-folder per class.
    pub images: PathBuf,
    /// SD VAE (diffusers safetensors, e.g. sd-vae-ft-ema).
    #[arg(long)]
    pub vae: PathBuf,
    /// Centre-crop size in pixels (ADM `center_crop_arr`); 256 gives 32×32 latents.
    #[arg(long, default_value_t = 256)]
    pub image_size: usize,
    /// Output cache (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Images per VAE batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Do not also encode the mirrored images (then training cannot flip).
    #[arg(long)]
    pub no_flip: bool,
    #[arg(long)]
    pub cpu: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    anyhow::ensure!(a.batch > 0, "--batch must be > 0");
    crate::io::atomic::check_writable(&a.out)?;
    let dev = super::common::device(a.cpu)?;
    let src = ImageFolder::open(&a.images, a.image_size)?;
    eprintln!("{}", src.describe());
    let vae = crate::vae::Vae::load(&a.vae, &dev)?;
    let s = prepare_latents(
        &src,
        &vae,
        &a.out,
        a.batch,
        !a.no_flip,
        std::io::stderr().is_terminal(),
    )?;
    println!(
        "wrote {} latents {:?}{} of {} classes to {} ({:.1} MiB) in {:.1} s{}",
        s.count,
        s.latent_shape,
        if s.flips { " (+ mirrored)" } else { "" },
        s.num_classes,
        s.path.display(),
        s.bytes as f64 / (1 << 20) as f64,
        s.seconds,
        if s.resumed_from > 0 {
            format!(", resumed after {} images", s.resumed_from)
        } else {
            String::new()
        }
    );
    Ok(0)
}
