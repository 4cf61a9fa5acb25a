#!/usr/bin/env bash
# Follow a job's log on a TPU slice (process 0's worker by default: it prints the metrics).
#
#   tpu_scripts/logs.sh --name NAME --zone ZONE [--job JOB] [--worker all|N] [--dry-run]
#
# Lines of processes other than 0 start with [jrlhf pI/N]. Ctrl-C stops following, not the run.

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
WORKER=0
parse_flags "$@"
need_name_zone
ssh_workers "tail -n 200 -F \$HOME/$LOG_DIR/$JOB.log"
