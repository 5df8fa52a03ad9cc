# Sourced by the other scripts: sets PYTHON to an interpreter that can import megatron_lite.
# Uses the current environment when it already has the package (e.g. an NVIDIA container after
# `pip install -e .`); otherwise creates .venv in the repo with torch and `.[dev]`, one line per step
# (the installers' output goes to .venv/setup.log, shown when a step fails).
# torch: on a machine without an NVIDIA GPU the CPU wheel from PyTorch's CPU index
# (TORCH_INDEX_URL, default https://download.pytorch.org/whl/cpu), or from pip's configured index when
# that one cannot be reached; with a GPU (or TORCH_INDEX_URL=""), pip's configured index.
# Override with PYTHON=/path/to/python; ML_EXTRAS names the extras to install (default: dev).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_ml_can_import() { (cd / && "$1" -c "import megatron_lite, torch, hydra, ${2:-torch}") >/dev/null 2>&1; }
_ml_torch=2.13.0

# Run an installer step quietly: its output goes to the log, and on failure the log's tail shows.
_ml_step() {
  local what=$1
  shift
  echo "setup: $what" >&2
  echo "### $what: $*" >>"$_ml_log"
  if ! "$@" >>"$_ml_log" 2>&1; then
    tail -n 15 "$_ml_log" >&2
    echo "setup: failed: $what (full output: $_ml_log)" >&2
    return 1
  fi
}

# True when PyTorch's CPU index answers within a few seconds (pip itself would retry for minutes).
_ml_reachable() {
  "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=8)" \
    "$1" >/dev/null 2>&1
}

_ml_setup() {
  local start=$SECONDS index=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
  _ml_log="$REPO_ROOT/.venv/setup.log"
  echo "setup: creating $REPO_ROOT/.venv ($(python3 --version 2>&1))" >&2
  python3 -m venv "$REPO_ROOT/.venv" || return 1
  PYTHON="$REPO_ROOT/.venv/bin/python"
  : >"$_ml_log"
  _ml_step "upgrading pip" "$PYTHON" -m pip install --upgrade pip || return 1
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    index=""  # a GPU: the CUDA build from the configured index
  fi
  if [ -n "$index" ] && _ml_reachable "$index"; then
    _ml_step "torch $_ml_torch, CPU wheel from $index" \
      "$PYTHON" -m pip install "torch==$_ml_torch" --index-url "$index" || return 1
  else
    [ -n "$index" ] && echo "setup: $index cannot be reached; torch from pip's configured index" >&2
    _ml_step "torch $_ml_torch from pip's configured index" "$PYTHON" -m pip install "torch==$_ml_torch" || return 1
  fi
  _ml_step "megatron_lite[${ML_EXTRAS:-dev}] (editable) and its dependencies" \
    "$PYTHON" -m pip install -e "$REPO_ROOT[${ML_EXTRAS:-dev}]" || return 1
  # Build the C++ kernels now (cached), not at the first training step; a failure is only a warning.
  _ml_step "building the C++ kernels (megatron_lite.ops)" "$PYTHON" -m megatron_lite.ops \
    || echo "setup: the kernels did not build; training runs the PyTorch reference ops" >&2
  echo "setup: done in $((SECONDS - start)) s: $PYTHON (torch $("$PYTHON" -c 'import torch; print(torch.__version__)'); log $_ml_log)" >&2
}

if [ -z "${PYTHON:-}" ]; then
  if _ml_can_import python3 "${ML_NEEDS:-torch}"; then
    PYTHON=python3
  elif [ -x "$REPO_ROOT/.venv/bin/python" ] && _ml_can_import "$REPO_ROOT/.venv/bin/python" "${ML_NEEDS:-torch}"; then
    PYTHON="$REPO_ROOT/.venv/bin/python"
  else
    _ml_setup || exit 1
  fi
fi
export PYTHON
