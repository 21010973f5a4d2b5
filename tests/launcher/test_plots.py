"""The run's pictures, drawn from a recorded run's metrics.jsonl, eval.json and comparison.json."""

import json
import math
import shutil
import struct
from pathlib import Path

from launcher.plots import comparison_figure, draw, training_figure
from launcher.rundir import RunDir

RECORDED = Path(__file__).parent / "data" / "recorded-run"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_draw_writes_both_pictures_of_a_recorded_run(tmp_path):
    shutil.copytree(RECORDED, tmp_path / "run")
    run_dir = RunDir(tmp_path / "run")
    run_dir.write_status("completed")
    written = draw(run_dir)
    assert written == [run_dir.path / "plots" / "training.png", run_dir.path / "plots" / "comparison.png"]
    for path in written:
        width, height = _png_size(path)
        assert 500 <= width <= 1200 and 400 <= height <= 1000 and path.stat().st_size > 20_000


def test_training_figure_has_loss_grad_norm_and_learning_rate_against_step_with_bad_steps_marked():
    metrics = [{"step": s, "loss": 2.0 / s, "grad_norm": 1.0, "learning_rate": 1e-3} for s in range(1, 21)]
    metrics[6]["loss"] = math.nan  # a non-finite step the guard skipped
    fig = training_figure(metrics, {"skipped_steps": [7], "cut_by_time_budget": True, "steps": 20}, "a run")
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == ["training loss", "gradient norm", "learning rate"]
    assert axes[-1].get_xlabel() == "optimizer step"
    loss_line = axes[0].get_lines()[0]
    assert len(loss_line.get_xdata()) == 19  # the NaN step is not drawn as a point...
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["non-finite / skipped step", "time budget ran out"]  # ...but marked, as is the cut
    vertical = [line.get_xdata()[0] for line in axes[0].get_lines()[1:]]
    assert vertical == [7, 20]


def test_comparison_figure_shows_base_and_trained_per_group_with_intervals():
    ev = json.loads((RECORDED / "eval.json").read_text())
    comparison = json.loads((RECORDED / "comparison.json").read_text())
    base = {**ev["base"], "accuracy": 0.25}
    trained = {**ev["trained"], "accuracy": 0.75}
    fig = comparison_figure(comparison, base, trained, "a run")
    ax = fig.get_axes()[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == [f"all items (n={ev['trained']['n']})"] + [
        f"{g.replace('_', ' ')} (n={ev['trained']['groups'][g]['n']})" for g in sorted(ev["trained"]["groups"])]
    heights = [round(p.get_height(), 3) for p in ax.patches]
    assert heights[0] == 0.25 and heights[len(ticks)] == 0.75  # base bars, then trained bars
    assert ax.get_ylabel() == "accuracy (95% Wilson interval)" and "McNemar" in ax.get_title()
    from matplotlib.container import ErrorbarContainer

    assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 2  # 95% intervals on both models' bars
