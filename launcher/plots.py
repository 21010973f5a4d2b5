"""Pictures of a run: plots/training.png (loss, gradient norm, learning rate per step) and
plots/comparison.png (base vs trained accuracy with 95% intervals), drawn from the run directory's files.

matplotlib with the Agg backend (no display needed); drawn at the end of every run and by `sftlaunch plot`.
"""

from __future__ import annotations

import math
from pathlib import Path

from launcher.rundir import RunDir
from launcher.stats import wilson_interval

SERIES = (("loss", "training loss"), ("grad_norm", "gradient norm"), ("learning_rate", "learning rate"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on servers and in containers without a display
    import matplotlib.pyplot as plt

    return plt


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def training_figure(metrics: list[dict], train: dict | None, title: str):
    """Three panels sharing the step axis; skipped (non-finite) steps and the time-budget cut marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True, constrained_layout=True)
    train = train or {}
    skipped = [s["step"] if isinstance(s, dict) else s for s in train.get("skipped_steps") or []]
    for ax, (key, label) in zip(axes, SERIES):
        rows = [r for r in metrics if key in r and "step" in r]
        good = [(r["step"], r[key]) for r in rows if _finite(r[key])]
        bad = [r["step"] for r in rows if not _finite(r[key])]
        if good:
            ax.plot(*zip(*good), color="tab:blue", linewidth=1.2, marker="." if len(good) < 60 else None)
        for i, step in enumerate(sorted(set(bad) | set(skipped))):
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1,
                       label="non-finite / skipped step" if i == 0 else None)
        if train.get("cut_by_time_budget") and train.get("steps"):
            ax.axvline(train["steps"], color="tab:orange", linestyle="--", linewidth=1.2, label="time budget ran out")
        if key == "loss" and good and min(v for _, v in good) > 0 and max(v for _, v in good) / min(v for _, v in good) > 50:
            ax.set_yscale("log")  # a loss that falls by orders of magnitude stays readable
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if not good:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title(title, fontsize=10)
    return fig


def comparison_figure(comparison: dict, base: dict, trained: dict, title: str):
    """Accuracy of base and trained, overall and per group, with Wilson 95% intervals and the McNemar p."""
    plt = _pyplot()
    labels, pairs = [f"all items (n={trained.get('n', '?')})"], [(base, trained)]
    for group in sorted(trained.get("groups", {})):
        if group in base.get("groups", {}):
            labels.append(f"{group.replace('_', ' ')} (n={trained['groups'][group].get('n', '?')})")
            pairs.append((base["groups"][group], trained["groups"][group]))
    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(labels) + 1.5), 4.5), constrained_layout=True)
    width = 0.36
    for offset, (name, color, pick) in enumerate((("base", "tab:gray", 0), ("trained", "tab:blue", 1))):
        xs, heights, errors = [], [], [[], []]
        for i, pair in enumerate(pairs):
            m = pair[pick]
            n = m.get("n", 0)
            acc = m.get("accuracy", 0.0)
            lo, hi = wilson_interval(round(acc * n), n)
            xs.append(i + (offset - 0.5) * width)
            heights.append(acc)
            errors[0].append(max(0.0, acc - lo))
            errors[1].append(max(0.0, hi - acc))
        bars = ax.bar(xs, heights, width, yerr=errors, capsize=4, color=color, label=name)
        ax.bar_label(bars, labels=[f"{h:.3f}" for h in heights], padding=2, fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.set_ylim(0, 1.08)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    p = comparison.get("mcnemar_p_value")
    verdict = f"McNemar exact test: {comparison.get('verdict', f'p = {p:.3g}')}" if p is not None else ""
    ax.set_title(f"{title}\n{verdict}", fontsize=10)
    return fig


def draw(run_dir: RunDir) -> list[Path]:
    """Draw what the run directory has data for; returns the files written (plots/ in the run directory)."""
    plt = _pyplot()
    run_dir.plots.mkdir(exist_ok=True)
    status = run_dir.status()
    results = run_dir.read_eval() or {}
    train = results.get("train") or status.get("train")
    name = run_dir.path.name
    model = (results.get("model") or "").split("/")[-1]
    written = []
    metrics, unreadable = run_dir.read_metrics_counted()
    if unreadable:
        print(f"note: {unreadable} line(s) of {run_dir.metrics} could not be read (cut short or edited) and are not drawn",
              flush=True)
    metrics = [r for r in metrics if isinstance(r.get("loss", 0.0), (int, float))]
    if metrics:
        fig = training_figure(metrics, train, f"{name}  ({model})  status: {status.get('status', '?')}")
        fig.savefig(run_dir.training_plot, dpi=110)
        plt.close(fig)
        written.append(run_dir.training_plot)
    comparison = run_dir.read_comparison()
    # A chat run without eval.metrics generates nothing: its comparison is the held-out loss, in the table.
    if comparison and results.get("base") and "accuracy" in (results.get("trained") or {}):
        fig = comparison_figure(comparison, results["base"], results["trained"], f"{name}  ({model})")
        fig.savefig(run_dir.comparison_plot, dpi=110)
        plt.close(fig)
        written.append(run_dir.comparison_plot)
    return written
