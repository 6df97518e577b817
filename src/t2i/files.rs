//! Locating the weight files behind the CLI flags. Every error names the flag and the path, so a
//! user with a dozen files on the command line sees at once which one is wrong.

use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `path` must exist; otherwise "`flag` PATH: not found".
pub fn existing(flag: &str, path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(path.exists(), "{flag} {}: not found", path.display());
    Ok(())
}

/// The safetensors files of a flag: the files given, or every `*.safetensors` in a folder
/// (sorted, so shards come in order).
pub fn safetensors_files(flag: &str, paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::ensure!(!paths.is_empty(), "{flag}: no file given");
    let mut out = Vec::new();
    for p in paths {
        existing(flag, p)?;
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("{flag} {}: cannot list the folder", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            anyhow::ensure!(
                !found.is_empty(),
                "{flag} {}: the folder holds no .safetensors file",
                p.display()
            );
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The folder a flag's weights live in (the folder itself, or the first file's parent).
pub fn folder_of(paths: &[PathBuf]) -> Option<PathBuf> {
    let p = paths.first()?;
    if p.is_dir() {
        Some(p.clone())
    } else {
        p.parent().map(Path::to_path_buf)
    }
}

/// A companion file: the flag's value if given (it must exist), else `name` in `folder` if it is
/// there, else `None`.
pub fn companion(
    flag: &str,
    given: Option<&Path>,
    folder: Option<&Path>,
    name: &str,
) -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = given {
        existing(flag, p)?;
        return Ok(Some(p.to_path_buf()));
    }
    Ok(folder.map(|f| f.join(name)).filter(|p| p.is_file()))
}

/// Reads a text file, naming the flag on failure.
pub fn read_text(flag: &str, path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
}

/// Tensor names and shapes of safetensors files (headers only), naming the flag and file of a
/// file that is not safetensors.
pub fn shapes(flag: &str, files: &[PathBuf]) -> anyhow::Result<BTreeMap<String, Vec<usize>>> {
    let mut out = BTreeMap::new();
    for f in files {
        // SAFETY: the file is only read while mapped (candle's documented contract).
        let st = unsafe { candle::safetensors::MmapedSafetensors::new(f) }
            .with_context(|| format!("{flag} {}: not a readable safetensors file", f.display()))?;
        for (k, v) in st.tensors() {
            out.insert(k, v.shape().to_vec());
        }
    }
    Ok(out)
}

/// `a, b` (for messages naming several files).
pub fn list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
