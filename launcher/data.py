"""Examples -> token ids and labels, the pre-flight report, and data-file loading.

Labels are built per example before padding (prompt = -100, answer and EOS = their ids) and padded
with -100 by the collator: the pad token here IS the EOS token, so masking "is pad" would also mask the
EOS target and the model would never learn to stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import DataError
from launcher.recipe import Recipe
from launcher.tasks import unit_conversion as uc
from launcher.tasks.unit_conversion import Example


def load_pairs_file(path: str | Path, style: str) -> list[Example]:
    """A JSON array of [question, answer] pairs. An answer already holding <answer> is the target as is."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file ({exc.strerror}). Fix: check data.path / eval.path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = getattr(exc, "lineno", "?")
        raise DataError(f"{path}:{line}: invalid JSON ({exc}). Fix: a JSON array of [question, answer] pairs.") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON array of [question, answer] pairs.")
    examples = []
    for i, item in enumerate(data):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0].strip()):
            raise DataError(f"{path}: item {i} is {json.dumps(item)[:80]}; expected [question, answer] with a non-empty question.")
        question, answer = item
        try:
            reference = uc.reference_from_answer(answer)
        except ValueError as exc:
            raise DataError(f"{path}: item {i} has answer {json.dumps(answer)[:60]}: {exc}. Fix: give a number.") from None
        target = answer if isinstance(answer, str) and "<answer>" in answer else uc.target_text(reference, "bare")
        examples.append(Example(question, target, reference, "file"))
    return examples


def build_examples(recipe: Recipe) -> tuple[list[Example], list[Example]]:
    """Training and evaluation examples for the recipe: from files where given, else generated."""
    d, e = recipe.data, recipe.eval
    train, evals = uc.generate(d.train_size, e.size, recipe.train.seed, d.target_style)
    if d.path:
        train = load_pairs_file(d.path, d.target_style)
    if e.path:
        evals = load_pairs_file(e.path, d.target_style)
    if e.limit:
        evals = evals[: e.limit]
    return train, evals


def format_prompt(question: str, tokenizer, prompt_format: str) -> str:
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.prompt_format=chat, but the tokenizer has no chat template. Fix: data.prompt_format=plain.")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return f"{question}\nAnswer:"


def target_for_prompt(target: str, prompt_format: str) -> str:
    # After a plain "Answer:" the answer starts with a space, as the tokenizer would see it in text.
    return target if prompt_format == "chat" else " " + target


@dataclass
class PreflightReport:
    samples: int = 0
    dropped: int = 0
    prompts_cut: int = 0
    trainable_tokens: list[int] = field(default_factory=list)
    total_tokens: int = 0

    def as_dict(self) -> dict:
        t = self.trainable_tokens
        return {
            "samples": self.samples,
            "dropped_for_truncation": self.dropped,
            "prompts_truncated": self.prompts_cut,
            "trainable_tokens_min": min(t) if t else 0,
            "trainable_tokens_mean": round(sum(t) / len(t), 1) if t else 0,
            "trainable_tokens_total": sum(t),
            "tokens_total": self.total_tokens,
        }

    def render(self) -> str:
        d = self.as_dict()
        return (f"pre-flight: {d['samples']} samples, trainable tokens per sample min {d['trainable_tokens_min']} / "
                f"mean {d['trainable_tokens_mean']}, {d['trainable_tokens_total']} trainable of {d['tokens_total']} tokens; "
                f"{d['prompts_truncated']} prompts truncated, {d['dropped_for_truncation']} samples dropped")


def encode_examples(examples: list[Example], tokenizer, max_length: int, prompt_format: str,
                    on_truncation: str = "error") -> tuple[list[dict], PreflightReport]:
    """Tokenize prompt and target separately so the label boundary is exact; cut the prompt, never the answer."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, so the model could not learn to stop. Fix: use a model with one.")
    report = PreflightReport()
    features = []
    for i, ex in enumerate(examples):
        prompt_ids = tokenizer(format_prompt(ex.question, tokenizer, prompt_format), add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target_for_prompt(ex.target, prompt_format), add_special_tokens=False)["input_ids"] + [eos]
        room = max_length - len(target_ids)
        if room < 1:
            # The answer (plus at least one prompt token) does not fit: training would lose answer tokens.
            if on_truncation == "drop":
                report.dropped += 1
                continue
            raise DataError(
                f"sample {i} ({ex.question[:60]!r}) has a {len(target_ids)}-token answer, which does not fit "
                f"data.max_length={max_length} with its prompt, so answer tokens would be cut. Fix: raise "
                f"data.max_length to at least {len(target_ids) + len(prompt_ids)}, or set data.on_truncation=drop."
            )
        if len(prompt_ids) > room:
            prompt_ids = prompt_ids[-room:]  # keep the end of the prompt, next to the answer
            report.prompts_cut += 1
        input_ids = prompt_ids + target_ids
        labels = [-100] * len(prompt_ids) + target_ids
        trainable = sum(1 for x in labels if x != -100)
        if trainable == 0:
            raise DataError(f"sample {i} has no trainable tokens: its loss would be a silent zero. Fix: check the data.")
        report.trainable_tokens.append(trainable)
        report.total_tokens += len(input_ids)
        features.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    report.samples = len(features)
    if not features:
        raise DataError(f"no training sample is left after pre-flight ({report.dropped} dropped for truncation). "
                        f"Fix: raise data.max_length (now {max_length}).")
    return features, report
