# shellcheck shell=bash disable=SC2034
# Shared by tpu_scripts/*.sh: flags, defaults, the accelerator table and the --dry-run runner.
# Sourced, never run. Defaults come from the environment so a session can set them once:
#   export JRLHF_TPU_NAME=my-pod JRLHF_TPU_ZONE=us-east5-a JRLHF_TPU_PROJECT=my-project
set -euo pipefail

NAME="${JRLHF_TPU_NAME:-}"
ZONE="${JRLHF_TPU_ZONE:-}"
PROJECT="${JRLHF_TPU_PROJECT:-}"
TYPE=""
VERSION=""
SPOT=0
QUEUED=0
DETACH=0
DRY_RUN=0
WORKER="all"
JOB="jrlhf"
MAX_TRIES=20
REF="HEAD"
REST=()
# Where the package and the logs live on every worker, relative to the ssh user's home.
REMOTE_DIR="jrlhf"
LOG_DIR="jrlhf-logs"

usage() {
  # The script's header comment (from line 2 to the first blank line) is its help.
  sed -n '2,/^$/{s/^# \{0,1\}//;p;}' "$0"
}

die() {
  echo "error: $*" >&2
  exit 2
}

# parse_flags "$@": every script takes the same flags and ignores those it does not use; the
# arguments after `--` (the jrlhf command line) land in REST.
parse_flags() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      --queued) QUEUED=1 ;;
      --detach) DETACH=1 ;;
      --name | --zone | --project | --type | --version | --worker | --job | --max-tries | --ref)
        (($# >= 2)) || die "$1 needs a value"
        set_flag "${1#--}" "$2"
        shift ;;
      --name=* | --zone=* | --project=* | --type=* | --version=* | --worker=* | --job=* | \
      --max-tries=* | --ref=*)
        local key="${1%%=*}"
        set_flag "${key#--}" "${1#*=}" ;;
      --) shift; REST=("$@"); return 0 ;;
      *) die "unknown flag $1 (see $0 --help)" ;;
    esac
    shift
  done
}

set_flag() {
  case "$1" in
    name) NAME="$2" ;;
    zone) ZONE="$2" ;;
    project) PROJECT="$2" ;;
    type) TYPE="$2" ;;
    version) VERSION="$2" ;;
    worker) WORKER="$2" ;;
    job) JOB="$2" ;;
    max-tries) MAX_TRIES="$2" ;;
    ref) REF="$2" ;;
  esac
}

need_name_zone() {
  [[ -n "$NAME" ]] || die "--name NAME (or JRLHF_TPU_NAME) is required"
  [[ -n "$ZONE" ]] || die "--zone ZONE (or JRLHF_TPU_ZONE) is required, e.g. us-east5-a"
}

# accelerator_type v5e-16 -> v5litepod-16 (gcloud's name for v5e); v5p-8, v6e-8 pass through.
accelerator_type() {
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    v5litepod-* | v5p-* | v6e-*) echo "$1" ;;
    *) die "--type $1: expected v5e-N, v5p-N or v6e-N (e.g. v5e-16, v5p-64, v6e-8)" ;;
  esac
}

# runtime_version TYPE: the TPU VM image that matches the chip generation.
runtime_version() {
  case "$1" in
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
  esac
}

# quote ARGS...: one shell-ready line; arguments with spaces or metacharacters single-quoted.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
      out+=("$arg")
    else
      out+=("${arg@Q}")
    fi
  done
  echo "${out[*]}"
}

# run CMD...: runs it, or with --dry-run prints it (as `+ CMD`) and runs nothing.
run() {
  if ((DRY_RUN)); then
    echo "+ $(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# The gcloud prefix every TPU command shares.
project_flag() {
  if [[ -n "$PROJECT" ]]; then
    echo "--project=$PROJECT"
  fi
}

# ssh_workers COMMAND: runs a shell command on the workers chosen by --worker (default: all).
ssh_workers() {
  local project
  project="$(project_flag)"
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" ${project:+"$project"} \
    --worker="$WORKER" --command="$1"
}

# jrlhf_command ARGS...: the remote command that runs `python -m jrlhf.run ARGS` in the
# package's venv, appending to the job's log; with --detach it keeps running after ssh exits
# and records its pid (stop.sh sends it SIGTERM: the run checkpoints, then exits).
jrlhf_command() {
  local run_cmd log="$LOG_DIR/$JOB.log"
  run_cmd="cd \$HOME/$REMOTE_DIR && .venv/bin/python -m jrlhf.run $(quote "$@")"
  if ((DETACH)); then
    echo "mkdir -p \$HOME/$LOG_DIR && rm -f \$HOME/$LOG_DIR/$JOB.done && nohup bash -c $(quote "set -o pipefail; $run_cmd >> \$HOME/$log 2>&1 && touch \$HOME/$LOG_DIR/$JOB.done") > /dev/null 2>&1 & echo \$! > \$HOME/$LOG_DIR/$JOB.pid"
  else
    echo "mkdir -p \$HOME/$LOG_DIR && rm -f \$HOME/$LOG_DIR/$JOB.done && set -o pipefail && ($run_cmd) 2>&1 | tee -a \$HOME/$log && touch \$HOME/$LOG_DIR/$JOB.done"
  fi
}
