#!/usr/bin/env bash
# The test suite (called by `make test` after setup). On a machine where we are root and apt
# works (CI), the Slurm packages are installed first so that the Slurm tests run against a real
# local cluster the session starts; elsewhere those tests skip and say why.
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
