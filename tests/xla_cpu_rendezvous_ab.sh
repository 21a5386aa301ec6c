#!/usr/bin/env bash
# Reproduces the XLA:CPU collective-rendezvous abort that tests/test_multihost.py reruns on: the
# 1-process x 8-device CLI run of its kill/resume test, two at a time, ROUNDS rounds per mode, and
# counts the runs XLA aborted ("Termination timeout for ..."). Modes (MODES="default sync ..."):
#   default     the test's flags (tests/_fast_xla.py)     sync   + jax_cpu_enable_async_dispatch=False
#   defaultxla  XLA's own compile flags                   pool32 + a 32-thread XLA:CPU pool (PJRT_NPROC)
# Usage: bash tests/xla_cpu_rendezvous_ab.sh [ROUNDS] (from the repository root, its venv active).
set -u
ROUNDS=${1:-4}
OUT=${OUT:-/tmp/xla_cpu_rendezvous_ab}
FAST=$(python -c "from tests._fast_xla import FAST_XLA; print(FAST_XLA)")
export JAX_PLATFORMS=cpu CREAM_JAX_NO_PROGRESS=1 PYTHONPATH=$PWD
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/cream_jax_test_xla_cache} JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.2
ARGS=(--gin_file tests/configs/smoke.gin --gin_param "Run.iterations = 1" --gin_param "Mesh.data = 2" --gin_param "Mesh.fsdp = 2"
      --gin_param "Mesh.tensor = 2" --gin_param "DPOOptim.batch_size = 4")
SYNC="import jax, runpy, sys; jax.config.update('jax_cpu_enable_async_dispatch', False); sys.argv[0] = 'cream_jax.train'; runpy.run_module('cream_jax.train', run_name='__main__')"
one() {  # mode workdir
  local flags="--xla_force_host_platform_device_count=8 $FAST"
  case $1 in
    default) XLA_FLAGS=$flags python -m cream_jax.train "${ARGS[@]}" --workdir "$2" ;;
    sync) XLA_FLAGS=$flags python -c "$SYNC" "${ARGS[@]}" --workdir "$2" ;;
    defaultxla) XLA_FLAGS="--xla_force_host_platform_device_count=8" python -m cream_jax.train "${ARGS[@]}" --workdir "$2" ;;
    pool32) PJRT_NPROC=32 XLA_FLAGS=$flags python -m cream_jax.train "${ARGS[@]}" --workdir "$2" ;;
  esac > "$2.log" 2>&1
}
for r in $(seq 1 "$ROUNDS"); do
  for mode in ${MODES:-default sync}; do
    d=$OUT/$mode$r; rm -rf "$d"; mkdir -p "$d"
    one "$mode" "$d/a" & one "$mode" "$d/b" & wait
    echo "round $r $mode: aborted $(grep -l 'Termination timeout for' "$d"/*.log | wc -l) of 2, finished $(grep -l 'results in' "$d"/*.log | wc -l) of 2, load $(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
