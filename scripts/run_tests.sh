#!/usr/bin/env bash
# The test suite: bash scripts/run_tests.sh [pytest args]   (sets up .venv on first use)
set -euo pipefail
# A new test environment also gets the optional packages whose integrations the suite tests
# (wandb, tensorboard, pyarrow, tiktoken); in an environment without them those checks skip.
ML_NEEDS=pytest ML_EXTRAS=${ML_EXTRAS:-dev,wandb,tensorboard,parquet,tiktoken} source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
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
