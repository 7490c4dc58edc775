#!/usr/bin/env bash
# Builds the CPU image's package layer with podman on a locally made base (no registry pulls) and
# smoke-tests it: the entrypoint runs `llava-cluster stage`, the stack imports, the user is not root.
# The base is a Debian bookworm rootfs (debootstrap) holding python3 and a copy of this checkout's
# .venv dependencies (same Python minor as bookworm's 3.11). Needs root, podman, debootstrap;
# takes ~4 minutes (the base), then ~1 minute per rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/llava-podman-smoke}
deps=localhost/llava-deps:local
image=localhost/llava-cluster:cpu-local
if ! podman image exists "$deps"; then
  rm -rf "$work/rootfs" && mkdir -p "$work"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" http://deb.debian.org/debian
  chroot "$work/rootfs" python3 -m venv /opt/venv
  site=.venv/lib/python3.11/site-packages
  cp -a "$site/." "$work/rootfs/opt/venv/lib/python3.11/site-packages/"
  rm -rf "$work/rootfs/opt/venv/lib/python3.11/site-packages/"{__editable__,llava_cluster}* "$work/rootfs/var/cache/apt/archives/"*.deb
  tar -C "$work/rootfs" -c . | podman import - "$deps"
fi
podman build --isolation=chroot -f docker/Dockerfile.cpu --target package --build-arg DEPS_IMAGE="$deps" -t "$image" .
mkdir -p "$work/smoke"
cat > "$work/smoke/Containerfile" <<SMOKE
FROM $image
RUN ["/usr/local/bin/llava-entrypoint", "train", "--help"]
RUN ["/usr/local/bin/llava-entrypoint", "python", "-c", "import os, torch, deepspeed, peft, transformers, bitsandbytes, llava_cluster; assert os.getuid() == 1000; print('uid', os.getuid(), 'torch', torch.__version__, 'deepspeed', deepspeed.__version__, llava_cluster.__file__)"]
SMOKE
podman build --isolation=chroot -t localhost/llava-smoke "$work/smoke"
