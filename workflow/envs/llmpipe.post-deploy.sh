#!/usr/bin/env bash
# After Snakemake creates the conda environment (--sdm conda): the jobs import the llmpipe
# package, so install it from the checkout Snakemake runs in (its working directory).
set -euo pipefail
if ! grep -qs '^name = "llmpipe"' pyproject.toml; then
    echo "llmpipe.post-deploy.sh: run snakemake --sdm conda from the workflow's checkout" \
        "(no llmpipe pyproject.toml in $PWD)" >&2
    exit 1
fi
python -m pip install --no-deps --disable-pip-version-check -q -e .
