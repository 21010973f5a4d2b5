"""LoRA settings for recipes/gsm8k.yaml, chosen on a held-out slice of the GSM8K *training* split.

The test split is never looked at here: the last --val problems of the bundled train.jsonl become the
validation items, the problems before them the training pool. Each configuration is a real
`sftlaunch` run (the recipe with overrides) on the embedded SmolLM2-135M-Instruct; the base model is
evaluated once, in the first run. Prints one row per configuration: validation accuracy with its 95%
Wilson interval, answer rate, first and last logged training loss, and wall time.

    .venv/bin/python benchmarks/gsm8k_sweep.py --samples 400 --val 200 --batch 16 --lr 3e-4 1e-3 3e-3
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

from launcher.stats import wilson_interval  # noqa: E402
from launcher.tasks.gsm8k import BUNDLED  # noqa: E402


def split_train(folder: Path, val: int) -> None:
    lines = (BUNDLED / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(lines[:-val]), encoding="utf-8")
    (folder / "test.jsonl").write_text("".join(lines[-val:]), encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400, help="training samples per run (1 epoch)")
    ap.add_argument("--val", type=int, default=200, help="held-out training problems to evaluate on")
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--rank", type=int, nargs="+", default=[16])
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--batch", type=int, default=16, help="train.effective_batch_size")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "gsm8k-sweep"))
    args = ap.parse_args()

    data = Path(tempfile.mkdtemp(prefix="gsm8k-val-"))
    split_train(data, args.val)
    rows, first = [], True
    for rank in args.rank:
        for lr in args.lr:
            name = f"r{rank}-lr{lr:g}"
            overrides = [
                "model=embedded:smollm2-135m-instruct", f"data.path={data}", f"data.max_samples={args.samples}",
                f"train.epochs={args.epochs}", f"train.effective_batch_size={args.batch}", f"train.learning_rate={lr}", f"model.lora.rank={rank}",
                f"model.lora.alpha={2 * rank}", f"eval.limit={args.val}", f"eval.max_new_tokens={args.max_new_tokens}",
                f"eval.compare_base={'true' if first else 'false'}", "train.max_time=null",
                f"output.dir={args.out}", f"output.name={name}", "train.logging_steps=1",
            ]
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "launcher.cli", str(ROOT / "recipes" / "gsm8k.yaml"), *overrides],
                                  capture_output=True, text=True, cwd=ROOT)
            seconds = time.time() - t0
            run_dirs = sorted(Path(args.out).glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
            if proc.returncode != 0 or not run_dirs:
                print(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}", flush=True)
                rows.append((name, None))
                continue
            run_dir = run_dirs[-1]
            ev = json.loads((run_dir / "eval.json").read_text())
            losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(line)]
            if first and "base" in ev:
                b = ev["base"]
                lo, hi = wilson_interval(round(b["accuracy"] * b["n"]), b["n"])
                print(f"base: accuracy {b['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] answer_rate {b['answer_rate']:.3f} (n={b['n']})", flush=True)
            first = False
            t = ev["trained"]
            lo, hi = wilson_interval(round(t["accuracy"] * t["n"]), t["n"])
            row = (f"{name}: accuracy {t['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] answer_rate {t['answer_rate']:.3f} "
                   f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (min {min(losses):.3f}) steps {ev['train']['steps']} "
                   f"{seconds:.0f} s  [{run_dir}]")
            print(row, flush=True)
            rows.append((name, row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
