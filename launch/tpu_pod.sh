#!/usr/bin/env bash
# Run cream_jax on every worker of a Cloud TPU VM slice (single- or multi-host) with gcloud.
#
# Usage:
#   launch/tpu_pod.sh [--dry-run] create              create the TPU VM slice
#   launch/tpu_pod.sh [--dry-run] setup               ship this checkout (git HEAD) to every worker
#                                                     and build its venv (jax[tpu] + cream_jax)
#   launch/tpu_pod.sh [--dry-run] run [-- ARGS...]    python -m cream_jax.train on all workers at once;
#                                                     ARGS go to the trainer (e.g. --gin_param '...')
#   launch/tpu_pod.sh [--dry-run] delete              delete the slice
#   --dry-run prints the commands instead of running them.
#
# Required env:
#   TPU_NAME          name of the TPU VM slice                              (all commands)
#   ZONE              its zone, e.g. us-central2-b                          (all commands)
#   ACCELERATOR_TYPE  slice type, e.g. v4-32, v5litepod-16, v5p-64          (create)
#   RUNTIME_VERSION   TPU VM software version, e.g. tpu-ubuntu2204-base     (create)
#   GIN_FILES         gin files, relative to the checkout, separated by spaces or commas,
#                     e.g. "configs/cream.gin configs/models/llama3_8b.gin"  (run)
#   WORKDIR           run directory at the same path on every worker: a shared file system
#                     (Filestore/NFS, or a bucket mounted with gcsfuse)     (run)
# Optional env:
#   PROJECT           GCP project (default: gcloud's configured project)
#   REMOTE_DIR        checkout location on the workers (default: cream_jax, i.e. ~/cream_jax)
#
# Hyper-parameters live in the gin files, never here. Every worker runs the same command;
# cream_jax.distributed detects the TPU pod (worker count and id come from the TPU metadata), and
# the mesh spans all hosts' chips (see launch/README.md for mesh shapes per slice size).
set -euo pipefail

# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
REMOTE_DIR="${REMOTE_DIR:-cream_jax}"
need TPU_NAME "the TPU VM slice name"
need ZONE "the slice's zone, e.g. us-central2-b"
GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi

on_all_workers() {  # on_all_workers "shell command": run it on every worker of the slice
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}

case "$ACTION" in
  create)
    need ACCELERATOR_TYPE "the slice type, e.g. v4-32"
    need RUNTIME_VERSION "the TPU VM software version, e.g. tpu-ubuntu2204-base"
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
    ;;
  setup)
    # The jax pin of pyproject.toml, with its TPU runtime (libtpu) from PyPI.
    JAX_VERSION="$(sed -n 's/^ *"jax==\([^"]*\)".*/\1/p' "$REPO_ROOT/pyproject.toml")"
    [[ -n "$JAX_VERSION" ]] || { echo "error: no jax== pin found in $REPO_ROOT/pyproject.toml" >&2; exit 2; }
    TARBALL="${TMPDIR:-/tmp}/cream_jax-$TPU_NAME.tar.gz"
    # Committed code only (git HEAD): what runs on the pod is a known revision.
    run git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:cream_jax.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
    setup_cmd="set -euo pipefail; rm -rf $(printf '%q' "$REMOTE_DIR") && mkdir -p $(printf '%q' "$REMOTE_DIR")"
    setup_cmd+=" && tar -xzf cream_jax.tar.gz -C $(printf '%q' "$REMOTE_DIR") && cd $(printf '%q' "$REMOTE_DIR")"
    setup_cmd+=" && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip"
    setup_cmd+=" && pip install -q -e . $(printf '%q' "jax[tpu]==$JAX_VERSION")"
    on_all_workers "$setup_cmd"
    ;;
  run)
    need GIN_FILES "gin files relative to the checkout, e.g. 'configs/cream.gin configs/models/llama3_8b.gin'"
    need WORKDIR "a run directory at the same path on every worker (shared file system)"
    train_command
    on_all_workers "cd $(printf '%q' "$REMOTE_DIR") && . .venv/bin/activate && $(printf '%q ' "${TRAIN[@]}")"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
    ;;
  *)
    echo "error: unknown command '$ACTION' (create | setup | run | delete)" >&2
    usage
    ;;
esac
