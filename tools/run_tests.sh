#!/usr/bin/env bash
# The test suite (called by `make test` after setup): tests/unit, tests/slurm, tests/workflow
# (pyproject.toml's testpaths). On a machine where we are root and apt works (CI), the Slurm
# packages are installed first so that tests/slurm run against a real local cluster, which the
# session starts for them only; elsewhere those tests skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    tools/slurm/install.sh
fi
# On CI the Slurm tests must run: a cluster that cannot start is a failure, not a skip.
if [ "${CI:-}" = true ]; then
    export LLMPIPE_REQUIRE_SLURM=1
fi
exec python -m pytest "$@"
