"""Worker entry point: `python -m launcher.worker RUN_DIR`. Reads plan.json, trains, evaluates."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from launcher.errors import SftlaunchError
from launcher.plan import Plan
from launcher.rundir import library_versions, write_status


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0])
    plan = Plan.model_validate_json((run_dir / "plan.json").read_text())
    (run_dir / "versions.json").write_text(json.dumps(library_versions(), indent=2))
    write_status(run_dir, "running")
    from launcher.train import train_and_evaluate

    try:
        results = train_and_evaluate(plan, run_dir)
    except SftlaunchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        write_status(run_dir, "failed", error=str(exc))
        return exc.exit_code
    except BaseException as exc:
        write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise
    write_status(run_dir, "completed", base=results.get("base"), trained=results["trained"], train=results["train"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
