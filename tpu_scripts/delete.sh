#!/usr/bin/env bash
# Delete a TPU slice (or its queued resource): billing stops; gs:// run dirs are kept.
#
#   tpu_scripts/delete.sh --name NAME --zone ZONE [--queued] [--project PROJECT] [--dry-run]

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
need_name_zone
PROJECT_FLAG="$(project_flag)"
if ((QUEUED)); then
  # --force deletes the TPU VM the queued resource holds, too.
  run gcloud compute tpus queued-resources delete "$NAME" --zone="$ZONE" \
    ${PROJECT_FLAG:+"$PROJECT_FLAG"} --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" ${PROJECT_FLAG:+"$PROJECT_FLAG"} \
    --quiet
fi
