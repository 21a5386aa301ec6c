#!/usr/bin/env bash
# Run cream_jax on several GPU hosts, one process per host (each sees all of its GPUs).
#
# Usage:
#   launch/gpu_multinode.sh [--dry-run] slurm [-- ARGS...]   inside a SLURM allocation (sbatch/salloc):
#                                                           one srun task per allocated node
#   launch/gpu_multinode.sh [--dry-run] ssh [-- ARGS...]     plain ssh to every host of $HOSTS
#   ARGS go to the trainer (e.g. --gin_param '...'); --dry-run prints the commands instead.
#
# Required env:
#   GIN_FILES            gin files, relative to the checkout, separated by spaces or commas,
#                        e.g. "configs/cream.gin configs/models/llama3_8b.gin"
#   WORKDIR              run directory at the same path on every host (a shared file system)
#   HOSTS                (ssh) comma-separated host names; the first one is the coordinator
#   SLURM_JOB_NODELIST   (slurm) set by sbatch/salloc, as is SLURM_JOB_NUM_NODES
# Optional env:
#   COORDINATOR_PORT     port of the coordinator on the first host (default 61234)
#   REMOTE_DIR           the checkout on every host (default: this checkout's path)
#   VENV                 virtualenv to activate there (default: $REMOTE_DIR/.venv)
#
# Each process gets JAX_COORDINATOR_ADDRESS=<first host>:<port>, JAX_NUM_PROCESSES=<hosts> and
# its JAX_PROCESS_ID, which cream_jax.distributed reads. Hyper-parameters live in the gin files,
# never here; launch/README.md lists mesh shapes per node count.
set -euo pipefail

# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
REMOTE_DIR="${REMOTE_DIR:-$REPO_ROOT}"
VENV="${VENV:-$REMOTE_DIR/.venv}"
PORT="${COORDINATOR_PORT:-61234}"
need GIN_FILES "gin files relative to the checkout, e.g. 'configs/cream.gin configs/models/llama3_8b.gin'"
need WORKDIR "a run directory at the same path on every host (shared file system)"

train_command
# What every process runs, after its JAX_* variables are exported.
body="cd $(printf '%q' "$REMOTE_DIR") && . $(printf '%q' "$VENV/bin/activate") && exec $(printf '%q ' "${TRAIN[@]}")"

case "$ACTION" in
  slurm)
    need SLURM_JOB_NODELIST "run inside an sbatch/salloc allocation"
    need SLURM_JOB_NUM_NODES "run inside an sbatch/salloc allocation"
    coordinator="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"  # sed reads all: no SIGPIPE
    [[ -n "$coordinator" ]] || { echo "error: scontrol lists no host for '$SLURM_JOB_NODELIST'" >&2; exit 2; }
    nodes="$SLURM_JOB_NUM_NODES"
    # SLURM_PROCID is expanded by each task, not here (single-quoted in the task's script).
    task="export JAX_COORDINATOR_ADDRESS=$coordinator:$PORT JAX_NUM_PROCESSES=$nodes"
    task+=' JAX_PROCESS_ID=$SLURM_PROCID && '"$body"
    cmd=(srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$task")
    run "${cmd[@]}"
    ;;
  ssh)
    need HOSTS "comma-separated host names, the first one is the coordinator"
    IFS=',' read -ra hosts <<< "$HOSTS"
    coordinator="${hosts[0]}"
    pids=()
    # If one process fails or this script is stopped, stop the other hosts' processes too.
    trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
    for i in "${!hosts[@]}"; do
      task="export JAX_COORDINATOR_ADDRESS=$coordinator:$PORT JAX_NUM_PROCESSES=${#hosts[@]} JAX_PROCESS_ID=$i && $body"
      cmd=(ssh -o BatchMode=yes "${hosts[$i]}" "$task")
      if (( DRY_RUN )); then run "${cmd[@]}"; else "${cmd[@]}" & pids+=("$!"); fi
    done
    status=0
    for _ in "${pids[@]}"; do
      if ! wait -n; then  # the first process to fail stops the rest
        echo "error: a process failed (its output is above); stopping the other hosts" >&2
        status=1
        for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
        wait || true
        break
      fi
    done
    trap - EXIT
    exit "$status"
    ;;
  *)
    echo "error: unknown mode '$ACTION' (slurm | ssh)" >&2
    usage
    ;;
esac
