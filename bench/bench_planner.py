"""Planner speed: `snakemake -n` of the workflow vs a bare Snakefile with the same DAG shape.

    .venv/bin/python bench/bench_planner.py [--models 7] [--quants 7] [--shards 8] [--repeats 3]

A synthetic config (N models as `source: dir` pointing at one tiny random-init HF folder, Q quant
types, S farm shards, both evaluation backends, no fine-tuning) is planned by the real Snakefile
and by a generated bare Snakefile whose rules have the same wildcards, inputs and outputs but
no input functions, no resource callables and no config validation: Snakemake's own floor for a
DAG of that size. Both dry runs are repeated alternately (the machine is shared: compare medians).

Then the no-op rerun: the bare Snakefile builds every output with `touch` (in DAG order, so
every output is newer than its inputs), its metadata is dropped, and the real Snakefile plans
again: it must schedule 0 jobs.

A third Snakefile, the bare one plus `log:`, `benchmark:` and `script:` on every rule (what the
style guide asks of each rule), shows how much of the difference is Snakemake's own handling of
those directives rather than the workflow's logic.

Prints the times, the ratio (goal <= 1.5) and the rerun's job count (goal 0).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import make_tiny_hf, make_workdir, parse_job_stats  # noqa: E402

BIN = Path(sys.executable).parent
QUANT_POOL = ["Q8_0", "Q4_K_M", "Q6_K", "Q5_K_M", "Q4_0", "Q3_K_M", "Q5_0", "Q4_K_S", "Q2_K"]

# The DAG of Snakefile + workflow/rules/*.smk, rule by rule, without any logic. Placeholders
# in <> are filled from the synthetic config.
BARE = r"""
MODELS = <models>
QUANTS = <quants>
REFERENCE = "F16"
SHARDS = <shards>
BACKENDS = {"llama.cpp": [REFERENCE, *QUANTS], "transformers": ["hf"]}
ITEMS = [f"{i}-of-{SHARDS}" for i in range(1, SHARDS + 1)]
PLACEMENTS = [f"results/eval/{m}/placements/{p}.json" for m in MODELS for p in ("cpu-1-thread", "cpu", "2-hosts")]

wildcard_constraints:
    model="|".join(MODELS),
    quant="|".join(QUANTS),
    backend="llama.cpp|transformers",
    variant="|".join([REFERENCE, *QUANTS, "hf"]),
    item="[0-9]+-of-[0-9]+",

EVALS = [f"results/eval/{m}/{v}-{b}.json" for m in MODELS for b, vs in BACKENDS.items() for v in vs]

rule all:
    input:
        [f"results/staged/{m}/stage.json" for m in MODELS],
        [f"results/gguf/{m}/{m}-{v}.{e}" for m in MODELS for v in [REFERENCE, *QUANTS] for e in ("gguf", "json")],
        EVALS,
        [p.replace(".json", ".texts.jsonl") for p in EVALS],
        PLACEMENTS,
        "results/stats/summary.csv",
        "results/stats/summary.md",

rule download:
    output: hf=directory("results/models/{model}/hf"), manifest="results/models/{model}/manifest.json"
    shell: "mkdir -p {output.hf} && touch {output.manifest}"

rule cache_to_shm:
    input: hf="results/models/{model}/hf", manifest="results/models/{model}/manifest.json"
    output: "results/staged/{model}/stage.json"
    shell: "touch {output}"

rule convert_to_gguf:
    input: hf="results/models/{model}/hf", manifest="results/models/{model}/manifest.json", staged="results/staged/{model}/stage.json"
    output: gguf="results/gguf/{model}/{model}-F16.gguf", record="results/gguf/{model}/{model}-F16.json"
    shell: "touch {output}"

rule quantize:
    input: "results/gguf/{model}/{model}-F16.gguf"
    output: gguf="results/gguf/{model}/{model}-{quant}.gguf", record="results/gguf/{model}/{model}-{quant}.json"
    shell: "touch {output}"

rule split_prompts:
    input: "config/prompts.txt"
    output: [f"results/eval/prompts/{i}.json" for i in ITEMS]
    shell: "touch {output}"

rule bandwidth_probe:
    output: "results/eval/bandwidth/probe.json"
    shell: "touch {output}"

rule evaluate_shard_gguf:
    input: gguf="results/gguf/{model}/{model}-{variant}.gguf", record="results/gguf/{model}/{model}-{variant}.json", hf="results/models/{model}/hf", shard="results/eval/prompts/{item}.json", probe="results/eval/bandwidth/probe.json"
    output: "results/eval/{model}/shards/{variant}-llama.cpp/{item}.json"
    shell: "touch {output}"

rule evaluate_shard_hf:
    input: hf="results/models/{model}/hf", manifest="results/models/{model}/manifest.json", staged="results/staged/{model}/stage.json", shard="results/eval/prompts/{item}.json", probe="results/eval/bandwidth/probe.json"
    output: "results/eval/{model}/shards/hf-transformers/{item}.json"
    shell: "touch {output}"

rule evaluate_reference_gguf:
    input: gguf="results/gguf/{model}/{model}-F16.gguf", record="results/gguf/{model}/{model}-F16.json", hf="results/models/{model}/hf", text="config/eval/gpl-3.0.txt"
    output: base="results/eval/{model}/reference-llama.cpp.kld", result="results/eval/{model}/reference-llama.cpp.json"
    shell: "touch {output}"

rule evaluate_reference_hf:
    input: hf="results/models/{model}/hf", manifest="results/models/{model}/manifest.json", staged="results/staged/{model}/stage.json", text="config/eval/gpl-3.0.txt"
    output: base="results/eval/{model}/reference-transformers.kld", result="results/eval/{model}/reference-transformers.json"
    shell: "touch {output}"

rule evaluate_quality:
    input: gguf="results/gguf/{model}/{model}-{quant}.gguf", record="results/gguf/{model}/{model}-{quant}.json", hf="results/models/{model}/hf", base="results/eval/{model}/reference-llama.cpp.kld", reference="results/eval/{model}/reference-llama.cpp.json"
    output: "results/eval/{model}/quality/{quant}-llama.cpp.json"
    shell: "touch {output}"

def quality(wildcards):
    m, v, b = wildcards.model, wildcards.variant, wildcards.backend
    if v in ("F16", "hf"):
        return f"results/eval/{m}/reference-{b}.json"
    return f"results/eval/{m}/quality/{v}-{b}.json"

rule evaluate:
    input: shards=expand("results/eval/{{model}}/shards/{{variant}}-{{backend}}/{item}.json", item=ITEMS), quality=quality
    output: result="results/eval/{model}/{variant}-{backend}.json", texts="results/eval/{model}/{variant}-{backend}.texts.jsonl"
    shell: "touch {output}"

rule evaluate_placement:
    input: gguf="results/gguf/{model}/{model}-F16.gguf"
    output: "results/eval/{model}/placements/{placement}.json"
    shell: "touch {output}"

rule aggregate_stats:
    input: evals=EVALS, placements=PLACEMENTS, records=[f"results/gguf/{m}/{m}-{v}.json" for m in MODELS for v in [REFERENCE, *QUANTS]] + [f"results/models/{m}/manifest.json" for m in MODELS] + [f"results/staged/{m}/stage.json" for m in MODELS]
    output: summary="results/stats/summary.csv", md="results/stats/summary.md", resources="results/stats/resources.csv", plots=directory("results/stats/plots"), provenance="results/stats/provenance.json"
    shell: "mkdir -p {output.plots} && touch {output.summary} {output.md} {output.resources} {output.provenance}"
"""  # noqa: E501


def with_directives(bare: str) -> str:
    """The bare Snakefile plus what every rule of the workflow has by the style guide: a
    `log:`, a `benchmark:` and a `script:` (instead of `shell:`). Still no logic: it measures
    what Snakemake itself spends on those directives."""
    out = []
    for block in re.split(r"(?m)^(?=rule )", bare):
        name = re.match(r"rule (\w+):", block)
        if name and name.group(1) != "all":
            output = re.search(r"(?m)^    output: (.*)$", block).group(1)
            literal = output.lstrip().startswith(("[", "f"))  # an f-string list: no wildcards
            found = [] if literal else re.findall(r"(?<!\{)\{(\w+)\}(?!\})", output)
            wcs = "-".join(dict.fromkeys(found))
            wcs = wcs.replace("-", "}-{").join("{}") if wcs else "all"
            rule = name.group(1)
            block = re.sub(
                r"(?m)^    shell: .*$",
                f'    log: "logs/{rule}/{wcs}.log"\n'
                f'    benchmark: "benchmarks/{rule}/{wcs}.tsv"\n'
                f'    script: "touch.py"',
                block,
            )
        out.append(block)
    return "".join(out)


def snakemake(snakefile: Path, workdir: Path, *args: str) -> tuple[float, str]:
    cmd = [str(BIN / "snakemake"), "-s", str(snakefile), "--directory", str(workdir), *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--models", type=int, default=7)
    parser.add_argument("--quants", type=int, default=7)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    quants = QUANT_POOL[: args.quants]
    scratch = Path(tempfile.mkdtemp(prefix="bench-planner-"))
    try:
        tiny = make_tiny_hf(scratch / "tiny-hf")
        config = yaml_config(args.models, quants, args.shards, tiny)
        real_dir = make_workdir(scratch / "real", config)
        bare_dir = make_workdir(scratch / "bare", config)
        bare = scratch / "Snakefile.bare"
        bare.write_text(
            BARE.replace("<models>", repr([f"m{i}" for i in range(args.models)]))
            .replace("<quants>", repr(quants))
            .replace("<shards>", str(args.shards))
        )
        directives = scratch / "Snakefile.directives"
        directives.write_text(with_directives(bare.read_text()))
        (scratch / "touch.py").write_text("for f in snakemake.output:\n    open(f, 'a').close()\n")
        real_sf = REPO / "Snakefile"
        times: dict[str, list[float]] = {"workflow": [], "bare": [], "bare+directives": []}
        jobs: dict[str, int] = {}
        runs = (
            ("workflow", real_sf, real_dir),
            ("bare", bare, bare_dir),
            ("bare+directives", directives, bare_dir),
        )
        for _ in range(args.repeats):
            for name, sf, wd in runs:
                seconds, out = snakemake(sf, wd, "-n", "--quiet", "rules")
                times[name].append(seconds)
                jobs[name] = sum(parse_job_stats(out).values())
        real_t, bare_t = statistics.median(times["workflow"]), statistics.median(times["bare"])
        print(
            f"synthetic config: {args.models} models x {len(quants)} quant types "
            f"({', '.join(quants)}) x {args.shards} farm shards, backends llama.cpp + "
            f"transformers; median of {args.repeats} dry runs each"
        )
        print(f"{'snakefile':<17}{'jobs':>6}{'snakemake -n (s)':>18}   runs")
        for name in times:
            each = ", ".join(f"{t:.2f}" for t in times[name])
            print(f"{name:<17}{jobs[name]:>6}{statistics.median(times[name]):>18.2f}   {each}")
        print(f"ratio workflow / bare: {real_t / bare_t:.2f} (goal <= 1.5)")
        floor2 = statistics.median(times["bare+directives"])
        print(
            f"ratio workflow / bare+directives (log, benchmark, script per rule): "
            f"{real_t / floor2:.2f}"
        )
        if jobs["workflow"] != jobs["bare"]:
            print(f"note: job counts differ ({jobs['workflow']} vs {jobs['bare']})")

        # No-op rerun: every output made (in DAG order) by the bare Snakefile, metadata dropped.
        snakemake(bare, real_dir, "--cores", "2", "--quiet", "all", "--drop-metadata")
        shutil.rmtree(real_dir / ".snakemake" / "metadata", ignore_errors=True)
        seconds, out = snakemake(real_sf, real_dir, "-n")
        counts = parse_job_stats(out)
        total = sum(counts.values())
        print(f"no-op rerun: {total} jobs planned in {seconds:.2f} s (goal 0)")
        if total:
            print(re.sub(r"\n{3,}", "\n\n", out)[-3000:])
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def yaml_config(n_models: int, quants: list[str], shards: int, tiny: Path) -> dict:
    from helpers import default_config

    config = default_config()
    config["models"] = {f"m{i}": {"source": "dir", "path": str(tiny)} for i in range(n_models)}
    config["quantize"] = {"types": quants}
    config["farm"] = {"shards": shards}
    if "finetune" in config:  # no fine-tuning: the DAG is download .. evaluate, aggregate
        config["finetune"] = {**config["finetune"], "enabled_for": [], "models": {}}
    return config


if __name__ == "__main__":
    main()
