#!/usr/bin/env bash
# Entrypoint of the llava-cluster images.
#   <image> train|merge|validate --run-dir DIR [--spec FILE]   runs `llava-cluster stage ...`
#   <image>                                                    prints llava-cluster's help
#   <image> COMMAND ...                                        runs COMMAND (e.g. llava-cluster data check ...)
# The distributed environment needs no mapping here: `llava-cluster stage` reads it itself, in
# llava_cluster/launch/topology.py (Kubeflow Trainer v2's PET_NNODES/PET_NPROC_PER_NODE/PET_NODE_RANK/
# PET_MASTER_ADDR/PET_MASTER_PORT in container `node`, or a PyTorchJob's MASTER_ADDR/MASTER_PORT and
# PET_*, make it start torchrun on the node; a torchrun or srun rank runs as it is).
set -euo pipefail

# Pods run as a non-root user on a read-only root filesystem: HOME and every cache go where writing
# is possible (/tmp is an emptyDir in our manifests). DeepSpeed JIT-builds ops into TORCH_EXTENSIONS_DIR.
if [[ -z "${HOME:-}" || ! -w "${HOME}" ]]; then
  export HOME=/tmp/home
fi
mkdir -p "$HOME"
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$HOME/.cache}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$XDG_CACHE_HOME/torch_extensions}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$XDG_CACHE_HOME/triton}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$XDG_CACHE_HOME/matplotlib}"
export HF_HOME="${HF_HOME:-$XDG_CACHE_HOME/huggingface}"

case "${1:-}" in
  train | merge | validate) exec llava-cluster stage "$@" ;;
  "") exec llava-cluster --help ;;
  *) exec "$@" ;;
esac
