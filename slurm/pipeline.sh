#!/usr/bin/env bash
# Submit a run's train -> merge -> validate as three SLURM jobs chained with afterok dependencies.
# Pure bash + sbatch: the login node needs no Python. A failed stage cancels the jobs after it
# (--kill-on-invalid-dep=yes); stages whose state/<stage>.json says "succeeded" are skipped, so
# running this again after a failure resumes (training continues from its last complete checkpoint).
#
#   RUN_DIR=/shared/runs/my-run slurm/pipeline.sh
#   RUN_DIR=/shared/runs/my-run METHOD=qlora PARTITION=gpu ACCOUNT=proj slurm/pipeline.sh
#   RUN_DIR=... CONTAINER_RUNTIME=pyxis CONTAINER_IMAGE=ghcr.io#llava-cluster/llava-cluster:0.1.0 slurm/pipeline.sh
#
# Settings (environment variables, all optional except RUN_DIR):
#   RUN_DIR          the run directory holding spec.yaml (see README.md for how to create it)
#   METHOD           lora (lora-multinode.sbatch) | qlora (qlora-1node.sbatch)       (default: lora)
#   NODES, GPUS_PER_NODE, CPUS_PER_TASK, TRAIN_TIME   train job shape (default: the #SBATCH lines)
#   PARTITION, ACCOUNT, QOS                            applied to all three jobs
#   SBATCH_EXTRA     more sbatch options for all three jobs, e.g. "--constraint=h100 --exclusive"
#   LLAVA_CLUSTER, MAX_REQUEUES, CONTAINER_RUNTIME, CONTAINER_IMAGE, STORAGE, CONTAINER_MOUNTS:
#                    passed to the jobs, see stage-common.sh
# Console output of each job goes to $RUN_DIR/logs/slurm/<job id>.out (`llava-cluster logs --job`).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${RUN_DIR:?set RUN_DIR=<storage>/runs/<name>, the run directory holding spec.yaml}"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
export RUN_DIR
if [ ! -f "$RUN_DIR/spec.yaml" ]; then
  echo "error: $RUN_DIR/spec.yaml not found (see slurm/README.md: the run directory needs its spec)" >&2
  exit 2
fi
case "${METHOD:-lora}" in
  lora) train_script=lora-multinode.sbatch ;;
  qlora) train_script=qlora-1node.sbatch ;;
  *) echo "error: METHOD=$METHOD: use lora or qlora" >&2; exit 2 ;;
esac

# Without a container the jobs run the llava-cluster of this shell, by absolute path: the compute
# nodes see the same (shared) environment, but not necessarily an activated venv on their PATH.
if [ -z "${LLAVA_CLUSTER:-}" ] && [ "${CONTAINER_RUNTIME:-none}" = none ] && command -v llava-cluster > /dev/null; then
  LLAVA_CLUSTER=$(command -v llava-cluster)
  export LLAVA_CLUSTER
fi

mkdir -p "$RUN_DIR/logs/slurm"
common=(--parsable --export="ALL,LLAVA_SLURM_DIR=$here" --output="$RUN_DIR/logs/slurm/%j.out")
[ -n "${PARTITION:-}" ] && common+=(--partition="$PARTITION")
[ -n "${ACCOUNT:-}" ] && common+=(--account="$ACCOUNT")
[ -n "${QOS:-}" ] && common+=(--qos="$QOS")
[ -n "${CPUS_PER_TASK:-}" ] && common+=(--cpus-per-task="$CPUS_PER_TASK")
read -r -a extra <<< "${SBATCH_EXTRA:-}"
common+=("${extra[@]}")
train_opts=()
[ -n "${NODES:-}" ] && train_opts+=(--nodes="$NODES")
[ -n "${GPUS_PER_NODE:-}" ] && train_opts+=(--ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE")
[ -n "${TRAIN_TIME:-}" ] && train_opts+=(--time="$TRAIN_TIME")

succeeded() { grep -q '"status": "succeeded"' "$RUN_DIR/state/$1.json" 2>/dev/null; }

# submit STAGE SCRIPT [sbatch options...]: prints the job id, chained after the previous one.
previous=""
submit() {
  local stage=$1 script=$2; shift 2
  if succeeded "$stage"; then
    echo "$stage: already succeeded, skipped" >&2
    return
  fi
  local dep=()
  [ -n "$previous" ] && dep=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
  local id
  id=$(sbatch "${common[@]}" "${dep[@]}" "$@" "$here/$script")
  previous=${id%%;*}  # --parsable prints "id" or "id;cluster"
  echo "$stage: job $previous${dep:+ (${dep[0]#--})}" >&2
}
submit train "$train_script" "${train_opts[@]}"
submit merge merge.sbatch
submit validate validate.sbatch
echo "follow: squeue -u ${USER:-$(id -un)}   |   llava-cluster status $RUN_DIR   |   tail -f $RUN_DIR/logs/slurm/<job>.out" >&2
