"""The chat task: your own conversations, instructions or text (launcher.chat_data), trained on the assistant
turns through the model's chat template (launcher.chat_encode), evaluated by held-out loss and eval.metrics.

Module functions are the task interface the built-in tasks have (examples, eval_examples, load_file,
DEFAULT_MAX_LENGTH); ChatTask is the task bound to a recipe's settings (template, train_on, metrics), which
the worker and `sftlaunch eval` use to encode, prompt and score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from launcher import chat_data
from launcher.chat_encode import ROLE_NAMES, encode, encode_cached, prepare_tokenizer
from launcher.errors import DataError

# Long enough for most chat datasets' conversations (the shipped example's longest is under 200 tokens);
# longer ones follow data.on_truncation, and data.max_length raises it.
DEFAULT_MAX_LENGTH = (1024, "long enough for most conversations; longer ones follow data.on_truncation")


@lru_cache(maxsize=4)
def _prepared(recipe_json: str):
    from launcher.recipe import Recipe

    recipe = Recipe.model_validate_json(recipe_json)
    d, e = recipe.data, recipe.eval
    if d.path is not None:
        rows, formats = chat_data.load(d.path, d.format)
    else:
        rows, formats = chat_data.load_hub(d.dataset, d.dataset_config, d.split, d.format)
    evals = None
    if e.path:
        evals, eval_formats = chat_data.load(e.path, d.format, key="eval.path")
        formats = formats + eval_formats
    if d.max_samples:
        rows = rows[: d.max_samples]
    return chat_data.split(rows, d.eval_fraction, e.limit, evals), tuple(formats)


def prepared(recipe) -> tuple[chat_data.Split, tuple[chat_data.FileFormat, ...]]:
    """The split and each file's format (read once per process for one recipe)."""
    return _prepared(recipe.model_dump_json())


def examples(recipe, data_path: str | None = None):
    """Training rows and held-out rows (eval.path, or data.eval_fraction by content hash, at most eval.limit)."""
    s, _ = prepared(recipe)
    if not s.evals:
        raise DataError(f"no row of {len(s.train)} landed on the held-out side at data.eval_fraction="
                        f"{recipe.data.eval_fraction:g}. Fix: raise data.eval_fraction, or set eval.path.")
    if not s.train:
        raise DataError("no training row is left after the held-out split. Fix: lower data.eval_fraction, or add rows.")
    return s.train, s.evals


def eval_examples(recipe, data_path: str | None = None):
    return prepared(recipe)[0].evals


def load_file(path) -> list:
    """`sftlaunch eval --data FILE`: every row of the file is an evaluation item (any chat format)."""
    rows, _ = chat_data.load(str(path), key="--data")
    return rows


def check(recipe) -> list[str]:
    """Every row read and checked, the split made, the metrics' settings tried: before a model loads.
    Returns the lines that say what was found (each file's format, the split)."""
    from launcher.metrics import Metrics

    split, formats = prepared(recipe)
    examples(recipe)  # empty sides are errors
    if recipe.eval.metrics:
        Metrics.from_recipe(recipe).check_references(split.evals)
    lines = [f"data: {f.file}: {f.rows} rows, format {f.format} ({f.reason})" for f in formats]
    s = split.as_dict()
    lines.append(f"data: {s['train_rows']} training rows, {s['eval_rows']} held-out rows evaluated ({s['eval_source']}); "
                 f"{s['duplicates_removed_from_training']} training duplicates of held-out rows removed")
    return lines


def plan_decisions(recipe) -> list[tuple[str, object, str]]:
    """The chat task's choices, as plan decisions with their reasons (no file is read: the plan is pure;
    each file's detected format is in the pre-flight report)."""
    d, e = recipe.data, recipe.eval
    out = []
    if d.chat_template == "chatml":
        out.append(("chat_template", "chatml", "requested by the recipe (data.chat_template): ChatML turn markers"))
    elif d.chat_template:
        out.append(("chat_template", d.chat_template, "requested by the recipe (data.chat_template): this Jinja file"))
    else:
        out.append(("chat_template", "model's own", "the tokenizer's chat template (a model without one is refused: "
                                                    "set data.chat_template)"))
    why = {"assistant": "loss on every assistant turn (its text and end-of-turn token); system and user text masked",
           "last_assistant": "loss on the last assistant turn only", "all": "loss on every token"}[d.train_on]
    out.append(("train_on", d.train_on, why + (" (data.train_on)" if "train_on" in d.model_fields_set else " (default)")))
    if e.path:
        out.append(("eval_split", "eval.path", f"held-out rows from {e.path}; training rows equal to one are removed"))
    else:
        out.append(("eval_split", f"hash {d.eval_fraction:g}", f"rows whose content hash falls in the first "
                    f"{d.eval_fraction:g} of hash space are held out: stable when rows are added, never on both sides"
                    + (f"; at most eval.limit={e.limit} evaluated" if e.limit else "")))
    out.append(("eval_metrics", ",".join(["loss"] + list(e.metrics)), "held-out loss of base and trained per item "
                "(Wilcoxon signed-rank)" + (f"; generation metrics {', '.join(e.metrics)} (McNemar)" if e.metrics
                                            else "; no generation (eval.metrics is empty)")))
    return out


@dataclass
class ChatPreflight:
    samples: int = 0
    dropped: int = 0
    cut_after_last_trained: int = 0
    text_chunks: int = 0
    trained: dict = field(default_factory=lambda: {r: 0 for r in ROLE_NAMES})
    masked: dict = field(default_factory=lambda: {r: 0 for r in ROLE_NAMES})
    trainable_tokens: list[int] = field(default_factory=list)
    total_tokens: int = 0
    formats: list[dict] = field(default_factory=list)
    split: dict = field(default_factory=dict)
    template: str = ""
    train_on: str = ""
    from_cache: bool = False

    def as_dict(self) -> dict:
        t = self.trainable_tokens
        return {
            "samples": self.samples, "dropped_for_truncation": self.dropped,
            "cut_after_last_trained_token": self.cut_after_last_trained, "text_rows_split_into_chunks": self.text_chunks,
            "trainable_tokens_min": min(t) if t else 0, "trainable_tokens_mean": round(sum(t) / len(t), 1) if t else 0,
            "trainable_tokens_total": sum(t), "tokens_total": self.total_tokens,
            "tokens_by_role": {r: {"trained": self.trained[r], "masked": self.masked[r]} for r in ROLE_NAMES
                               if self.trained[r] or self.masked[r]},
            "formats": self.formats, "split": self.split, "chat_template": self.template, "train_on": self.train_on,
            "tokens_from_cache": self.from_cache,
        }

    def render(self) -> str:
        d = self.as_dict()
        roles = ", ".join(f"{r} {c['trained']} trained / {c['masked']} masked" for r, c in d["tokens_by_role"].items())
        lines = [f"pre-flight: {f['file']}: format {f['format']} ({f['reason']}), {f['rows']} rows" for f in self.formats]
        lines.append(f"pre-flight: {d['samples']} samples, chat template {self.template}, train_on {self.train_on}; "
                     f"tokens by role: {roles}")
        lines.append(f"pre-flight: trainable tokens per sample min {d['trainable_tokens_min']} / mean "
                     f"{d['trainable_tokens_mean']}, {d['trainable_tokens_total']} trainable of {d['tokens_total']} tokens; "
                     f"{d['dropped_for_truncation']} samples dropped for truncation"
                     + (f", {self.text_chunks} text chunks" if self.text_chunks else "")
                     + (" (tokens from the cache)" if self.from_cache else ""))
        s = self.split
        if s:
            lines.append(f"pre-flight: held out {s['eval_rows']} rows for evaluation ({s['eval_source']}), "
                         f"{s['held_out_not_evaluated']} more held out beyond eval.limit, "
                         f"{s['duplicates_removed_from_training']} training duplicates of held-out rows removed")
        return "\n".join(lines)


class ChatTask:
    """The chat task with a recipe's settings."""

    name = "chat"

    def __init__(self, recipe):
        from launcher.metrics import Metrics

        self.recipe = recipe
        self.metrics = Metrics.from_recipe(recipe) if recipe.eval.metrics else None
        self.template = ""

    def load_file(self, path) -> list:
        return load_file(path)

    def eval_examples(self, recipe, data_path: str | None = None) -> list:
        return eval_examples(recipe, data_path)

    @property
    def generates(self) -> bool:
        return self.metrics is not None

    def prepare(self, tokenizer, rows=()) -> None:
        """data.chat_template on the tokenizer (or its own checked); a model without one is refused."""
        needs = any(ex.text is None for ex in rows) if rows else True
        self.template = prepare_tokenizer(tokenizer, self.recipe.data.chat_template, needs)

    def encode(self, examples, tokenizer, max_length: int) -> tuple[list[dict], ChatPreflight]:
        """Training features (ids, labels, attention mask) and the pre-flight report: tokens per role, truncation."""
        d = self.recipe.data
        self.prepare(tokenizer, examples)
        encoded, from_cache = encode_cached(examples, tokenizer, d.train_on)
        report = ChatPreflight(template=self.template, train_on=d.train_on, from_cache=from_cache)
        split, formats = prepared(self.recipe)
        report.formats = [f.__dict__ for f in formats]
        report.split = split.as_dict()
        features, too_long = [], []
        for ex, enc in zip(examples, encoded):
            pieces = [(enc.input_ids, enc.labels, enc.roles)]
            if ex.text is not None and len(enc.input_ids) > max_length:
                # Continued pre-training: a long text is several samples, each trained on every token.
                pieces = [(enc.input_ids[i:i + max_length], enc.labels[i:i + max_length], enc.roles[i:i + max_length])
                          for i in range(0, len(enc.input_ids), max_length)]
                report.text_chunks += len(pieces)
            for ids, labels, roles in pieces:
                if len(ids) > max_length:
                    if any(label != -100 for label in labels[max_length:]):
                        too_long.append((ex, len(ids)))
                        continue
                    ids, labels, roles = ids[:max_length], labels[:max_length], roles[:max_length]
                    report.cut_after_last_trained += 1
                for label, role in zip(labels, roles):
                    bucket = report.trained if label != -100 else report.masked
                    bucket[ROLE_NAMES[role]] += 1
                report.trainable_tokens.append(sum(label != -100 for label in labels))
                report.total_tokens += len(ids)
                features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        if too_long and d.on_truncation == "error":
            first, need = too_long[0][0], max(n for _, n in too_long)
            raise DataError(f"{len(too_long)} of {len(examples)} samples would lose trained tokens at data.max_length="
                            f"{max_length} (the first is {first.where}). Fix: raise data.max_length to {need}, or set "
                            "data.on_truncation=drop to drop and count them.")
        from launcher.data import close_report

        return close_report(report, features, len(too_long), max_length)

    def prompts(self, examples, tokenizer) -> list[str]:
        """What the model answers: every turn before the last assistant turn, and the generation prompt."""
        self.prepare(tokenizer, examples)
        return tokenizer.apply_chat_template([ex.prompt_messages for ex in examples], tokenize=False,
                                             add_generation_prompt=True)

    def loss_features(self, examples, tokenizer) -> list[dict]:
        """Each held-out item whole (never cut), its trained-on tokens labelled as in training."""
        self.prepare(tokenizer, examples)
        return [{"input_ids": e.input_ids, "labels": e.labels}
                for e in encode(examples, tokenizer, self.recipe.data.train_on)]

    def score(self, examples, generated: list[str]) -> tuple[dict, list[dict]]:
        return self.metrics.score(examples, generated)
