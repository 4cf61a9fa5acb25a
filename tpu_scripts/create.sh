#!/usr/bin/env bash
# Create a TPU VM slice, or queue a request for one, for jrlhf runs.
#
#   tpu_scripts/create.sh --name NAME --zone ZONE --type TYPE [--spot] [--queued]
#                         [--version RUNTIME] [--project PROJECT] [--dry-run]
#
#   --type     v5e-N (e.g. v5e-16), v5p-N (v5p-8, v5p-64, v5p-128) or v6e-N (v6e-8, v6e-64);
#              N counts chips for v5e/v6e and TensorCores (2 per chip) for v5p, as gcloud does.
#   --spot     spot (preemptible) capacity: cheaper, may be taken back at any time; pair with
#              until_done.sh, which recreates the slice and resumes the run from its checkpoint.
#   --queued   ask through a queued resource (waits for capacity instead of failing at once;
#              the usual way to get v5p/v6e pods); this script waits until it is ACTIVE.
#   --version  TPU VM runtime image (default: the one for the chip generation).
#   --dry-run  print the gcloud commands instead of running them.
#
# Example: tpu_scripts/create.sh --name pod --zone us-east5-a --type v5p-64 --spot --queued

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
need_name_zone
[[ -n "$TYPE" ]] || die "--type is required (v5e-16, v5p-8, v5p-64, v5p-128, v6e-8, v6e-64, ...)"
ACCEL="$(accelerator_type "$TYPE")"
VERSION="${VERSION:-$(runtime_version "$ACCEL")}"
PROJECT_FLAG="$(project_flag)"
SPOT_FLAG=()
if ((SPOT)); then
  SPOT_FLAG=(--spot)
fi

if ((QUEUED)); then
  run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" --zone="$ZONE" \
    ${PROJECT_FLAG:+"$PROJECT_FLAG"} --accelerator-type="$ACCEL" --runtime-version="$VERSION" \
    "${SPOT_FLAG[@]}"
  # A queued resource waits for capacity: poll until it is ACTIVE (or report a dead end).
  while true; do
    state="$(run gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE" \
      ${PROJECT_FLAG:+"$PROJECT_FLAG"} --format='value(state.state)')"
    if ((DRY_RUN)); then
      echo "$state"
      echo "# (repeats every 60 s until the state is ACTIVE)"
      break
    fi
    echo "queued resource $NAME: $state" >&2
    case "$state" in
      ACTIVE) break ;;
      FAILED | SUSPENDED) die "queued resource $NAME is $state; delete.sh --queued and retry" ;;
    esac
    sleep 60
  done
else
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" ${PROJECT_FLAG:+"$PROJECT_FLAG"} \
    --accelerator-type="$ACCEL" --version="$VERSION" "${SPOT_FLAG[@]}"
fi
