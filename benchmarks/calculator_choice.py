"""Calculator mode or plain mode for a shipped recipe, chosen on a held-out slice of its *training* data.

The test split is never looked at. Two arms, each a real `sftlaunch` run of the recipe (with overrides)
evaluated on the same validation items:
  calculator: data.calculator_annotations=true, eval.calculator=true (the model writes `<<EXPR=`, the
              calculator writes the result)
  plain:      data.calculator_annotations=false, eval.calculator=false
and the calculator arm's adapter again with eval.calculator=false (what the calculator itself adds).

Validation items:
  unit_conversion: questions of training unit pairs and quantities that the recipe's training list never
                   uses (the generator has more than it draws), disjoint from the held-out test questions;
  gsm8k:           the last --val problems of the bundled train.jsonl; the problems before them train.

    .venv/bin/python benchmarks/calculator_choice.py recipes/unit-conversion.yaml
    .venv/bin/python benchmarks/calculator_choice.py recipes/gsm8k.yaml model=embedded:smollm2-135m-instruct \
        --val 200 data.max_samples=400
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.recipe import load_recipe  # noqa: E402
from launcher.stats import mcnemar_exact, wilson_interval  # noqa: E402


def unit_conversion_validation(recipe, folder: Path, n: int) -> list[str]:
    """Overrides that evaluate on n questions of combos the training list never draws (not the test ones)."""
    import random

    from launcher.tasks import unit_conversion as uc

    d = recipe.data
    train, evals = uc.generate(d.train_size, recipe.eval.size, recipe.train.seed, d.target_style)
    seen = {ex.question for ex in train + evals}
    # Every combo in every training phrasing; keep those whose (pair, quantity) never appears in training or test.
    used = {uc._PAIR.match(ex.target).groups() + (ex.target.split()[0],) for ex in train + evals if ex.group != "fact"}
    pool = []
    for dim, i, j, q in uc._combos():
        a, b = uc.UNITS[dim][i][0], uc.UNITS[dim][j][0]
        if (a, b, str(q)) not in used:
            pool.append((dim, i, j, q))
    rng = random.Random(1234)
    rng.shuffle(pool)
    items = []
    for combo in pool[:n]:
        ex = uc._example(*combo, rng.choice(uc.TRAIN_PHRASINGS), "reasoning", "validation")
        assert ex.question not in seen
        items.append([ex.question, ex.reference])
    if len(items) < n:
        raise SystemExit(f"only {len(items)} unused training questions; ask for fewer with --val")
    path = folder / "validation.json"
    path.write_text(json.dumps(items))
    return [f"eval.path={path}", "eval.limit=null"]


def gsm8k_validation(folder: Path, n: int) -> list[str]:
    from launcher.tasks.gsm8k import BUNDLED

    lines = (BUNDLED / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "train.jsonl").write_text("".join(lines[:-n]), encoding="utf-8")
    (folder / "test.jsonl").write_text("".join(lines[-n:]), encoding="utf-8")
    return [f"data.path={folder}", f"eval.limit={n}", "train.max_time=null"]


def run(args: list[str]) -> tuple[Path, float]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, cwd=ROOT)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sftlaunch {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("run directory: "))
    return Path(line.split(": ", 1)[1].strip()), seconds


def predictions(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]


def row(name: str, preds: list[dict], seconds: float | None = None) -> str:
    n, right = len(preds), sum(p["correct"] for p in preds)
    lo, hi = wilson_interval(right, n)
    kinds = {}
    for p in preds:
        if p.get("error_kind") not in (None, "correct"):
            kinds[p["error_kind"]] = kinds.get(p["error_kind"], 0) + 1
    took = f"  {seconds:.0f} s" if seconds is not None else ""
    return f"{name:<34} accuracy {right / n:.3f} [{lo:.3f}, {hi:.3f}]  (n={n}){took}  {kinds or ''}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--val", type=int, default=150, help="validation items")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "calculator-choice"))
    args = ap.parse_args()

    recipe = load_recipe(args.recipe, args.overrides)
    folder = Path(tempfile.mkdtemp(prefix="calculator-choice-"))
    if recipe.data.task == "unit_conversion":
        validation = unit_conversion_validation(recipe, folder, args.val)
    elif recipe.data.task == "gsm8k":
        validation = gsm8k_validation(folder, args.val)
    else:
        raise SystemExit(f"data.task={recipe.data.task}: only unit_conversion and gsm8k have calculator annotations")
    common = [args.recipe, *args.overrides, *validation, "eval.compare_base=false", f"output.dir={args.out}"]
    arms = {"calculator": ["data.calculator_annotations=true", "eval.calculator=true", "output.name=calculator"],
            "plain": ["data.calculator_annotations=false", "eval.calculator=false", "output.name=plain"]}
    results = {}
    for name, extra in arms.items():
        run_dir, seconds = run([*common, *extra])
        results[name] = predictions(run_dir)
        print(row(f"{name} (trained and decoded)", results[name], seconds), f"[{run_dir}]", flush=True)
        if name == "calculator":
            out = folder / "no-calculator.jsonl"
            # The run's own recipe.yaml holds the validation items (eval.path / data.path), so eval reads them.
            subprocess.run([sys.executable, "-m", "launcher.cli", "eval", str(run_dir), "eval.calculator=false",
                            "--predictions", str(out)], cwd=ROOT, capture_output=True, check=True)
            results["calculator arm, plain decoding"] = [json.loads(x) for x in out.read_text().splitlines()]
            print(row("calculator arm, plain decoding", results["calculator arm, plain decoding"]), flush=True)
    a, b = results["calculator"], results["plain"]
    only_a = sum(x["correct"] and not y["correct"] for x, y in zip(a, b))
    only_b = sum(y["correct"] and not x["correct"] for x, y in zip(a, b))
    print(f"calculator right only: {only_a}, plain right only: {only_b}, McNemar p = {mcnemar_exact(only_a, only_b):.3g}")
    print("choice:", "calculator" if only_a > only_b else "plain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
