"""A finished run's trained model evaluated with and without the calculator on its own evaluation items (the
same path as `sftlaunch eval RUN_DIR eval.calculator=...`), one after the other in one process: seconds of
each evaluation and their ratio, accuracy, error kinds, and how many answers the calculator changed.

This reports what the calculator does for a model trained with annotations; it chooses nothing (settings are
chosen on training data: benchmarks/calculator_choice.py).

    .venv/bin/python benchmarks/eval_calculator.py RUN_DIR [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--limit", type=int, default=None, help="first N evaluation items (default: the run's)")
    args = ap.parse_args()

    from launcher.eval_target import EvalRequest, run_eval

    out, records = {}, {}
    folder = Path(tempfile.mkdtemp(prefix="eval-calculator-"))
    for on in (True, False):
        path = folder / f"calculator-{on}.jsonl"
        out[on] = run_eval(EvalRequest(args.run_dir, (f"eval.calculator={str(on).lower()}",), limit=args.limit,
                                       predictions=str(path)))["result"]
        records[on] = [json.loads(line) for line in path.read_text().splitlines()]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    n = out[True]["n"]
    print(f"{args.run_dir}: {n} items, CPU {cpu}")
    for on in (True, False):
        r = out[on]
        extra = f", calculator wrote {r['calculator_calls']} results in {r['rows_with_calculator']} answers" if on else ""
        print(f"calculator {'on ' if on else 'off'}: accuracy {r['accuracy']:.3f}  {r['seconds']:.1f} s  "
              f"error kinds {r.get('error_kinds')}{extra}")
    changed = sum(a["parsed"] != b["parsed"] for a, b in zip(records[True], records[False]))
    fixed = sum(a["correct"] and not b["correct"] for a, b in zip(records[True], records[False]))
    broke = sum(b["correct"] and not a["correct"] for a, b in zip(records[True], records[False]))
    print(f"time with/without: {out[True]['seconds'] / out[False]['seconds']:.2f}x   answers changed by the calculator: "
          f"{changed}/{n} (right only with it: {fixed}, right only without: {broke})")


if __name__ == "__main__":
    main()
