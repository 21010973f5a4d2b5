"""The plan's predicted time and memory per phase against what real runs measure, on this machine.

Runs short real runs of the shipped recipes with the embedded SmolLM2-135M (LoRA with and without gradient
checkpointing, fp32 and the plan's precision, a small micro-batch, full fine-tuning, DeepSpeed over gloo, GSM8K's
long samples, a chat file of the user's own conversations), each through `sftlaunch run` as a user would, then prints per case and phase: predicted and
measured seconds and their ratio, predicted and measured peak memory and theirs (run.json's "phases").

--fit: least squares of the CPU constants in launcher/timing.py (elementwise operations per activation element in
half precision and in fp32, per attention score, per trainable weight in the optimizer; seconds per decoding step;
the products' efficiency and the cost per micro-batch held) over the training and evaluation phases measured, and a
leave-out check: fitted without GSM8K, how far GSM8K lands (samples twice as long as unit conversion's: attention's
share of a step grows with the length).

Name the CPU beside the numbers (the script prints it). Run it alone on the machine: other processes on the
cores make every measured time longer, and the probe's rate with them.

    .venv/bin/python benchmarks/time_estimate.py [--cases a,b] [--fit] [--keep DIR] [--save results.json]
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

EMBEDDED = "model.name=embedded:smollm2-135m-instruct"
UNIT = ["recipes/unit-conversion.yaml", "train.max_steps=12", "eval.limit=48", "train.save_steps=1000"]
CASES = {
    "lora": UNIT,
    "lora-checkpointing": [*UNIT, "hardware.gradient_checkpointing=true"],
    "lora-micro4": [*UNIT, "hardware.micro_batch_size=4"],
    "lora-fp32": [*UNIT, "hardware.precision=fp32"],
    "lora-fp32-checkpointing": [*UNIT, "hardware.precision=fp32", "hardware.gradient_checkpointing=true"],
    "full": [*UNIT, "model.method=full", "train.learning_rate=2e-5", "train.max_steps=8"],
    "deepspeed": [*UNIT, "hardware.backend=deepspeed", "train.max_steps=8", "eval.limit=24"],
    "gsm8k": ["recipes/gsm8k.yaml", EMBEDDED, "train.max_steps=16", "eval.limit=16", "data.max_samples=400",
              "train.save_steps=1000"],
    # The user's own conversations (data.task: chat): the chat template's tokens, answers at the last assistant turn.
    "chat": ["recipes/chat.yaml", "train.max_steps=8", "eval.limit=32", "train.save_steps=1000"],
}
PHASES = ("loading", "base_eval", "training", "final_eval")


def cpu_name() -> str:
    from launcher.hardware import _cpu_flags, _cpu_model

    flags = _cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    return f"{_cpu_model()} ({', '.join(sorted(flags)) or 'no AVX2'})"


def run_case(name: str, args: list[str], out: Path) -> dict:
    from launcher.memory import find_shape
    from launcher.plan import Plan
    from launcher.timing import predict_for_plan

    folder = out / name
    cmd = [str(ROOT / ".venv" / "bin" / "sftlaunch"), "run", *args, f"output.dir={folder}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    runs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if proc.returncode != 0 or not runs:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    run = runs[-1]
    plan = Plan.model_validate_json((run / "plan.json").read_text())
    status = json.loads((run / "run.json").read_text())
    shape = find_shape(plan.recipe.model.name)[0]
    prediction = predict_for_plan(plan, shape)
    return {"case": name, "cpu": cpu_name(), "wall_s": round(wall, 1), "phases": status["phases"], "parts": prediction.parts,
            "predicted": prediction.seconds(), "precision": plan.precision, "backend": plan.backend,
            "tokens_seen": _tokens_seen(run)}


def _tokens_seen(run: Path) -> int | None:
    seen = [json.loads(line).get("num_input_tokens_seen") for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seen = [s for s in seen if s]
    return seen[-1] if seen else None


def table(results: list[dict]) -> str:
    # start GiB: the resident set when the phase began (what earlier phases left), inside its peak.
    lines = [f"{'case':<24} {'phase':<11} {'pred s':>7} {'actual s':>8} {'ratio':>6} {'pred GiB':>8} {'peak GiB':>8} {'ratio':>6}"
             f" {'start GiB':>9}"]
    for r in results:
        for phase in PHASES:
            p = r["phases"].get(phase)
            if not p:
                continue
            lines.append(f"{r['case']:<24} {phase:<11} {p.get('predicted_seconds', float('nan')):>7.1f} {p['seconds']:>8.1f} "
                         f"{p.get('time_ratio', float('nan')):>6.2f} {p.get('predicted_memory_gib', float('nan')):>8.2f} "
                         f"{p.get('peak_memory_gib', float('nan')):>8.2f} {p.get('memory_ratio', float('nan')):>6.2f}"
                         f" {p.get('start_memory_gib', float('nan')):>9.2f}")
    return "\n".join(lines)


# The CPU constants the fit weighs, each the coefficient of a part of the prediction (launcher.timing's
# TimePrediction.parts): the elementwise operations per activation element in half precision and in fp32 (a run's
# part goes to its precision's column), per attention score and per trainable weight in the optimizer. The products'
# efficiency and the cost per micro-batch are held at launcher.timing's values and subtracted: fitted with the rest,
# the efficiency came out at 1.6 on the AMX Xeon, which its fp32 products (measured flat at the probe's rate for
# every shape) cannot reach, and 8 cases do not separate 6 constants.
FITTED = ("elementwise_half", "elementwise_fp32", "attention_ops_per_score", "optimizer_ops_per_param")


def _columns(r: dict) -> list[float]:
    p, half = r["parts"], r["precision"] in ("bf16", "fp16")
    return [p["elementwise_pass_s"] if half else 0.0, 0.0 if half else p["elementwise_pass_s"], p["attention_score_s"],
            p["optimizer_unit_s"]]


def _held(r: dict, constants: dict) -> float:
    p = r["parts"]
    return (p["matmul_full_rate_s"] / constants["matmul_efficiency"] + p["micro_batches"] * constants["micro_batch_seconds"]
            + p["comm_s"] + p["start_s"])


def fit(results: list[dict], exclude=lambda r: False) -> dict:
    """Least squares of FITTED, constrained to positive constants by dropping a term that comes out negative."""
    import numpy as np

    from launcher.timing import CPU

    rows = [r for r in results if not exclude(r)]
    x = np.array([_columns(r) for r in rows], dtype=float)
    y = np.array([r["phases"]["training"]["seconds"] - _held(r, CPU) for r in rows], dtype=float)
    keep = [k for k in range(len(FITTED)) if x[:, k].any()]  # a column no case has (fp32 left out) is not fitted
    while True:
        coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    fitted = dict.fromkeys(FITTED, 0.0)
    fitted.update({FITTED[k]: float(c) for k, c in zip(keep, coef)})
    constants = {"matmul_efficiency": CPU["matmul_efficiency"], "micro_batch_seconds": CPU["micro_batch_seconds"],
                 "elementwise_ops_per_element": {"half": fitted["elementwise_half"], "fp32": fitted["elementwise_fp32"]},
                 "attention_ops_per_score": fitted["attention_ops_per_score"],
                 "optimizer_ops_per_param": fitted["optimizer_ops_per_param"]}
    # Evaluation: the fixed cost per decoding step that closes the gap left by the rest of the prediction.
    gaps, steps = 0.0, 0
    for r in rows:
        for phase in ("base_eval", "final_eval"):
            p = r["phases"].get(phase)
            if p and p.get("predicted_seconds"):
                fixed, decode = _eval_parts(r, phase)
                gaps += p["seconds"] - (p["predicted_seconds"] - fixed)
                steps += decode
    constants["decode_step_seconds"] = gaps / steps if steps else None
    return constants


def _eval_parts(r: dict, phase: str) -> tuple[float, int]:
    """(fixed seconds, decoding steps) the prediction gave the phase: the base evaluation has its own where an earlier
    run measured its answers."""
    p = r["parts"]
    if phase == "base_eval" and "base_eval_fixed_s" in p:
        return p["base_eval_fixed_s"], p["base_eval_decode_steps"]
    return p["eval_fixed_s"], p["eval_decode_steps"]


def refit_prediction(r: dict, constants: dict, current: dict | None = None) -> float:
    """The training seconds the case would be predicted with `constants` instead of launcher.timing's."""
    ops = constants["elementwise_ops_per_element"]
    coefficients = [ops["half"], ops["fp32"], constants["attention_ops_per_score"], constants["optimizer_ops_per_param"]]
    return _held(r, constants) + sum(c * v for c, v in zip(coefficients, _columns(r)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--fit", action="store_true", help="fit launcher/timing.py's CPU constants to the measured phases")
    ap.add_argument("--keep", help="keep the run directories here (default: a temporary folder)")
    ap.add_argument("--save", help="write the measurements as JSON")
    ap.add_argument("--load", help="read measurements saved by --save instead of running")
    args = ap.parse_args()
    from launcher.timing import CPU

    if args.load:
        results = json.loads(Path(args.load).read_text())
        measured_on = {r.get("cpu") for r in results} - {None}
        print(f"CPU of the measurements: {', '.join(sorted(measured_on)) or 'not recorded in ' + args.load} "
              f"(this machine: {cpu_name()})", flush=True)
    else:
        print(f"CPU: {cpu_name()}", flush=True)
        names = args.cases.split(",") if args.cases else list(CASES)
        out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="time-estimate-"))
        results = []
        for name in names:
            print(f"running {name} ...", flush=True)
            results.append(run_case(name, CASES[name], out))
            r = results[-1]["phases"]["training"]
            print(f"  training {r['seconds']} s (predicted {r.get('predicted_seconds')}), peak {r.get('peak_memory_gib')} GiB "
                  f"(predicted {r.get('predicted_memory_gib')})", flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1))
    print(table(results))
    if args.fit and any("attention_score_s" not in r["parts"] for r in results):
        raise SystemExit("--fit: these measurements were saved by an earlier version, whose prediction had other parts "
                         "(a bandwidth-based elementwise term); the table above is what they measured. Fit on runs of "
                         "this version: benchmarks/time_estimate.py --fit --save results.json")
    if args.fit:
        constants = fit(results)
        print("fitted on every case:", {k: round(v, 4) if isinstance(v, float) else v for k, v in constants.items()})
        print("in launcher/timing.py:", CPU)
        print("training with the fitted constants (in-sample):")
        for r in results:
            predicted = refit_prediction(r, constants, CPU)
            actual = r["phases"]["training"]["seconds"]
            print(f"  {r['case']:<24} predicted {predicted:7.1f} s, measured {actual:7.1f} s ({actual / predicted:.2f}x)")
        if constants["decode_step_seconds"] is not None:
            print("evaluation with the fitted seconds per decoding step:")
            for r in results:
                for phase in ("base_eval", "final_eval"):
                    p = r["phases"].get(phase)
                    if p and p.get("predicted_seconds"):
                        fixed, decode = _eval_parts(r, phase)
                        predicted = p["predicted_seconds"] - fixed + decode * constants["decode_step_seconds"]
                        print(f"  {r['case']:<24} {phase:<10} predicted {predicted:6.1f} s, measured {p['seconds']:6.1f} s "
                              f"({p['seconds'] / predicted:.2f}x)")
        held = [r for r in results if r["case"] == "gsm8k"]
        if held and len(held) < len(results):
            partial = fit(results, exclude=lambda r: r["case"] == "gsm8k")
            print("fitted without GSM8K:", {k: round(v, 4) if isinstance(v, float) else v for k, v in partial.items()})
            for r in held:
                predicted = refit_prediction(r, partial, CPU)
                actual = r["phases"]["training"]["seconds"]
                print(f"  {r['case']}: training predicted {predicted:.1f} s, measured {actual:.1f} s ({actual / predicted:.2f}x)")

if __name__ == "__main__":
    main()
