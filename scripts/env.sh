# Sourced by scripts/test.sh and scripts/demo.sh: make ./.venv, install torch and
# this package into it (compiling the extension), and put it first on PATH.
#
#   PYTHON              interpreter for the venv (default: python3; needs >= 3.10)
#   PATCHSLIM_TORCH     torch requirement (default: torch==2.13.0)
#   PATCHSLIM_CUDA      0/1: build the CUDA kernels (default: auto, see setup.py)
#   PATCHSLIM_EXTRAS    extras to install (e.g. "test")

patchslim_setup_env() {
  local root venv python
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="$root/.venv"
  python="${PYTHON:-python3}"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "patchslim needs Python >= 3.10 (found $("$python" --version 2>&1))" >&2
    return 1
  }
  if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv"
    "$python" -m venv "$venv"
  fi
  local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  echo "==> installing build tools and ${PATCHSLIM_TORCH:-torch==2.13.0}"
  "${pip[@]}" --upgrade pip "setuptools>=77" wheel ninja
  # NumPy before the build: setup.py imports torch, which warns without it.
  "${pip[@]}" "${PATCHSLIM_TORCH:-torch==2.13.0}" "numpy>=1.24"
  echo "==> building patchslim_ext${PATCHSLIM_EXTRAS:+ [$PATCHSLIM_EXTRAS]}"
  # Extras such as timm depend on torchvision, whose newest release asks for a newer
  # torch: pin the torch just installed so that pip never pulls a second one.
  local constraints="$venv/torch-constraint.txt"
  "$venv/bin/python" -c 'import torch; print(f"torch=={torch.__version__}")' >"$constraints"
  (cd "$root" && "${pip[@]}" --no-build-isolation -c "$constraints" \
    -e ".${PATCHSLIM_EXTRAS:+[$PATCHSLIM_EXTRAS]}")
  export PATH="$venv/bin:$PATH"
}
