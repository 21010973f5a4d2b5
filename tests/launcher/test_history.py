"""`sftlaunch runs`: one line per run directory, newest first, whatever state each run is in."""

import json

from launcher.history import format_table, list_runs
from launcher.rundir import RunDir
from tests.conftest import run_cli


def _fake_run(folder, name, plan_json, status, started, updated, **files):
    rd = RunDir(folder / name)
    rd.path.mkdir(parents=True)
    rd.file(RunDir.PLAN).write_text(plan_json)
    rd.file(RunDir.STATUS).write_text(json.dumps({**status, "started": started, "updated": updated, "recipe": "recipes/x.yaml"}))
    for fname, content in files.items():
        rd.file(fname.replace("_", ".")).write_text(content)
    return rd


def test_runs_lists_completed_failed_and_interrupted_runs_newest_first(tmp_path):
    from launcher.hardware import HardwareInfo
    from launcher.plan import make_plan
    from launcher.recipe import validate_recipe

    plan = make_plan(validate_recipe({"model": {"name": "some/model"}}), HardwareInfo(cpu_cores=2, ram_gb=8, cpu_bf16=False))
    pj = plan.model_dump_json()
    metrics = "".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3))
    _fake_run(tmp_path, "done", pj, {"status": "completed"}, "2026-01-01T10:00:00+00:00", "2026-01-01T10:05:30+00:00",
              eval_json=json.dumps({"train": {"steps": 30, "final_loss": 0.25}, "base": {"accuracy": 0.1},
                                    "trained": {"accuracy": 0.6},
                                    "phases": {"training": {"seconds": 300, "predicted_seconds": 200, "peak_memory_gib": 3.0,
                                                            "predicted_memory_gib": 2.5},
                                               "final_eval": {"seconds": 30, "predicted_seconds": 40, "peak_memory_gib": 1.0,
                                                              "predicted_memory_gib": 1.2},
                                               "saving": {"seconds": 1, "peak_memory_gib": 2.0}}}))
    _fake_run(tmp_path, "broken", pj, {"status": "failed", "diverged": True}, "2026-01-02T10:00:00+00:00",
              "2026-01-02T10:00:40+00:00", metrics_jsonl=metrics)
    _fake_run(tmp_path, "stopped", pj, {"status": "interrupted", "phase": "training"}, "2026-01-03T10:00:00+00:00",
              "2026-01-03T12:00:00+00:00", metrics_jsonl=metrics)
    (tmp_path / "not-a-run").mkdir()

    rows = list_runs(tmp_path)
    assert [r["name"] for r in rows] == ["stopped", "broken", "done"]
    done = rows[2]
    assert (done["status"], done["steps"], done["final_loss"], done["base_accuracy"], done["trained_accuracy"], done["seconds"]) == \
        ("completed", 30, 0.25, 0.1, 0.6, 330)
    assert (rows[0]["steps"], rows[0]["final_loss"]) == (3, 2.0 / 3)  # from metrics.jsonl: no eval.json yet
    assert {r["backend"] for r in rows} == {"cpu"} and {r["model"] for r in rows} == {"some/model"}

    table = format_table(rows).splitlines()
    assert table[0].split() == ["name", "status", "recipe", "model", "backend", "precision", "steps", "final", "loss",
                                "accuracy", "duration", "job", "time", "vs", "plan", "memory", "vs", "plan"]
    assert "interrupted (training)" in table[1] and "2h00m" in table[1]
    assert "0.100 -> 0.600" in table[3] and "5m30s" in table[3] and "x.yaml" in table[3]
    # Measured against predicted: (300 + 30) s of (200 + 40) s predicted; the highest peak, 3.0 GiB, of 2.5 predicted.
    assert (done["time_vs_plan"], done["memory_vs_plan"]) == (1.38, 1.2)
    assert table[3].split()[-2:] == ["1.38x", "1.20x"] and table[1].split()[-2:] == ["-", "-"]

    as_json = run_cli("runs", str(tmp_path), "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert [r["name"] for r in json.loads(as_json.stdout)] == ["stopped", "broken", "done"]
    missing = run_cli("runs", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "Fix:" in missing.stderr  # a user mistake (exit 2), not a bug (1)


def test_runs_lists_the_good_runs_when_one_runs_files_were_cut_short_or_edited(tmp_path):
    from launcher.hardware import HardwareInfo
    from launcher.plan import make_plan
    from launcher.recipe import validate_recipe

    pj = make_plan(validate_recipe({"model": {"name": "some/model"}}), HardwareInfo(cpu_cores=2, ram_gb=8, cpu_bf16=False)).model_dump_json()
    good = "".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3))
    _fake_run(tmp_path, "good", pj, {"status": "completed"}, "2026-01-01T10:00:00+00:00", "2026-01-01T10:05:30+00:00",
              eval_json=json.dumps({"train": {"steps": 3, "final_loss": 0.5}, "trained": {"accuracy": 0.6}}))
    # A field of the wrong type (TypeError lost the whole listing), and a metrics line cut short by a kill -9.
    _fake_run(tmp_path, "edited", pj, {"status": "completed"}, "2026-01-02T10:00:00+00:00", "2026-01-02T10:00:40+00:00",
              eval_json=json.dumps({"train": ["not", "a", "dict"], "trained": {"accuracy": "high"}}))
    _fake_run(tmp_path, "cut", pj, {"status": "interrupted", "phase": "training"}, "2026-01-03T10:00:00+00:00",
              "2026-01-03T10:10:00+00:00", metrics_jsonl=good + '{"step": 4, "lo')
    result = run_cli("runs", str(tmp_path))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(lines) == {"good", "edited", "cut"}
    assert "unreadable" in lines["edited"] and "0.5000" in lines["good"]
    rows = {r["name"]: r for r in list_runs(tmp_path)}
    assert rows["cut"]["steps"] == 3  # the readable steps are still the run's


def test_plot_skips_a_metrics_line_cut_short_and_says_so(tmp_path):
    from launcher.hardware import HardwareInfo
    from launcher.plan import make_plan
    from launcher.recipe import validate_recipe

    pj = make_plan(validate_recipe({"model": {"name": "some/model"}}), HardwareInfo(cpu_cores=2, ram_gb=8, cpu_bf16=False)).model_dump_json()
    metrics = "".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo'
    rd = _fake_run(tmp_path, "cut", pj, {"status": "interrupted"}, "2026-01-03T10:00:00+00:00", "2026-01-03T10:10:00+00:00",
                   metrics_jsonl=metrics)
    before = rd.metrics.read_bytes()
    result = run_cli("plot", str(rd.path))
    assert result.returncode == 0, result.stderr
    assert "1 line(s) of" in result.stdout and rd.training_plot.stat().st_size > 1000
    assert rd.metrics.read_bytes() == before
