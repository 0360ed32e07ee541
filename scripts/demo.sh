#!/usr/bin/env bash
# The main job on its embedded default, from a fresh clone: build, then slim the
# bundled digits ViT end to end (patchslim demo). Extra arguments go to the command.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
PATCHSLIM_EXTRAS=demo patchslim_setup_env
patchslim demo "$@"
