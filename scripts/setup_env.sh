# Sourced by the other scripts: sets PYTHON to an interpreter that can import megatron_lite.
# Uses the current environment when it already has the package (e.g. an NVIDIA container after
# `pip install -e .`); otherwise creates .venv in the repo with the CPU torch wheel and `.[dev]`.
# Override with PYTHON=/path/to/python; ML_EXTRAS names the extras to install (default: dev).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_ml_can_import() { (cd / && "$1" -c "import megatron_lite, torch, hydra, ${2:-torch}") >/dev/null 2>&1; }

if [ -z "${PYTHON:-}" ]; then
  if _ml_can_import python3 "${ML_NEEDS:-torch}"; then
    PYTHON=python3
  elif [ -x "$REPO_ROOT/.venv/bin/python" ] && _ml_can_import "$REPO_ROOT/.venv/bin/python" "${ML_NEEDS:-torch}"; then
    PYTHON="$REPO_ROOT/.venv/bin/python"
  else
    echo "setting up $REPO_ROOT/.venv (CPU torch 2.13.0 + megatron_lite[${ML_EXTRAS:-dev}]) ..." >&2
    python3 -m venv "$REPO_ROOT/.venv" || exit 1
    PYTHON="$REPO_ROOT/.venv/bin/python"
    "$PYTHON" -m pip install -q --upgrade pip >/dev/null 2>&1
    # The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
    "$PYTHON" -m pip install -q "torch==2.13.0" || exit 1
    "$PYTHON" -m pip install -q -e "$REPO_ROOT[${ML_EXTRAS:-dev}]" || exit 1
    # Build the C++ kernels now (cached), not at the first training step; a failure is only a warning.
    "$PYTHON" -m megatron_lite.ops >&2 || true
  fi
fi
export PYTHON
