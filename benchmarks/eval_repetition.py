"""Evaluation with and without eval.stop_on_repetition, on the same GSM8K test questions, in one process.

A LoRA-trained small model often loops a line of its reasoning until max_new_tokens; stopping a row where
the loop is found saves those tokens. This prints the time of each pass, the ratio, the tokens generated,
how many parsed answers agree and each pass's accuracy (greedy both times, same batches).

    .venv/bin/python benchmarks/eval_repetition.py [RUN_DIR] [--n 128] [--max-new-tokens 256] [--batch-size 16]

RUN_DIR: a finished GSM8K run of the embedded model (its adapter is loaded); without it, the base model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from launcher import evaluate as ev
    from launcher.models import load_model, load_tokenizer, resolve_model
    from launcher.tasks import gsm8k

    torch.set_num_threads(args.threads)
    path = resolve_model("embedded:smollm2-135m-instruct")
    tokenizer, model = load_tokenizer(path), load_model(path)
    if args.run_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(args.run_dir) / "adapter"))
    items = gsm8k.load_file(gsm8k.BUNDLED / "test.jsonl")[: args.n]
    kw = dict(prompt_format="plain", batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device="cpu")
    ev.evaluate(model, tokenizer, gsm8k, items[:2], **{**kw, "max_new_tokens": 8})  # warm-up

    results = {}
    for stop in (False, True):
        t0 = time.perf_counter()
        metrics, records = ev.evaluate(model, tokenizer, gsm8k, items, stop_on_repetition=stop, **kw)
        tokens = sum(len(tokenizer(r["generated"], add_special_tokens=False)["input_ids"]) for r in records)
        results[stop] = (time.perf_counter() - t0, metrics, records, tokens)
    (t_off, m_off, r_off, n_off), (t_on, m_on, r_on, n_on) = results[False], results[True]
    same = sum(a["parsed"] == b["parsed"] for a, b in zip(r_off, r_on))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{args.n} GSM8K test questions, {'adapter of ' + args.run_dir if args.run_dir else 'base model'}, "
          f"max_new_tokens={args.max_new_tokens}, batch {args.batch_size}, fp32, {args.threads} threads, CPU: {cpu}")
    print(f"to the limit: {t_off:.1f} s, {n_off} tokens, accuracy {m_off['accuracy']:.3f}")
    print(f"stop on repetition: {t_on:.1f} s, {n_on} tokens, accuracy {m_on['accuracy']:.3f}")
    print(f"speed-up: {t_off / t_on:.2f}x   same parsed answer: {same}/{args.n}   "
          f"stopped rows: {sum(len(b['generated']) < len(a['generated']) for a, b in zip(r_off, r_on))}")


if __name__ == "__main__":
    main()
