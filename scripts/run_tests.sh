#!/usr/bin/env bash
# The test suite: bash scripts/run_tests.sh [pytest args]   (sets up .venv on first use)
set -euo pipefail
ML_NEEDS=pytest source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$REPO_ROOT"
set +e
"$PYTHON" -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
