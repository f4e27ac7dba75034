#!/usr/bin/env bash
# Entrypoint of the KubeRay RayJob (cluster/rayjob.yaml): start a tokmarg run, or resume it.
#
#   bash cluster/rayjob-entrypoint.sh RUN_DIR [RUN_OPTIONS...] [-- EXEC_OPTIONS...]
#
#   RUN_OPTIONS   what the run computes: --models, --dataset, --params, --strategies,
#                 --partition-size, ... (stored in RUN_DIR/run.json by tokmarg)
#   EXEC_OPTIONS  how this attempt runs: --address, --replicas, --gpus-per-actor, ...
#
# RUN_DIR lives on a persistent volume. If it already holds a run (RUN_DIR/run.json: the RayJob
# was retried by KubeRay's backoffLimit, or deleted and applied again), this continues it with
# `tokmarg eval --resume RUN_DIR EXEC_OPTIONS` (a resumed run takes its inputs from run.json,
# so RUN_OPTIONS are not repeated) and redoes no finished partition; otherwise it starts it
# with `tokmarg eval RUN_OPTIONS EXEC_OPTIONS --out RUN_DIR`.
#
# The logic lives here rather than in the manifest's `entrypoint` because KubeRay splices the
# entrypoint unquoted into the submitter pod's shell line (`... ray job submit ... -- ENTRYPOINT
# ; fi`): it is parsed by one more shell, in another pod, so `$VARIABLES` there would expand in
# the submitter and quotes would need doubling. Plain words pass through unchanged.
set -euo pipefail

if (($# < 1)) || [[ "$1" == -* ]]; then
    echo "usage: $0 RUN_DIR [RUN_OPTIONS...] [-- EXEC_OPTIONS...]" >&2
    exit 2
fi
run_dir="$1"
shift

run_opts=()
while (($# > 0)) && [[ "$1" != "--" ]]; do
    run_opts+=("$1")
    shift
done
(($# > 0)) && shift # the "--"
exec_opts=("$@")

if [[ -f "${run_dir}/run.json" ]]; then
    echo "rayjob-entrypoint: ${run_dir} holds a run; resuming it" >&2
    exec tokmarg eval --resume "$run_dir" "${exec_opts[@]}"
fi
mkdir -p "$(dirname "$run_dir")"
echo "rayjob-entrypoint: starting a new run in ${run_dir}" >&2
exec tokmarg eval "${run_opts[@]}" "${exec_opts[@]}" --out "$run_dir"
