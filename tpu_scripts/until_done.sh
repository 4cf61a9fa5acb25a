#!/usr/bin/env bash
# Keep a run (or sweep) going on spot/preemptible capacity until it finishes.
#
#   tpu_scripts/until_done.sh --name NAME --zone ZONE --type TYPE [--spot] [--queued]
#                             [--job JOB] [--max-tries N] [--dry-run] -- ARGS...
#
#   ARGS  what follows `python -m jrlhf.run`; start with -m for a sweep. Use a gs:// run_dir:
#         a recreated slice starts with empty disks, and the run resumes from the bucket.
#
# Each try: if the slice is missing, preempted or failed, delete it, create it again (create.sh)
# and install jrlhf (setup.sh); then run the command on all workers in the foreground. The job is
# done when worker 0 has its done marker (~/jrlhf-logs/JOB.done, written only when the command
# exits 0); otherwise, after a preemption or a failure, the next try runs the same command, which
# resumes from the last checkpoint. Gives up after --max-tries tries (default 20).
#
# Example: tpu_scripts/until_done.sh --name pod --zone us-east5-a --type v5p-64 --spot --queued \
#            --job sft -- experiment=tiny/sft run_dir=gs://my-bucket/runs/tiny-sft

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ARGS=("$@")
HERE="$(dirname "${BASH_SOURCE[0]}")"
parse_flags "$@"
need_name_zone
[[ -n "$TYPE" ]] || die "--type is required: a preempted slice is created again with it"
((${#REST[@]})) || die "give the jrlhf arguments after --, e.g. -- experiment=tiny/sft"
PROJECT_FLAG="$(project_flag)"

state() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources describe "$NAME" --zone="$ZONE" \
      ${PROJECT_FLAG:+"$PROJECT_FLAG"} --format='value(state.state)' 2>/dev/null || echo MISSING
  else
    run gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" \
      ${PROJECT_FLAG:+"$PROJECT_FLAG"} --format='value(state)' 2>/dev/null || echo MISSING
  fi
}

recreate() {
  if [[ "$1" != MISSING ]]; then
    "$HERE/delete.sh" "${ARGS[@]}"
  fi
  "$HERE/create.sh" "${ARGS[@]}"
  "$HERE/setup.sh" "${ARGS[@]}"
}

done_marker() {
  WORKER=0 ssh_workers "test -f \$HOME/$LOG_DIR/$JOB.done"
}

if ((DRY_RUN)); then
  state
  echo "# if the slice is missing, PREEMPTED, TERMINATED or FAILED:"
  recreate PREEMPTED
  ssh_workers "$(jrlhf_command "${REST[@]}")"
  done_marker
  echo "# repeats (at most $MAX_TRIES tries) until $LOG_DIR/$JOB.done exists on worker 0"
  exit 0
fi

for ((try = 1; try <= MAX_TRIES; try++)); do
  current="$(state)"
  echo "[until_done] try $try/$MAX_TRIES: $NAME is $current" >&2
  case "$current" in
    READY | ACTIVE) ;;
    CREATING | STARTING | WAITING_FOR_RESOURCES | PROVISIONING | ACCEPTED)
      ((try--)) || true  # waiting for capacity is not a failed try
      sleep 60
      continue ;;
    *) recreate "$current" ;;
  esac
  ssh_workers "$(jrlhf_command "${REST[@]}")" || echo "[until_done] the run stopped (exit $?)" >&2
  if done_marker 2>/dev/null; then
    echo "[until_done] $JOB finished" >&2
    exit 0
  fi
  sleep 60
done
die "$JOB did not finish in $MAX_TRIES tries; its log: tpu_scripts/logs.sh --job $JOB"
