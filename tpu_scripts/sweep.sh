#!/usr/bin/env bash
# Run a jrlhf sweep on a TPU slice: its points one after another, each on the whole slice.
#
#   tpu_scripts/sweep.sh --name NAME --zone ZONE [--job JOB] [--detach] [--dry-run] -- ARGS...
#
#   ARGS  a sweep as `python -m jrlhf.run -m` takes it: experiment=tiny/sft optim.lr=1e-3,3e-4
#         run_dir=gs://B/sweeps/lr (each point gets its own run dir under it)
#
# Every worker runs the same sweep driver, which starts the same points in the same order; the
# processes of each point join up as one multi-host run. One slice for the whole sweep, not one
# queued resource per point: a point needs every chip anyway, provisioning is paid once, and a
# rerun (or until_done.sh after a preemption) skips finished points and resumes the current
# one from its checkpoint.
#
# Example: tpu_scripts/sweep.sh --name pod --zone us-east5-a --job lr --detach -- \
#            experiment=tiny/sft optim.lr=1e-3,3e-4 run_dir=gs://my-bucket/sweeps/lr

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
need_name_zone
((${#REST[@]})) || die "give the sweep after --, e.g. -- experiment=tiny/sft optim.lr=1e-3,3e-4"
ssh_workers "$(jrlhf_command -m "${REST[@]}")"
