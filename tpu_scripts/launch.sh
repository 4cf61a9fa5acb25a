#!/usr/bin/env bash
# Run one jrlhf command on every worker of a TPU slice (each worker is one process of the run).
#
#   tpu_scripts/launch.sh --name NAME --zone ZONE [--job JOB] [--detach] [--dry-run] -- ARGS...
#
#   ARGS      what follows `python -m jrlhf.run`, e.g. experiment=tiny/sft run_dir=gs://B/runs/x
#   --job     names the log (~/jrlhf-logs/JOB.log on each worker) and the done marker (JOB.done)
#   --detach  return at once; the run keeps going (logs.sh to follow it, stop.sh to stop it)
#   --worker  which workers (default all; a multi-host run needs all of them)
#
# The workers find each other by themselves (jax.distributed on a Cloud TPU VM); only process 0
# writes metrics. Use a gs:// run_dir on a multi-host slice: every worker writes checkpoint
# shards. Running the same command again resumes from the run's last checkpoint.
#
# Example: tpu_scripts/launch.sh --name pod --zone us-east5-a -- experiment=tiny/sft \
#            run_dir=gs://my-bucket/runs/tiny-sft

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
need_name_zone
((${#REST[@]})) || die "give the jrlhf arguments after --, e.g. -- experiment=tiny/sft"
ssh_workers "$(jrlhf_command "${REST[@]}")"
