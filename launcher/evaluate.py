"""Batched greedy generation and scoring: accuracy and answer_rate, per item and per group."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from launcher import stats
from launcher.data import batch_order, format_prompt
from launcher.errors import DataError
from launcher.jsonl import read_jsonl
from launcher.rundir import RunDir
from launcher.tasks import Example


# Decoding steps between checks for finished rows (see _generate_batch).
DROP_FINISHED_EVERY = 16
# A row that ends in one unit of at most REPEAT_UNIT_MAX_TOKENS tokens written REPEAT_MIN_TIMES times in a
# row, REPEAT_MIN_TOKENS tokens at least, is looping and would go on to max_new_tokens (eval.stop_on_repetition).
# On 500 GSM8K test generations of the embedded model (base and a LoRA-trained one) this stops 45 and 84 rows;
# one answer turned right and one wrong in each, and it never fires on 3000 reference solutions.
REPEAT_UNIT_MAX_TOKENS, REPEAT_MIN_TIMES, REPEAT_MIN_TOKENS = 64, 4, 32


@dataclass(frozen=True)
class Generation:
    text: str
    calculator_calls: int = 0  # results the calculator wrote (eval.calculator)
    marked: str | None = None  # the text with those results between calculator.MARK_OPEN/MARK_CLOSE
    new_tokens: int = 0  # tokens generated (EOS excluded; the calculator's forced ones included)


def generate(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int, device: str,
             label: str = "generating", stop_on_repetition: bool = False, calculator: bool = False) -> list[str]:
    """Greedy continuations of each prompt (see generations)."""
    return [g.text for g in generations(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                        device=device, label=label, stop_on_repetition=stop_on_repetition,
                                        calculator=calculator)]


def generations(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int, device: str,
                label: str = "generating", stop_on_repetition: bool = False, calculator: bool = False) -> list[Generation]:
    """Greedy continuations of each prompt, batched with left padding and the KV cache, in the model's dtype;
    with `calculator`, results of `<<EXPR=` are written by launcher.calculator."""
    import torch

    from launcher import calculator as calc

    # Left padding: every row's last prompt token sits at the same position, where generation starts.
    tokenizer.padding_side = "left"
    order = batch_order(prompts)
    outputs: dict[int, Generation] = {}
    model.eval()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    contiguous = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        with progress_bar(label, len(prompts)) as advance, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                processor = (calc.CalculatorProcessor(tokenizer, batch["input_ids"].shape[1], list(range(len(idx))))
                             if calculator else None)
                for r, (i, tokens) in enumerate(zip(idx, _generate_batch(model, tokenizer, batch, max_new_tokens,
                                                                         stop_on_repetition, processor))):
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    if processor is None:
                        outputs[i] = Generation(text, new_tokens=len(tokens))
                    else:
                        forced = [k for k in processor.forced.get(r, []) if k < len(tokens)]
                        outputs[i] = Generation(text, calc.calls(forced), calc.marked(tokenizer, tokens, forced), len(tokens))
                advance(len(idx))
    finally:
        tokenizer.padding_side = "right"  # training pads on the right
        if contiguous is not None:
            contiguous.remove()
    return [outputs[i] for i in range(len(prompts))]


def answer_lengths(generated: list[Generation], prompts: list[str], batch_size: int) -> dict:
    """How long the answers ran, for the plan's next time prediction (launcher.timing): a batch decodes until its
    longest answer ends, so the decoding steps are the sum of each batch's longest."""
    lengths = [g.new_tokens for g in generated]
    order = batch_order(prompts)
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return {"mean": round(sum(lengths) / max(1, len(lengths)), 1), "max": max(lengths, default=0),
            "decode_steps": sum(max(lengths[i] for i in b) for b in batches), "batches": len(batches)}


def _contiguous_input(module, args):
    """The output head's input made contiguous. generate asks for the last position's logits only
    (logits_to_keep=1), and the model hands its head hidden_states[:, -1:, :], a strided view. For a weight
    without gradients (a frozen base: every final evaluation of LoRA, and the worker's base evaluation) torch's
    CPU linear does not fold that input into one matrix product: it broadcasts the weight over the batch instead,
    and in bf16 materialises it, batch x hidden x vocab (measured, torch 2.13, SmolLM2 at batch 50:
    2.64 GiB at every prefill: the quick start's base generation peaked at 3.43 GiB resident in 21.0 s, and at 0.81 GiB
    in 12.1 s with this copy of 50 x 576 values). Written by hand: no library option turns it off."""
    if args and hasattr(args[0], "is_contiguous") and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def repeats_at_end(tokens: list[int]) -> bool:
    """Whether the sequence ends in one unit repeated (see REPEAT_MIN_TIMES): a loop greedy decoding stays in."""
    for size in range(1, REPEAT_UNIT_MAX_TOKENS + 1):
        need = max(REPEAT_MIN_TIMES * size, REPEAT_MIN_TOKENS)
        if need > len(tokens):
            return False
        tail = tokens[-need:]
        if tail[size:] == tail[:-size]:  # periodic with period `size`
            return True
    return False


def _generate_batch(model, tokenizer, batch, max_new_tokens: int, stop_on_repetition: bool = False,
                    calculator=None) -> list[list[int]]:
    """Greedy new tokens of each row (up to, not including, EOS), dropping finished rows as it goes.

    Written by hand around `model.generate`: generate keeps decoding every row of a batch until the
    longest one ends, and most GSM8K answers end long before the longest. Every DROP_FINISHED_EVERY steps
    the finished rows leave the batch and their part of the KV cache is dropped
    (`Cache.batch_select_indices`); generate then continues the rest from the cache, the way it continues
    a conversation. Greedy, so the tokens are those one uninterrupted generate call would give.
    With stop_on_repetition a row that loops (repeats_at_end) is finished too, where it was found looping:
    greedy decoding does not leave a loop, and the rest would be the same unit until max_new_tokens.
    A calculator (launcher.calculator.CalculatorProcessor) forces its results per row; it is told which of the
    batch's rows are still there.
    """
    import torch
    from transformers import LogitsProcessorList

    eos = tokenizer.eos_token_id
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = list(range(input_ids.shape[0]))
    produced: list[list[int]] = [[] for _ in rows]
    cache, remaining = None, max_new_tokens
    extra = {} if calculator is None else {"logits_processor": LogitsProcessorList([calculator])}
    while rows and remaining > 0:
        steps = min(remaining, DROP_FINISHED_EVERY)
        if calculator is not None:
            calculator.rows = rows
        out = model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=steps,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                             return_dict_in_generate=True, **extra)
        new = out.sequences[:, input_ids.shape[1]:]
        keep = []
        for r, tokens in enumerate(new.tolist()):
            if eos in tokens:
                produced[rows[r]] += tokens[:tokens.index(eos)]
            else:
                produced[rows[r]] += tokens
                if not (stop_on_repetition and repeats_at_end(produced[rows[r]])):
                    keep.append(r)
        remaining -= steps
        if not keep or remaining <= 0:
            break
        cache = out.past_key_values
        if len(keep) < len(rows):
            cache.batch_select_indices(torch.tensor(keep, device=input_ids.device))
        mask = torch.cat([mask, torch.ones_like(new)], dim=1)[keep]
        input_ids = out.sequences[keep]
        rows = [rows[k] for k in keep]
    return produced


@contextmanager
def progress_bar(label: str, total: int):
    """A rich progress bar on a terminal; elsewhere (a log file, `docker logs`, CI) one plain line per
    step with the count, elapsed time and an estimate of what is left, since rich draws nothing there."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if console.is_terminal:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as progress:
            task = progress.add_task(label, total=total)
            yield lambda n: progress.advance(task, n)
        return
    start, done = time.monotonic(), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        elapsed = time.monotonic() - start
        left = elapsed / done * (total - done) if done else 0.0
        print(f"{label}: {done}/{total} items, {elapsed:.0f} s elapsed, ~{left:.0f} s left", file=sys.stderr, flush=True)

    yield advance


def score(task, examples: list[Example], generated: list[str]) -> tuple[dict, list[dict]]:
    """Metrics over all items and per group, and one prediction record per item."""
    if hasattr(task, "score"):  # the chat task scores with eval.metrics (launcher.metrics)
        return task.score(examples, generated)
    if len(generated) != len(examples):
        raise DataError(f"{len(generated)} generations for {len(examples)} items. Fix: one generation per evaluated item, in order.")
    records = []
    for ex, text in zip(examples, generated):
        value = task.parse_answer(text)
        records.append({"question": ex.question, "reference": ex.reference, "generated": text, "parsed": value,
                        "correct": task.is_correct(value, ex.reference), "group": ex.group})
    result = metrics(records)
    if hasattr(task, "error_kinds"):  # unit conversion: wrong factor, wrong product, no answer
        result["error_kinds"] = task.error_kinds(examples, records)
    return result, records


def metrics(records: list[dict]) -> dict:
    def summary(rows: list[dict]) -> dict:
        n = len(rows)
        return {"accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
                "answer_rate": sum(r["parsed"] is not None for r in rows) / n if n else 0.0, "n": n}

    out = summary(records)
    groups = defaultdict(list)
    for r in records:
        groups[r["group"]].append(r)
    if len(groups) > 1:
        out["groups"] = {g: summary(rows) for g, rows in sorted(groups.items())}
    return out


# The keys of comparison.json that eval.json repeats (other tools read these names); a comparison without
# generation (chat with no eval.metrics) has only the loss keys, one without loss records only the others.
COMPARISON_SUMMARY = ("both_correct", "only_base_correct", "only_trained_correct", "mcnemar_p_value",
                      "base_ci95", "trained_ci95", "verdict", "loss_base", "loss_trained", "loss_p_value", "loss_verdict")


def summary_of(comparison: dict) -> dict:
    return {k: comparison[k] for k in COMPARISON_SUMMARY if k in comparison}


def compare(base: list[dict], trained: list[dict]) -> dict:
    """Side by side on the same items: metrics of each, how many each got right that the other missed, and
    whether the difference is real (exact McNemar test on those discordant items, Wilson 95% intervals);
    the held-out loss of each item under each model and its paired Wilcoxon test; each of eval.metrics."""
    if [r["question"] for r in base] != [r["question"] for r in trained]:
        raise DataError("base and trained predictions are not on the same items in the same order. Fix: evaluate both on one item list.")
    out = {"n": len(base)}
    if base and all("loss" in r for r in base + trained):
        out.update(compare_losses([r["loss"] for r in base], [r["loss"] for r in trained]))
    if base and base[0].get("correct") is None:  # no generation: the loss is the whole comparison
        return out
    out.update(_compare_correct(base, trained))
    names = list(base[0].get("metrics", {})) if base else []
    if names:
        out["metrics"] = {}
        for name in names:
            view = lambda rows: [{**r, "correct": r["metrics"][name]} for r in rows]
            c = _compare_correct(view(base), view(trained))
            out["metrics"][name] = {"base_accuracy": c["base"]["accuracy"], "trained_accuracy": c["trained"]["accuracy"],
                                    **{k: c[k] for k in COMPARISON_SUMMARY if k in c}}
    return out


def compare_losses(base: list[float], trained: list[float]) -> dict:
    """Mean held-out loss and perplexity of each model with 95% intervals, and the two-sided Wilcoxon
    signed-rank p of the per-item differences (items with no trained-on token are left out)."""
    import math

    pairs = [(b, t) for b, t in zip(base, trained) if not (math.isnan(b) or math.isnan(t))]
    if not pairs:
        return {}
    b, t = [p[0] for p in pairs], [p[1] for p in pairs]
    w_plus, p = stats.wilcoxon_signed_rank([y - x for x, y in pairs])
    mb, mt = sum(b) / len(b), sum(t) / len(t)
    (bl, bh), (tl, th) = stats.mean_interval(b), stats.mean_interval(t)
    lower, higher = sum(y < x for x, y in pairs), sum(y > x for x, y in pairs)
    if p < stats.ALPHA:
        verdict = f"trained loss {'lower' if mt < mb else 'higher'} than base, Wilcoxon p = {stats._p(p)} (n = {len(pairs)})"
    else:
        verdict = f"no significant loss difference at n = {len(pairs)} (Wilcoxon p = {stats._p(p)})"
    return {"loss_n": len(pairs), "loss_base": mb, "loss_trained": mt, "loss_base_ci95": [bl, bh],
            "loss_trained_ci95": [tl, th], "perplexity_base": math.exp(mb), "perplexity_trained": math.exp(mt),
            "perplexity_base_ci95": [math.exp(bl), math.exp(bh)], "perplexity_trained_ci95": [math.exp(tl), math.exp(th)],
            "loss_lower_for_trained_items": lower, "loss_lower_for_base_items": higher, "loss_wilcoxon_w_plus": w_plus, "loss_p_value": p,
            "loss_verdict": verdict}


def _compare_correct(base: list[dict], trained: list[dict]) -> dict:
    pairs = list(zip(base, trained))
    n = len(pairs)
    only_base = sum(b["correct"] and not t["correct"] for b, t in pairs)
    only_trained = sum(t["correct"] and not b["correct"] for b, t in pairs)
    p = stats.mcnemar_exact(only_base, only_trained)
    return {
        "n": n,
        "base": metrics(base),
        "trained": metrics(trained),
        "both_correct": sum(b["correct"] and t["correct"] for b, t in pairs),
        "only_base_correct": only_base,
        "only_trained_correct": only_trained,
        "mcnemar_p_value": p,
        "base_ci95": list(stats.wilson_interval(sum(r["correct"] for r in base), n)),
        "trained_ci95": list(stats.wilson_interval(sum(r["correct"] for r in trained), n)),
        "verdict": stats.verdict(only_base, only_trained, n, p),
    }


def format_comparison(c: dict) -> str:
    lines = [f"{'':<24}{'base':>16}{'trained':>16}"]
    if "loss_base" in c:
        (lbl, lbh), (ltl, lth) = c["loss_base_ci95"], c["loss_trained_ci95"]
        lines += [f"{'held-out loss':<24}{c['loss_base']:>16.4f}{c['loss_trained']:>16.4f}",
                  f"{'  95% interval':<24}{f'[{lbl:.3f}, {lbh:.3f}]':>16}{f'[{ltl:.3f}, {lth:.3f}]':>16}",
                  f"{'perplexity':<24}{c['perplexity_base']:>16.3f}{c['perplexity_trained']:>16.3f}",
                  f"{'loss lower on items':<24}{c['loss_lower_for_base_items']:>16}"
                  f"{c['loss_lower_for_trained_items']:>16}   (of {c['loss_n']})",
                  f"Wilcoxon signed-rank p = {c['loss_p_value']:.4g}: {c['loss_verdict']}"]
    if "base" not in c:
        return "\n".join(lines)
    b, t = c["base"], c["trained"]
    (bl, bh), (tl, th) = c["base_ci95"], c["trained_ci95"]
    for name, m in c.get("metrics", {}).items():
        lines.append(f"{'accuracy ' + name:<24}{m['base_accuracy']:>16.3f}{m['trained_accuracy']:>16.3f}"
                     f"   McNemar p = {m['mcnemar_p_value']:.4g}")
    lines += [f"{'accuracy':<24}{b['accuracy']:>16.3f}{t['accuracy']:>16.3f}",
             f"{'  95% interval':<24}{f'[{bl:.3f}, {bh:.3f}]':>16}{f'[{tl:.3f}, {th:.3f}]':>16}",
             f"{'answer_rate':<24}{b['answer_rate']:>16.3f}{t['answer_rate']:>16.3f}"]
    for group in t.get("groups", {}):
        lines.append(f"{'accuracy ' + group:<24}{b['groups'][group]['accuracy']:>16.3f}{t['groups'][group]['accuracy']:>16.3f}")
    lines.append(f"{'right only here':<24}{c['only_base_correct']:>16}{c['only_trained_correct']:>16}")
    lines.append(f"{'items':<24}{c['n']:>16}{c['n']:>16}   (both right: {c['both_correct']})")
    lines.append(f"McNemar exact p = {c['mcnemar_p_value']:.4g}: {c['verdict']}")
    if c.get("trained_collapsed"):
        lines.append(f"COLLAPSED: the trained model's generations are degenerate (see {RunDir.STATUS} for the diagnosis)")
    return "\n".join(lines)


def settings(recipe, plan) -> dict:
    """The keyword arguments of evaluate() that a recipe and its plan decide (training and `sftlaunch eval` alike)."""
    return dict(prompt_format=recipe.data.prompt_format, batch_size=recipe.eval.batch_size,
                max_new_tokens=recipe.eval.max_new_tokens, device=plan.device, precision=plan.eval_precision,
                stop_on_repetition=recipe.eval.stop_on_repetition, calculator=recipe.eval.calculator,
                merge=plan.eval_merge)


def decoding(*, max_new_tokens: int, stop_on_repetition: bool, calculator: bool, **_) -> dict:
    """How an evaluation generated: eval.json and comparison.json record it (base and trained must share it)."""
    return {"method": "greedy", "max_new_tokens": max_new_tokens, "stop_on_repetition": stop_on_repetition,
            "calculator": calculator}


def shared_decoding(base: dict, trained: dict) -> dict:
    """The decoding of a comparison: both sides' must be the same, or the comparison would not be fair."""
    if base.get("decoding") != trained.get("decoding"):
        raise DataError(f"base was evaluated with decoding {base.get('decoding')} and trained with {trained.get('decoding')}; "
                        "a comparison needs one decoding. Fix: evaluate both with the same eval settings "
                        "(sftlaunch eval RUN --compare base).")
    return trained["decoding"]


def evaluate(model, tokenizer, task, examples: list[Example], *, prompt_format: str, batch_size: int,
             max_new_tokens: int, device: str, precision: str = "fp32", label: str = "evaluating",
             stop_on_repetition: bool = False, calculator: bool = False, merge: bool = False) -> tuple[dict, list[dict]]:
    """Generation metrics (unless the task does not generate: chat with no eval.metrics) and each item's
    held-out loss (launcher.item_loss), the loss in every record; with `merge`, a LoRA model's adapter is merged
    into the evaluation's copy of its weights (inference_weights)."""
    from launcher.item_loss import item_losses

    generates = getattr(task, "generates", True)
    features = loss_features(task, examples, tokenizer, prompt_format)
    with inference_weights(model, precision, merge=merge) as weights:
        losses = item_losses(weights, tokenizer, features, device=device, label=f"{label}: held-out loss")
        if generates:
            prompts = (task.prompts(examples, tokenizer) if hasattr(task, "prompts")
                       else [format_prompt(ex.question, tokenizer, prompt_format) for ex in examples])
            generated = generations(weights, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    device=device, label=label, stop_on_repetition=stop_on_repetition, calculator=calculator)
    if generates:
        result, records = score(task, examples, [g.text for g in generated])
        result["decoding"] = decoding(max_new_tokens=max_new_tokens, stop_on_repetition=stop_on_repetition,
                                      calculator=calculator)
        result["answer_tokens"] = answer_lengths(generated, prompts, batch_size)
        if calculator:
            for r, g in zip(records, generated):
                r["calculator"] = {"calls": g.calculator_calls, "marked": g.marked}
            result["calculator_calls"] = sum(g.calculator_calls for g in generated)
            result["rows_with_calculator"] = sum(g.calculator_calls > 0 for g in generated)
    else:
        records = [{"question": ex.question, "reference": ex.reference, "generated": None, "parsed": None,
                    "correct": None, "group": ex.group} for ex in examples]
        result = {"n": len(records)}
    for r, loss in zip(records, losses):
        r["loss"] = loss
    valid = [x for x in losses if x == x]  # NaN: an item with no trained-on token
    if valid:
        import math

        result["loss"] = sum(valid) / len(valid)
        result["perplexity"] = math.exp(result["loss"])
    return result, records


# A held-out item is scored whole for its loss: only the model's context bounds it, never data.max_length.
LOSS_MAX_LENGTH = 1 << 30


def loss_features(task, examples, tokenizer, prompt_format: str) -> list[dict]:
    """Each item's ids and labels, masked as in training (built-in tasks: the answer and EOS)."""
    if hasattr(task, "loss_features"):
        return task.loss_features(examples, tokenizer)
    from launcher.data import encode_examples

    features, _ = encode_examples(examples, tokenizer, LOSS_MAX_LENGTH, prompt_format)
    return features


def _merge_targets(model) -> list:
    """The base weights a LoRA model's adapters would be merged into for generation, or [] when the model is no
    LoRA model or cannot be merged as it stands: adapters disabled (a base evaluation under disable_adapter),
    already merged, a LoRA variant (DoRA and the like, not planned for), or a base weight that is not a plain
    floating tensor (4-bit, or partitioned by ZeRO-3)."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    if not isinstance(model, PeftModel):
        return []
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    weights = [layer.get_base_layer().weight for layer in layers]
    if (not layers or any(layer.disable_adapters or layer.merged or getattr(layer, "lora_variant", None) for layer in layers)
            or any(not w.is_floating_point() or w.numel() == 0 for w in weights)):
        return []
    return weights


@contextmanager
def inference_weights(model, precision: str, merge: bool = False):
    """The model to generate with: a bf16/fp16 copy under mixed precision (plan.eval_precision), else itself.

    Training keeps fp32 weights for the optimizer, and autocast casts each of them again at every decoding
    step; a half-precision copy skips that (1.5x faster here). It is a copy, so the fp32 weights that
    training goes on with are untouched; it costs half the fp32 weights' memory while it exists. A model
    loaded in that precision already (evaluation after a reload, or the base before LoRA with a half-precision
    base_dtype) is used as it is. Beside a base trained in that dtype only the fp32 LoRA weights are cast: the
    copy shares the frozen base's tensors (`.to` of a tensor already in the dtype returns it), so it costs
    nothing there and nothing trains them.

    With `merge`, a LoRA model's adapter is merged into the copy (PEFT's merge_and_unload), so generation runs
    plain linear layers: an unmerged LoRA layer runs its own two small products, the scaling and the sum, and
    PEFT's Python around them, at every layer and decoding step. The weights merged into are the copy's own:
    copied where the copy would share them with the model (plan.eval_merge counts that memory).
    """
    import copy

    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    tensors = [*model.parameters(), *model.buffers()]
    merged = _merge_targets(model) if merge else []
    if not merged and (dtype is None or all(t.dtype == dtype or not t.is_floating_point() for t in tensors)):
        yield model
        return
    # deepcopy(model).to(dtype) first copied every weight in fp32 (a transient of 2x the fp32 weights, the
    # evaluation's peak); deepcopy takes a parameter's copy from its memo, so each weight is cast once,
    # straight into the copy (torch.nn.Parameter.__deepcopy__ returns memo[id(self)] when present).
    memo = {}
    for p in model.parameters():
        if not p.is_floating_point():
            # Shared, not copied: a 4-bit weight (bitsandbytes' Params4bit, uint8) carries its quantization state
            # on the parameter object itself, which a plain Parameter copy would lose; nothing trains it here.
            memo[id(p)] = p
            continue
        memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype or p.dtype), requires_grad=False)
    for weight in merged:  # merged into below: their own copy, never the tensor training shares
        if memo[id(weight)].data_ptr() == weight.data_ptr():
            memo[id(weight)] = torch.nn.Parameter(weight.detach().to(dtype or weight.dtype, copy=True), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.detach().to(dtype or b.dtype) if b.is_floating_point() else b.detach().clone()
    copied = copy.deepcopy(model, memo)
    if merged:
        copied = copied.merge_and_unload()
    try:
        yield copied
    finally:
        del copied, memo


def read_generations(path: str | Path) -> list[str]:
    """A JSONL file with one {"generated": TEXT} per evaluated item, in order."""
    out = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("generated"), str):
            raise DataError(f'{path}:{n}: expected {{"generated": TEXT}}.')
        out.append(row["generated"])
    return out


def format_metrics(name: str, m: dict) -> str:
    loss = f"  held-out loss {m['loss']:.4f}" if "loss" in m else ""
    if "accuracy" not in m:
        return f"{name:>8}:{loss}  (n={m['n']})"
    line = f"{name:>8}: accuracy {m['accuracy']:.3f}  answer_rate {m['answer_rate']:.3f}{loss}  (n={m['n']})"
    for metric, acc in m.get("metrics", {}).items():
        line += f"  {metric} {acc:.3f}"
    for group, g in m.get("groups", {}).items():
        line += f"\n{'':>10}{group}: accuracy {g['accuracy']:.3f}  answer_rate {g['answer_rate']:.3f}  (n={g['n']})"
    wrong = {k: v for k, v in m.get("error_kinds", {}).items() if k != "correct" and v}
    if wrong:
        line += f"\n{'':>10}wrong answers: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in wrong.items())
    if m.get("decoding", {}).get("calculator"):
        line += f"\n{'':>10}calculator: {m['calculator_calls']} results written in {m['rows_with_calculator']} of {m['n']} answers"
    return line
