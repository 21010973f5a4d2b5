"""Worker entry point: `python -m launcher.worker RUN_DIR [--resume]`. Reads plan.json, trains, evaluates."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from launcher.errors import SftlaunchError
from launcher.health import TrainingHealthError
from launcher.plan import Plan
from launcher.rundir import library_versions, write_status


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0])
    resume = "--resume" in argv[1:]
    plan = Plan.model_validate_json((run_dir / "plan.json").read_text())
    (run_dir / "versions.json").write_text(json.dumps(library_versions(), indent=2))
    write_status(run_dir, "running", resumed=resume, worker_pid=os.getpid())
    from launcher.train import Interrupted, train_and_evaluate

    try:
        results = train_and_evaluate(plan, run_dir, resume=resume)
    except TrainingHealthError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        write_status(run_dir, "failed", error=str(exc), health=exc.details)
        return exc.exit_code
    except SftlaunchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        write_status(run_dir, "failed", error=str(exc))
        return exc.exit_code
    except Interrupted as exc:
        print(f"stopped at step {exc.step} with a checkpoint; continue with: sftlaunch resume {run_dir}", flush=True)
        write_status(run_dir, "interrupted", step=exc.step, signal=exc.signum)
        return 128 + exc.signum
    except BaseException as exc:
        write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise
    write_status(run_dir, "completed", base=results.get("base"), trained=results["trained"], train=results["train"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
