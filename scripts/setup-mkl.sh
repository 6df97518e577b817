#!/usr/bin/env bash
# Intel MKL for `cargo build --release --features mkl`: the static libraries and headers from
# PyPI's mkl-static / mkl-include / intel-openmp wheels, unpacked into third_party/mkl (ignored by
# git). Only what candle's `mkl-static-lp64-iomp` link mode needs is kept; the OpenMP runtime is
# the static libiomp5.a, so the binary needs no shared library at run time.
#   scripts/setup-mkl.sh && MKLROOT=$PWD/third_party/mkl cargo build --release --features mkl
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${MKL_DIR:-third_party/mkl}
VER=${MKL_VERSION:-2026.2.0}
if [ -f "$DEST/lib/libmkl_core.a" ] && [ -f "$DEST/lib/libiomp5.a" ]; then
    echo "MKL already in $DEST"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
    "mkl-static==$VER" "mkl-include==$VER" "intel-openmp==$VER" -d "$tmp"
python3 - "$tmp" "$DEST.tmp" <<'PY'
import pathlib, shutil, sys, zipfile
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
shutil.rmtree(dest, ignore_errors=True)
keep = {"libmkl_intel_lp64.a", "libmkl_intel_thread.a", "libmkl_core.a", "libiomp5.a"}
for wheel in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            parts = pathlib.PurePosixPath(name).parts
            if "data" not in parts:
                continue
            rel = pathlib.PurePosixPath(*parts[parts.index("data") + 1:])
            if rel.parts[:1] == ("lib",) and rel.name in keep or rel.parts[:1] == ("include",):
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as f, open(out, "wb") as g:
                    shutil.copyfileobj(f, g)
missing = [k for k in keep if not (dest / "lib" / k).exists()]
if missing or not (dest / "include" / "mkl.h").exists():
    sys.exit(f"MKL wheels lacked {missing or 'include/mkl.h'}")
PY
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "MKL $VER in $DEST ($(du -sh "$DEST" | cut -f1)); build with MKLROOT=$PWD/$DEST"
