# shellcheck shell=bash
# Shared body of the llava-cluster sbatch scripts in this folder. It is sourced by them, not submitted.
#
# Every job runs the same entry as every other backend:  llava-cluster stage <stage> --run-dir $RUN_DIR
# started with `srun`, one task per GPU. Each task is one rank: the stage maps SLURM_PROCID /
# SLURM_LOCALID / SLURM_NTASKS to RANK / LOCAL_RANK / WORLD_SIZE, and the rendezvous is the first node
# of the allocation (MASTER_ADDR below). No hostfile, no ssh, no torchrun agent between SLURM and the
# ranks, so `--signal=USR2@N` and preemption's SIGTERM reach every rank directly.
#
# Settings (environment variables; only RUN_DIR is required):
#   RUN_DIR            <storage>/runs/<name>: the run directory holding spec.yaml
#   LLAVA_CLUSTER      command that runs llava-cluster on the compute nodes    (default: llava-cluster;
#                      pipeline.sh sets it to the absolute path of the submitting shell's llava-cluster
#                      when there is no container, so the job does not depend on an activated venv)
#   MAX_REQUEUES       how often a preempted / timed-out job requeues itself    (default: 3)
#   CONTAINER_RUNTIME  none | pyxis | apptainer                                 (default: none)
#   CONTAINER_IMAGE    pyxis: e.g. ghcr.io#llava-cluster/llava-cluster:0.1.0 or a .sqsh file;
#                      apptainer: a .sif file or docker://...
#   STORAGE            shared storage root, mounted at the same path inside the container
#                      (default: the run directory's grandparent, i.e. <storage>)
#   CONTAINER_MOUNTS   extra mounts, comma separated (pyxis: host:container; apptainer: host[:container])
#   NCCL_*, HF_*, ... anything exported when you call sbatch reaches every rank (sbatch --export=ALL)

run_stage() {
  local stage=$1
  : "${RUN_DIR:?set RUN_DIR=<storage>/runs/<name>, the run directory holding spec.yaml}"
  if [ ! -f "$RUN_DIR/spec.yaml" ]; then
    echo "error: $RUN_DIR/spec.yaml not found: freeze the spec there first (see slurm/README.md)" >&2
    exit 2
  fi
  local storage=${STORAGE:-$(dirname "$(dirname "$RUN_DIR")")}
  local max_requeues=${MAX_REQUEUES:-3}
  local restarts=${SLURM_RESTART_COUNT:-0}

  # Rendezvous on the first node; resolved here because scontrol is usually absent inside containers.
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  export MASTER_ADDR

  local -a cmd srun_opts=()
  read -r -a cmd <<< "${LLAVA_CLUSTER:-llava-cluster}"
  cmd+=(stage "$stage" --run-dir "$RUN_DIR")
  case "${CONTAINER_RUNTIME:-none}" in
    none)
      if ! command -v "${cmd[0]}" > /dev/null; then
        echo "error: ${cmd[0]} not found on this node's PATH: set LLAVA_CLUSTER to its absolute path" \
             "(e.g. /shared/envs/llava/bin/llava-cluster) or submit with slurm/pipeline.sh from the venv" >&2
        exit 2
      fi ;;
    pyxis)
      srun_opts+=(--container-image="${CONTAINER_IMAGE:?CONTAINER_IMAGE is required with pyxis}"
                  --container-mounts="$storage:$storage${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}") ;;
    apptainer)
      cmd=(apptainer exec --nv --bind "$storage${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
           "${CONTAINER_IMAGE:?CONTAINER_IMAGE is required with apptainer}" "${cmd[@]}") ;;
    *)
      echo "error: CONTAINER_RUNTIME=$CONTAINER_RUNTIME: use none, pyxis or apptainer" >&2
      exit 2 ;;
  esac

  echo "[llava-cluster] $stage: job $SLURM_JOB_ID restart $restarts on $SLURM_JOB_NODELIST" \
       "($SLURM_NTASKS tasks, master $MASTER_ADDR, container ${CONTAINER_RUNTIME:-none})"
  local rc=0
  srun "${srun_opts[@]}" "${cmd[@]}" || rc=$?

  # 75: the stage saved a complete checkpoint after SIGUSR2/SIGTERM; running it again resumes there.
  if [ "$rc" -eq 75 ]; then
    if [ "$restarts" -lt "$max_requeues" ]; then
      echo "[llava-cluster] $stage stopped with a checkpoint: requeue $((restarts + 1)) of at most $max_requeues"
      scontrol requeue "$SLURM_JOB_ID"
      exit 0
    fi
    echo "[llava-cluster] $stage interrupted $((restarts + 1)) times, MAX_REQUEUES=$max_requeues reached;" \
         "submit again to resume from the last complete checkpoint" >&2
    exit 1
  fi
  exit "$rc"
}

