#!/usr/bin/env bash
# The main job on its embedded default, from a fresh clone: build, then the FLOP
# report of the demo model (patchslim flops). Extra arguments go to the command.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
patchslim_setup_env
patchslim flops "$@"
