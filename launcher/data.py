"""Examples -> token ids and labels, the pre-flight report, and data-file loading.

Labels are built per example before padding (prompt = -100, answer and EOS = their ids) and padded
with -100 by the collator: the pad token here IS the EOS token, so masking "is pad" would also mask the
EOS target and the model would never learn to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import ConfigError, DataError, Problem
from launcher.recipe import Recipe
from launcher.tasks import Example, get_task


def build_examples(recipe: Recipe, data_path: str | None = None) -> tuple[list[Example], list[Example]]:
    """Training and evaluation examples for the recipe's task, with data.max_samples and eval.limit applied.

    data_path: the plan's data source (plan.data_path) where it differs from data.path (a bundled copy)."""
    train, evals = get_task(recipe.data.task).examples(recipe, data_path)
    if recipe.data.max_samples:
        train = train[: recipe.data.max_samples]
    return train, limit_eval(evals, recipe)


def check_paths(recipe: Recipe) -> list[str]:
    """data.path / eval.path that do not exist here: found by `sftlaunch plan`, not by a started worker.
    The chat task's files are read and every row checked here too, before a model loads; the lines returned
    say what was found (each file's format, the split)."""
    problems = []
    paths = recipe.data.path if isinstance(recipe.data.path, list) else [recipe.data.path]
    for key, value in [("data.path", p) for p in paths] + [("eval.path", recipe.eval.path),
                                                           ("data.chat_template", _template_file(recipe))]:
        if value and not Path(value).expanduser().exists():
            problems.append(Problem(key, "no such file or folder", "check the path (relative paths start from the "
                                    "folder sftlaunch runs in)", got=value))
    if problems:
        raise ConfigError(problems)
    if recipe.data.task == "chat":
        return get_task("chat").check(recipe)
    return []


def _template_file(recipe: Recipe) -> str | None:
    t = recipe.data.chat_template
    return None if t in (None, "chatml") else t


def encode_for_training(recipe: Recipe, task, examples, tokenizer, max_length: int):
    """(features, pre-flight report) for the recipe's task: the chat task masks through the chat template."""
    if hasattr(task, "encode"):
        return task.encode(examples, tokenizer, max_length)
    return encode_examples(examples, tokenizer, max_length, recipe.data.prompt_format, recipe.data.on_truncation)


def limit_eval(evals: list[Example], recipe: Recipe) -> list[Example]:
    """The evaluated items: the first eval.limit (all when unset). Training and `sftlaunch eval` alike."""
    return evals[: recipe.eval.limit] if recipe.eval.limit else evals


def format_prompt(question: str, tokenizer, prompt_format: str) -> str:
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.prompt_format=chat, but the tokenizer has no chat template. Fix: data.prompt_format=plain.")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    # A fixed first token: without a BOS token, the sequence's first position acts as an attention sink
    # and a number there (as in "3 cups is ...") is copied wrongly a fifth of the time (measured).
    return f"Question: {question}\nAnswer:"


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
    features, too_long = [], []
    for i, ex in enumerate(examples):
        prompt_ids = tokenizer(format_prompt(ex.question, tokenizer, prompt_format), add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target_for_prompt(ex.target, prompt_format), add_special_tokens=False)["input_ids"] + [eos]
        room = max_length - len(target_ids)
        if room < 1:
            # The answer (plus at least one prompt token) does not fit: training would lose answer tokens.
            too_long.append((i, len(target_ids) + len(prompt_ids)))
            continue
        if len(prompt_ids) > room:
            prompt_ids = prompt_ids[-room:]  # keep the end of the prompt, next to the answer
            report.prompts_cut += 1
        input_ids = prompt_ids + target_ids
        labels = [-100] * len(prompt_ids) + target_ids
        report.trainable_tokens.append(len(target_ids))
        report.total_tokens += len(input_ids)
        features.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    if too_long and on_truncation == "error":
        first, need = too_long[0][0], max(n for _, n in too_long)
        raise DataError(
            f"{len(too_long)} of {len(examples)} samples would lose answer tokens at data.max_length={max_length} "
            f"(the first is sample {first}: {examples[first].question[:60]!r}). Fix: raise data.max_length to "
            f"{need}, or set data.on_truncation=drop to drop and count them."
        )
    return close_report(report, features, len(too_long), max_length)


def close_report(report, features: list[dict], dropped: int, max_length: int):
    """The pre-flight's last counts (every task's encoder ends here); no sample left is an error with the fix."""
    report.dropped = dropped
    report.samples = len(features)
    if not features:
        raise DataError(f"no training sample is left after pre-flight ({report.dropped} dropped for truncation). "
                        f"Fix: raise data.max_length (now {max_length}).")
    return features, report


# Fallback when no tokenizer file is at hand: digits are one token each in the tokenizers of SmolLM2, Qwen2.5 and
# Llama-2 (Llama-3 groups up to three), other text about 3.6 characters per token. On the shipped recipes with
# SmolLM2's tokenizer this gives 0.82x (unit conversion: many symbols) and 0.99x (GSM8K) of the exact count.
CHARS_PER_TOKEN = 3.6
# Tokens a chat template adds around each message (role markers, end-of-turn): ChatML's "<|im_start|>role\n" and
# "<|im_end|>\n" are 5.
TEMPLATE_TOKENS_PER_MESSAGE = 5


# Bumped whenever measure_size counts differently, so a cached count from an older way is not reused.
SIZE_COUNT_VERSION = "5"


def cached_size(recipe: Recipe, data_path: str | None, max_length: int, model_path: str | None):
    """measure_size, kept in $SFTLAUNCH_CACHE keyed by the recipe's data and evaluation sections, max_length, the model
    and the size and time of every file read (building GSM8K's annotated examples alone takes ~0.5 s)."""
    import hashlib

    from launcher.models import cache_dir, store_in_cache
    from launcher.timing import DataSize

    files = [data_path, *(recipe.data.path if isinstance(recipe.data.path, list) else [recipe.data.path]),
             recipe.eval.path, _tokenizer_file(model_path)]
    stamps = []
    for f in filter(None, files):
        for q in sorted(Path(f).rglob("*")) if Path(f).is_dir() else [Path(f)]:
            if q.is_file():
                st = q.stat()
                stamps.append(f"{q}:{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha256("|".join([SIZE_COUNT_VERSION, recipe.data.model_dump_json(), recipe.eval.model_dump_json(), str(max_length),
                                   recipe.model.name, *stamps]).encode()).hexdigest()[:16]
    store = cache_dir() / "data-size" / f"{key}.json"
    try:
        return DataSize.model_validate_json(store.read_text())
    except (OSError, ValueError):
        pass
    size = measure_size(recipe, data_path, max_length, model_path)
    store_in_cache(store, size.model_dump_json())
    return size


def batch_order(prompts: list[str]) -> list[int]:
    """The prompts' indices in generation order (launcher.evaluate.generations): longest first, so batches hold
    similar lengths and little padding. Here, beside the data, because the plan's time model (measure_size) orders the
    evaluation's reference answers the same way without importing the evaluation."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def measure_size(recipe: Recipe, data_path: str | None, max_length: int, model_path: str | None):
    """The training data's size for the plan's time prediction (launcher.timing.DataSize).

    Counted with the model's tokenizer file (the `tokenizers` library: about 0.1 s for GSM8K's 7,473 samples,
    where transformers' tokenizer would load and encode in seconds) when one is at hand, else estimated from the
    characters. Either way without truncation's details: the run's pre-flight report has the exact count."""
    from launcher.timing import DataSize

    train, evals = build_examples(recipe, data_path)
    if not train:
        raise DataError("no training sample. Fix: check data.path and data.max_samples.")
    parts = [_text_parts(ex, recipe.data.prompt_format) for ex in train]
    eval_parts = [_text_parts(ex, recipe.data.prompt_format) for ex in evals]
    tokenizer_file = _tokenizer_file(model_path)
    if tokenizer_file is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_file))
        # A tokenizer.json may carry its own padding (SmolLM2's pads every batch to its longest member) and
        # truncation: either would count each sample at another sample's length. The plan wants each sample's own.
        tok.no_padding()
        tok.no_truncation()

        def count(texts: list[str]) -> list[int]:
            return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)] if texts else []

        how = f"counted with the model's tokenizer ({len(train)} samples)"
    else:
        import re

        def count(texts: list[str]) -> list[int]:
            return [round(len(re.findall(r"\d", t)) + len(re.sub(r"\d", "", t)) / CHARS_PER_TOKEN) for t in texts]

        how = (f"estimated from the data's characters (digits one token each, other text {CHARS_PER_TOKEN} characters "
               f"per token: the model's tokenizer is not at hand; {len(train)} samples)")
    extra = [n for _, _, n in parts]
    prompts = count([q for q, _, _ in parts])
    answers = [n + 1 for n in count([a for _, a, _ in parts])]  # + EOS
    tokens = [min(max_length, q + a + e) for q, a, e in zip(prompts, answers, extra)]
    eval_tokens = [n + e for n, (_, _, e) in zip(count([q for q, _, _ in eval_parts]), eval_parts)]
    # The evaluation items' own reference answers (+ EOS), in the order the evaluation generates them: a trained
    # model answers about as long as the answers it was trained on, and a batch decodes until its longest ends.
    eval_answers = [n + 1 for n in count([a for _, a, _ in eval_parts])]
    order = batch_order([q for q, _, _ in eval_parts])
    return DataSize(samples=len(train), tokens=sum(tokens), trainable_tokens=sum(min(a, t) for a, t in zip(answers, tokens)),
                    answer_tokens_max=max(answers), eval_items=len(evals),
                    eval_prompt_tokens=round(sum(eval_tokens) / max(1, len(eval_tokens))),
                    eval_prompt_tokens_max=max(eval_tokens, default=0),
                    eval_answer_tokens=[eval_answers[i] for i in order] if evals else None,
                    sample_tokens_max=max(tokens), source=how)


def _tokenizer_file(model_path: str | None) -> Path | None:
    """tokenizer.json of a local model directory, or of a Hub model already in the local cache (no network)."""
    if model_path is None:
        return None
    local = Path(model_path).expanduser() / "tokenizer.json"
    if local.is_file():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_path, "tokenizer.json")
    except Exception:  # not a Hub id, or an unreadable cache: estimated from characters instead
        return None
    return Path(cached) if isinstance(cached, str) else None


def _text_parts(ex, prompt_format: str) -> tuple[str, str, int]:
    """(prompt text, answer text, template tokens) of a built-in task's example or a chat row."""
    if getattr(ex, "text", None) is not None:  # a plain-text chat row trains on all of it
        return "", ex.text, 0
    if getattr(ex, "messages", None) is not None:
        return (" ".join(c for _, c in ex.messages[:-1]), ex.messages[-1][1] if ex.messages else "",
                TEMPLATE_TOKENS_PER_MESSAGE * len(ex.messages))
    if prompt_format == "chat":
        return ex.question, " " + ex.target, 2 * TEMPLATE_TOKENS_PER_MESSAGE
    return format_prompt(ex.question, None, "plain"), " " + ex.target, 0
