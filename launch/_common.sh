# Shared by the launch scripts (sourced, not run): argument parsing, one-line env errors,
# --dry-run printing, and the trainer command. The sourcing script has already `set -euo pipefail`.
# After sourcing: DRY_RUN (0|1), ACTION (the first argument), EXTRA_ARGS (the trainer's ARGS), REPO_ROOT.

SCRIPT="${BASH_SOURCE[1]}"
usage() { sed -n '2,/^set -euo/p' "$SCRIPT" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
ACTION="${1:-}"
[[ -n "$ACTION" ]] || usage
shift
if [[ "${1:-}" == "--" ]]; then shift; fi
EXTRA_ARGS=("$@")
REPO_ROOT="$(cd "$(dirname "$SCRIPT")/.." && pwd)"

need() {  # need VAR "what it is": a one-line error when VAR is unset or empty
  if [[ -z "${!1:-}" ]]; then
    echo "error: $1 is not set ($2); see the header of launch/$(basename "$SCRIPT")" >&2
    exit 2
  fi
}

run() {  # run CMD...: execute it, or with --dry-run print it shell-quoted
  if (( DRY_RUN )); then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

train_command() {  # fills the array TRAIN with the trainer command for $GIN_FILES, $WORKDIR and ARGS
  TRAIN=(python -m cream_jax.train)
  local gin_files gin_file
  IFS=', ' read -ra gin_files <<< "$GIN_FILES"
  for gin_file in "${gin_files[@]}"; do TRAIN+=(--gin_file "$gin_file"); done
  TRAIN+=(--workdir "$WORKDIR" "${EXTRA_ARGS[@]}")
}
