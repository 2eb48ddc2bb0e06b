#!/usr/bin/env bash
# Packs what a lent GPU machine lacks into .dev/ (ignored), for `bench/device_checks.sh` there.
#
#   bash bench/device_pack.sh            # here, once per session that is lent a GPU
#
# That machine is offline, runs Python 3.12 with its own torch, torchvision, OpenCV, pandas and pyarrow
# (the device tool's KINDS.md), and takes at most 64 MiB with the working tree. So .dev/ holds:
#   site.tar.xz   the rest of our dependencies for CPython 3.12: Ray with its debug symbols stripped and
#                 without its Java jar, dashboard client, RLlib, Serve and LLM parts (~80 -> ~26 MB), jpeglib
#                 with only the two libjpeg builds it loads, facexlib, pydantic, pyexiv2;
#   shared.tar.xz the ../shared files the CUDA tests and the GPU benches read (the crowd photos left out).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${ARCHIVE_SHARED_DIR:-../shared}
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.dev/' "$exclude" 2>/dev/null || echo '/.dev/' >> "$exclude"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p .dev "$work/whl" "$work/site"
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
# Versions as installed here, so both machines run the same code.
ver() { python3 -c "from importlib.metadata import version; print(version('$1'))"; }
pkgs=""
for p in ray pydantic pydantic_core annotated_types typing-inspection typing_extensions pyexiv2 jpeglib \
         jsonschema referencing rpds-py jsonschema-specifications facexlib filterpy; do
    pkgs="$pkgs $p==$(ver $p)"
done
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d "$work/whl" $pkgs
for w in "$work"/whl/*.whl; do unzip -q -o "$w" -d "$work/site"; done
cd "$work/site"
rm -rf ray/jars ray/dashboard/client/build ray/rllib ray/llm ray/serve
strip --strip-unneeded ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
# turbo210 is ours (jpegblocks.py); 6b is what jpeglib loads on import
find jpeglib/cjpeglib -maxdepth 1 -name 'cjpeglib_*.so' ! -name 'cjpeglib_turbo210*' ! -name 'cjpeglib_6b*' -delete
find jpeglib/cjpeglib -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
cd - > /dev/null
tar -C "$work/site" -cJf .dev/site.tar.xz .
mkdir -p "$work/shared/images/identity"
cp -r "$SHARED/models" "$SHARED/fixtures" "$work/shared/"
cp -r "$SHARED/images/whole" "$SHARED/images/old" "$work/shared/images/"
rm -f "$work"/shared/images/whole/crowd* "$work"/shared/images/whole/*oscar*
cp "$SHARED/images/identity/$(ls "$SHARED/images/identity" | grep '\.jpg$' | LC_ALL=C sort | head -1)" "$work/shared/images/identity/"
tar -C "$work/shared" -cJf .dev/shared.tar.xz .
ls -la .dev
du -sh .dev
