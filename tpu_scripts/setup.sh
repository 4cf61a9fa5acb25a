#!/usr/bin/env bash
# Install jrlhf on every worker of a TPU slice: ship the repo at a git ref, make a venv there.
#
#   tpu_scripts/setup.sh --name NAME --zone ZONE [--ref REF] [--project PROJECT] [--dry-run]
#
#   --ref  what to ship (default HEAD: commit your changes first; uncommitted edits stay here).
#
# Every worker gets ~/jrlhf (the source) and ~/jrlhf/.venv with jrlhf[tpu] (JAX with libtpu)
# and gcsfs (gs:// run dirs). Rerunning replaces the source and updates the venv.

set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
need_name_zone
PROJECT_FLAG="$(project_flag)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/jrlhf-src.tar.gz"

run git -C "$REPO" archive --format=tar.gz --output="$TARBALL" "$REF"
run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:jrlhf-src.tar.gz" --zone="$ZONE" \
  ${PROJECT_FLAG:+"$PROJECT_FLAG"} --worker="$WORKER"
ssh_workers "rm -rf \$HOME/$REMOTE_DIR.new && mkdir -p \$HOME/$REMOTE_DIR.new && tar xzf \$HOME/jrlhf-src.tar.gz -C \$HOME/$REMOTE_DIR.new && if [ -d \$HOME/$REMOTE_DIR/.venv ]; then mv \$HOME/$REMOTE_DIR/.venv \$HOME/$REMOTE_DIR.new/; fi && rm -rf \$HOME/$REMOTE_DIR && mv \$HOME/$REMOTE_DIR.new \$HOME/$REMOTE_DIR && cd \$HOME/$REMOTE_DIR && (test -d .venv || python3 -m venv .venv) && .venv/bin/python -m pip install -q -U pip && .venv/bin/python -m pip install -q -e '.[tpu]' gcsfs"
