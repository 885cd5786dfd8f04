"""The report's pictures (PNG, matplotlib): quality loss vs size, tokens/s per variant, roofline
%, predicted vs measured memory per job, and the fine-tune loss curve of each tuned model.
matplotlib is imported inside the functions: the rest of the report does not need it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llmpipe import atomic
from llmpipe.report.collect import number
from llmpipe.report.tables import MIB, records


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return str(path)


def _plain_log_ticks(ax) -> None:
    """Log axis labelled 20, 50, 100 rather than 2 x 10^1."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this run", ha="center", va="center", transform=ax.transAxes)


def plot_quality_vs_size(summary: pd.DataFrame, path: Path) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "ppl_ratio", "PPL ratio (variant / reference)"),
        (axes[1], "kld_mean", "KL-divergence, mean (nats)"),
    ):
        drawn = False
        n_label = 0
        points = summary.dropna(subset=["size_bytes", key])
        points = points[points["size_bytes"] > 0]
        for (model, backend), part in points.groupby(["model", "backend"], sort=False):
            part = part.assign(mib=part["size_bytes"].astype(float) / MIB).sort_values("mib")
            marker = "o-" if backend == "llama.cpp" else "s--"
            ax.plot(part["mib"], part[key].astype(float), marker, label=f"{model} {backend}")
            for r in records(part):
                offset = (4, 4) if n_label % 2 == 0 else (4, -11)  # neighbours do not overlap
                ax.annotate(
                    r["variant"], (r["mib"], r[key]), textcoords="offset points", xytext=offset,
                    fontsize=7,
                )  # fmt: skip
                n_label += 1
            drawn = True
        if not drawn:
            _no_data(ax, key)
        ax.set_xlabel("model size (MiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    fig.suptitle("Quality loss vs size")
    return _save(fig, path)


def _bar_labels(summary: pd.DataFrame) -> list[str]:
    multi = summary["model"].nunique() > 1
    return [
        (f"{r['model']}\n" if multi else "") + f"{r['variant']}\n{r['backend']}"
        for r in records(summary)
    ]


def _values(table: pd.DataFrame, key: str) -> list[float]:
    """A column as floats, 0 where a value is missing (a bar of no height)."""
    return [number(v) or 0.0 for v in table[key].astype(object)]


def plot_tokens_per_s(summary: pd.DataFrame, path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(summary) + 2), 4.2))
    xs = list(range(len(summary)))
    width = 0.27
    bars = (
        ("prefill_tok_s", "prefill tok/s"),
        ("decode_tok_s_aggregate", "decode tok/s, aggregate (all sequences together)"),
        ("decode_tok_s_per_sequence", "decode tok/s, per sequence (one prompt's stream)"),
    )
    for k, (key, label) in enumerate(bars):
        ax.bar([x + (k - 1) * width for x in xs], _values(summary, key), width, label=label)
    ax.set_xticks(xs, _bar_labels(summary), fontsize=7)
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_ylabel("tokens / s (log scale)")
    ax.set_title("Speed per variant and backend")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if summary.empty:
        _no_data(ax, "evaluations")
    return _save(fig, path)


def plot_roofline(summary: pd.DataFrame, path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(summary) + 2), 4.2))
    xs = list(range(len(summary)))
    bars = ax.bar(xs, _values(summary, "roofline_pct"), color="tab:green")
    for bar, r in zip(bars, records(summary), strict=True):
        gbs = number(r["achieved_gb_s"])
        if gbs is not None:
            ax.annotate(
                f"{gbs:.1f} GB/s",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(xs, _bar_labels(summary), fontsize=7)
    ax.set_ylabel("decode bandwidth, % of the device's peak")
    ax.set_title("Roofline: achieved / peak memory bandwidth during decode")
    ax.grid(axis="y", alpha=0.3)
    if summary.empty:
        _no_data(ax, "evaluations")
    return _save(fig, path)


def plot_resources(resources: pd.DataFrame, path: Path) -> str:
    plt = _pyplot()
    measured = resources["measured_peak_mem_mb"].fillna(0)
    rows = resources[measured > 0]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows) + 2), 4.2))
    xs = list(range(len(rows)))
    width = 0.4
    predicted, peak = _values(rows, "predicted_as_run_mb"), _values(rows, "measured_peak_mem_mb")
    ax.bar([x - width / 2 for x in xs], predicted, width, label="predicted peak")
    ax.bar([x + width / 2 for x in xs], peak, width, label="measured peak")
    for x, r, top in zip(xs, records(rows), map(max, predicted, peak), strict=True):
        value = number(r["mem_ratio"])
        if value is not None:
            ax.annotate(f"x{value:.2f}", (x, top), ha="center", va="bottom", fontsize=7)
    labels = [f"{r['rule']}\n{r['model']} {r['target'] or ''}".strip() for r in records(rows)]
    ax.set_xticks(xs, labels, fontsize=7, rotation=30, ha="right")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_ylabel("MiB, log scale (RAM-disk bytes included)")
    ax.set_title("Memory per job: estimator vs measurement (predicted / measured above)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if rows.empty:
        _no_data(ax, "resource records")
    return _save(fig, path)


def plot_loss(
    model: str, xkey: str, series: dict[str, list[tuple[float, float]]], path: Path
) -> str | None:
    """The loss curves of one fine-tune (``collect.read_loss_csv``); None without points."""
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None,
                label=name)  # fmt: skip
    ax.set_xlabel(xkey)
    ax.set_ylabel("loss")
    ax.set_title(f"Fine-tuning loss: {model}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
