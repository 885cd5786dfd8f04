import json

from llmpipe.finetune.dataset import prepare
from llmpipe.script import logged

with logged(snakemake.log[0], snakemake.rule):
    summary = prepare(snakemake.params.data, snakemake.output.train, snakemake.output.heldout)
    print(json.dumps(summary, indent=1))
