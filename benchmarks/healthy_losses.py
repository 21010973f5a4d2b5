"""Collect per-step training losses of healthy runs into tests/launcher/data/healthy_losses.json.

The divergence rule (launcher/health.py: LossWatch) is tested against these curves: a rule that trips on
any of them would stop a healthy run. Each run must have been made with train.logging_steps=1.

    .venv/bin/python benchmarks/healthy_losses.py NAME=RUN_DIR [NAME=RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "launcher" / "data" / "healthy_losses.json"


def curve(run_dir: Path) -> dict:
    plan = json.loads((run_dir / "plan.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    steps = [r["step"] for r in records if "loss" in r]
    if steps != list(range(1, len(steps) + 1)):
        raise SystemExit(f"{run_dir}: not every step was logged (train.logging_steps must be 1)")
    config = json.loads((Path(plan["recipe"]["model"]["name"]) / "config.json").read_text()) \
        if Path(plan["recipe"]["model"]["name"]).is_dir() else None
    vocab = config["vocab_size"] if config else 49152  # embedded SmolLM2-135M-Instruct
    r = plan["recipe"]
    return {"vocab_size": vocab, "losses": [round(x, 4) for x in losses],
            "settings": {"model": r["model"]["name"], "task": r["data"]["task"], "learning_rate": r["train"]["learning_rate"],
                         "lora_rank": r["model"]["lora"]["rank"], "effective_batch_size": r["train"]["effective_batch_size"],
                         "precision": plan["precision"]}}


def main(args: list[str]) -> int:
    data = json.loads(OUT.read_text()) if OUT.exists() else {"about": __doc__.strip().splitlines()[0], "curves": {}}
    for item in args:
        name, _, path = item.partition("=")
        data["curves"][name] = curve(Path(path))
        print(f"{name}: {len(data['curves'][name]['losses'])} steps, min {min(data['curves'][name]['losses']):.3f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
