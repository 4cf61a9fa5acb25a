#!/usr/bin/env bash
# Stop a detached job on every worker: SIGTERM, so the run saves a checkpoint and exits.
#
#   tpu_scripts/stop.sh --name NAME --zone ZONE [--job JOB] [--dry-run]
#
# Launching the same command again resumes from that checkpoint. delete.sh frees the slice.

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
need_name_zone
ssh_workers "if [ -f \$HOME/$LOG_DIR/$JOB.pid ]; then pkill -TERM -P \"\$(cat \$HOME/$LOG_DIR/$JOB.pid)\" || true; fi"
