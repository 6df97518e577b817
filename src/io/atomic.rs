//! Atomic file output: write to a temporary file beside the target, fsync, then rename, so an
//! interrupted run never leaves a half-written image or checkpoint under the final name.

use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Checks up front that `path` can be created (directory exists and is writable), so a long
/// sampling run fails before it starts rather than at the end.
pub fn check_writable(path: &Path) -> anyhow::Result<()> {
    let dir = parent_dir(path);
    anyhow::ensure!(
        dir.is_dir(),
        "cannot write {}: directory {} does not exist",
        path.display(),
        dir.display()
    );
    anyhow::ensure!(
        !path.is_dir(),
        "cannot write {}: it is a directory",
        path.display()
    );
    let probe = tmp_name(path);
    std::fs::File::create(&probe).with_context(|| {
        format!(
            "cannot write {}: directory {} is not writable",
            path.display(),
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_dir(path).join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// Calls `fill` on a temporary file, then renames it to `path`; on error the temporary is removed.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = tmp_name(path);
    let res = (|| -> anyhow::Result<()> {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename to {}", path.display()))?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("writing {}", path.display()))
}
