#!/usr/bin/env bash
# Installs the package's runtime dependencies into the active virtualenv: the list from
# pyproject.toml, the exact versions from constraints.txt. torch first, because DeepSpeed's build
# imports it to prebuild ops. Shared by both Dockerfiles.
#   TORCH_INDEX_URL   where torch comes from (unset: PyPI, whose Linux wheel is the CUDA build)
#   DS_BUILD_*        DeepSpeed ops to compile now rather than just-in-time (see DeepSpeed's docs)
set -euo pipefail
cd "$(dirname "$0")"
pip install --constraint constraints.txt setuptools
pip install --constraint constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch
pip install --constraint constraints.txt --no-build-isolation deepspeed
python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
  > requirements.txt
pip install --constraint constraints.txt --requirement requirements.txt
