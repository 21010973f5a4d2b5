"""GSM8K: grade-school math word problems, judged by exact numeric match of the final answer.

Data comes from the Hub (`openai/gsm8k`, config `main`, through `datasets`) or from a local path: a
directory holding train.jsonl / test.jsonl, or a single JSONL file; each line {"question", "answer"}.
"""

from __future__ import annotations

import math

import re
from pathlib import Path

from launcher.errors import DataError
from launcher.jsonl import read_jsonl
from launcher.tasks import Example

# The official splits (MIT licence), shipped inside the package with their checksums: see SOURCE.md there.
BUNDLED = Path(__file__).resolve().parent / "data" / "gsm8k"
HUB_DATASET = ("openai/gsm8k", "main")  # the Hub dataset the bundled copy is a byte-for-byte copy of

# The longest of the 7,473 training samples (prompt + solution + EOS) is 466 tokens with the SmolLM2
# tokenizer (median 146); 512 keeps every answer whole.
DEFAULT_MAX_LENGTH = (512, "the longest GSM8K training sample is 466 tokens with the SmolLM2 tokenizer (median 146)")
# With data.calculator_annotations the solutions keep `<<48/2=24>>`: 543 tokens at most (median 178).
ANNOTATED_MAX_LENGTH = (576, "the longest GSM8K training sample with calculator annotations is 543 tokens with the "
                             "SmolLM2 tokenizer (median 178)")

_CALC = re.compile(r"<<[^>]*>>")
# A number: optional minus (not after a digit, so "10-4" is 10 and 4), optional $, thousands groups.
_NUMBER = re.compile(r"(?<!\d)-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<!\d)-?\$?\.\d+")


def clean_solution(answer: str) -> str:
    """The reference solution without calculator annotations: `5 * 3 = <<5*3=15>>15` -> `5 * 3 = 15`."""
    return _CALC.sub("", answer).strip()


def annotated_solution(answer: str) -> str:
    """The reference solution with its calculator annotations, each result written as launcher.calculator writes
    it at test time (`<<8*18=144.00>>` -> `<<8*18=144>>`), so training shows what decoding will see. An annotation
    the calculator declines or computes differently stays as written (none in the bundled training split)."""
    from launcher.calculator import EQUALS, calculate

    def normalise(match: re.Match) -> str:
        expression, sep, written = match.group(0)[2:-2].rpartition(EQUALS)
        result = calculate(expression).result if sep else None
        if result is None or _to_float(written) is None or not is_correct(float(result), _to_float(written)):
            return match.group(0)
        return f"<<{expression}={result}>>"

    return _CALC.sub(normalise, answer).strip()


def _to_float(token: str) -> float | None:
    text = token.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def _first_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return _to_float(found[0]) if found else None


def parse_answer(text: str) -> float | None:
    """The number after the last `####`; else after "The answer is"; else the last number in the text."""
    if "####" in text:
        value = _first_number(text.rsplit("####", 1)[1])
        if value is not None:
            return value
    match = list(re.finditer(r"[Tt]he (?:final )?answer is", text))
    if match:
        value = _first_number(text[match[-1].end():])
        if value is not None:
            return value
    return _last_number(text)


def is_correct(predicted: float | None, reference: float) -> bool:
    return predicted is not None and abs(predicted - reference) < 1e-6 * max(1.0, abs(reference))


ERROR_KINDS = ("correct", "no_answer", "wrong_arithmetic", "wrong_expressions", "wrong_unannotated")


def error_kind(generated: str, correct: bool, parsed: float | None) -> str:
    """Why an answer is wrong, read from its calculator annotations (`<<EXPR=RESULT>>`). wrong_arithmetic: some
    annotation's RESULT is not EXPR's value (written by the model: the calculator was off or declined);
    wrong_expressions: every annotation is right (or has no value: `<<2*x=6>>`), so the expressions (which numbers
    are combined how) are wrong;
    wrong_unannotated: no annotation to judge by (prose equations are too loosely written to check: a checker of
    `12 x 3 = 36` in prose flagged 204 of the 7,473 reference solutions)."""
    from launcher.calculator import EQUALS, calculate

    if correct:
        return "correct"
    if parsed is None:
        return "no_answer"
    annotations = [m.group(0)[2:-2].rpartition(EQUALS) for m in _CALC.finditer(generated)]
    if not annotations:
        return "wrong_unannotated"
    for expression, sep, written in annotations:
        value = calculate(expression).result if sep else None
        if value is None:  # no value to compare with (`<<2*x=6>>`, `<<1/0=0>>`): an expression problem
            continue
        got = _to_float(written)
        if got is None or not is_correct(got, float(value)):
            return "wrong_arithmetic"
    return "wrong_expressions"


def error_kinds(examples: list[Example], records: list[dict]) -> dict:
    """Each record's `error_kind` (error_kind), and their counts for eval.json."""
    counts = dict.fromkeys(ERROR_KINDS, 0)
    for r in records:
        r["error_kind"] = error_kind(r["generated"], r["correct"], r["parsed"])
        counts[r["error_kind"]] += 1
    return counts


def _example(row: dict, where: str, annotations: bool = False) -> Example:
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing or empty 'question'. Fix: each line needs {{\"question\": ..., \"answer\": ...}}.")
    if not isinstance(answer, str) or "####" not in answer:
        raise DataError(f"{where}: 'answer' must be a solution ending in '#### N'. Fix: use the GSM8K format.")
    reference = _first_number(answer.rsplit("####", 1)[1])
    if reference is None:
        raise DataError(f"{where}: the final answer after '####' is not a number. Fix: check the data.")
    if not math.isfinite(reference):  # a 400-digit answer became inf, which every reply would fail to match
        raise DataError(f"{where}: the final answer after '####' is too large to compare ({answer.rsplit('####', 1)[1].strip()[:40]}...). "
                        "Fix: check the data.")
    return Example(question.strip(), annotated_solution(answer) if annotations else clean_solution(answer), reference)


def load_file(path: str | Path, annotations: bool = False) -> list[Example]:
    """A JSONL file of {"question", "answer"}; errors name the file and line. `annotations`: targets keep the
    calculator annotations (data.calculator_annotations)."""
    out = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object with 'question' and 'answer'.")
        out.append(_example(row, f"{path}:{n}", annotations))
    if not out:
        raise DataError(f"{path}: no examples in the file.")
    return out


def _load_split(path: str | None, split: str, dataset: str, config: str | None, annotations: bool = False) -> list[Example]:
    if path:
        p = Path(path)
        if p.is_dir():
            p = p / f"{split}.jsonl"
        if p.resolve().parent == BUNDLED:
            verify_bundled(p)
        return load_file(p, annotations)
    return load_hub(dataset, config, split, annotations)


def verify_bundled(path: Path) -> None:
    """The bundled split is byte for byte the official one (its sha256 in SHA256SUMS), or a DataError."""
    import hashlib

    sums = dict(reversed(line.split()) for line in (BUNDLED / "SHA256SUMS").read_text().splitlines() if line.strip())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if sums.get(path.name) != digest:
        raise DataError(f"{path}: sha256 {digest[:16]}... does not match SHA256SUMS; the bundled GSM8K copy was changed. "
                        "Fix: reinstall sftlaunch, or set data.path to your own copy.")


def load_hub(dataset: str, config: str | None, split: str, annotations: bool = False) -> list[Example]:
    """A split through `datasets.load_dataset` (the Hub, or a local dataset repository)."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # datasets raises many types for "not reachable / not found"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data.dataset={dataset}: cannot load split '{split}' ({first}). Fix: check the network, "
                        "or point data.path at a local copy (a folder with train.jsonl and test.jsonl).") from None
    return [_example(row, f"{dataset}[{split}][{i}]", annotations) for i, row in enumerate(ds)]


def examples(recipe, data_path: str | None = None) -> tuple[list[Example], list[Example]]:
    """Train and test examples from data_path (the plan's data source: data.path or the bundled copy), else the Hub."""
    d = recipe.data
    evals = eval_examples(recipe, data_path)
    return _load_split(data_path or d.path, "train", d.dataset, d.dataset_config, d.calculator_annotations), evals


def eval_examples(recipe, data_path: str | None = None) -> list[Example]:
    """The test split alone (sftlaunch eval and export need no training data)."""
    d, e = recipe.data, recipe.eval
    path = data_path or d.path
    if e.path:
        return _load_split(e.path, "test", d.dataset, d.dataset_config, d.calculator_annotations)
    if path and Path(path).is_file():
        raise DataError(f"data.path={path} is one file, used for training; say which data to evaluate on. "
                        "Fix: set eval.path (a JSONL file or a folder with test.jsonl).")
    return _load_split(path, "test", d.dataset, d.dataset_config, d.calculator_annotations)
