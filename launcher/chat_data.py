"""Your own data for the chat task: files in the standard formats -> validated conversations, and the held-out split.

Formats (detected per file from the first row's keys, or data.format):
  messages           {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  prompt_completion  {"prompt": ..., "completion": ...}, strings or message lists
  alpaca             {"instruction", "input" (optional), "output"} (and an optional "system")
  sharegpt           {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
  text               {"text": ...} (continued pre-training: a loss on every token)

Every row is checked here, in the launcher, before a model loads: a bad row stops the run with the file,
the line (or row), the key and the fix. Files are read row by row with a bound on a row's size, so a 10 MB
line is an error rather than a memory spike. JSONL and CSV are read with the standard library rather than
`datasets`: its JSON loader reports neither the line of a bad row nor which rows mix formats.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# One row at most this big: 131,072 tokens (the largest data.max_length) are about 0.5 MB of text, so a
# larger row cannot be trained whole; 2 MiB leaves room for markup and non-Latin scripts.
MAX_ROW_BYTES = 2 * 1024 * 1024
ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "ipython")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}

# Each format: (required keys, optional keys).
FORMATS = {
    "messages": ({"messages"}, set()),
    "prompt_completion": ({"prompt", "completion"}, set()),
    "alpaca": ({"instruction", "output"}, {"input", "system"}),
    "sharegpt": ({"conversations"}, {"system"}),
    "text": ({"text"}, set()),
}


@dataclass(frozen=True)
class ChatExample:
    """One row: a conversation (role, content) pairs, or plain text; where it came from; its content hash."""

    messages: tuple[tuple[str, str], ...]
    text: str | None
    where: str  # "FILE:LINE" or "FILE: row N", for error messages
    key: str  # sha256 of the content: the split and the duplicate check use it
    group: str = "all"

    @property
    def question(self) -> str:
        """What the model is asked (the last user turn), as predictions.jsonl shows it."""
        if self.text is not None:
            return self.text[:200]
        users = [c for r, c in self.messages[:-1] if r == "user"]
        return users[-1] if users else ""

    @property
    def reference(self) -> str | None:
        """The last assistant turn: the answer generation metrics compare the reply with."""
        return self.messages[-1][1] if self.messages else None

    target = reference

    @property
    def prompt_messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages[:-1]]

    def as_row(self) -> dict:
        """The row as the judge sees it: {"messages": [...]}, or {"text": ...}."""
        if self.text is not None:
            return {"text": self.text}
        return {"messages": [{"role": r, "content": c} for r, c in self.messages]}


@dataclass(frozen=True)
class FileFormat:
    file: str
    format: str
    rows: int
    reason: str


def _fail(where: str, key: str, message: str, fix: str):
    raise DataError(f"{where}: {key}: {message}. Fix: {fix}.")


# ---------------------------------------------------------------------------------------------- reading files

def data_files(path: str | list[str], key: str = "data.path") -> list[Path]:
    """The files behind data.path: a file, a list of files, or every data file in a folder (sorted)."""
    out = []
    for item in [path] if isinstance(path, str) else path:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise DataError(f"{key}={item}: the folder holds no {', '.join(SUFFIXES)} file. Fix: put the data "
                                "files there, or point the key at a file.")
            out += found
        elif not p.exists():
            raise DataError(f"{key}={item}: no such file or folder. Fix: check the path (relative paths start from "
                            "the folder sftlaunch runs in).")
        else:
            if p.suffix.lower() not in SUFFIXES:
                raise DataError(f"{key}={item}: unknown file type '{p.suffix}'. Fix: use {', '.join(SUFFIXES)}.")
            out.append(p)
    return out


def read_rows(path: Path):
    """(where, row dict) for each row of one file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".json" and _starts_with(path, b"["):
        yield from _json_array_rows(path)
    else:
        yield from _jsonl_rows(path)


def _starts_with(path: Path, char: bytes) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == char


def _jsonl_rows(path: Path):
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(MAX_ROW_BYTES + 1)
            if not raw:
                return
            n += 1
            where = f"{path}:{n}"
            if len(raw) > MAX_ROW_BYTES:
                _fail(where, "line", f"longer than {MAX_ROW_BYTES // 1024 // 1024} MiB", "split the row (no training "
                      "sample can use that much text) or remove it")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _fail(where, "line", f"not UTF-8 (byte {exc.start} of the line is 0x{raw[exc.start]:02x})",
                      "save the file as UTF-8")
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                _fail(where, "line", f"not JSON ({exc.msg}, column {exc.colno})", "write one JSON object per line")
            if not isinstance(row, dict):
                _fail(where, "line", f"a JSON {type(row).__name__}, not an object", 'write one object per line, e.g. '
                      '{"messages": [...]}')
            yield where, row


def _json_array_rows(path: Path):
    raw = path.read_bytes()
    try:
        items = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        _fail(str(path), "file", f"not UTF-8 (byte {exc.start})", "save the file as UTF-8")
    except json.JSONDecodeError as exc:
        _fail(f"{path}:{exc.lineno}", "file", f"not JSON ({exc.msg}, column {exc.colno})", "fix the JSON syntax")
    if not isinstance(items, list):
        _fail(str(path), "file", "not a JSON array of objects", "write [{...}, {...}] or one object per line (JSONL)")
    for i, row in enumerate(items, 1):
        where = f"{path}: item {i}"
        if not isinstance(row, dict):
            _fail(where, "item", f"a JSON {type(row).__name__}, not an object", "make every item an object")
        if len(json.dumps(row, ensure_ascii=False)) > MAX_ROW_BYTES:
            _fail(where, "item", f"longer than {MAX_ROW_BYTES // 1024 // 1024} MiB", "split the row or remove it")
        yield where, row


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a file that is not Parquet
        _fail(str(path), "file", f"not a Parquet file ({exc})", "write it with pandas.DataFrame.to_parquet or pyarrow")
    n = 0
    # Batches of rows: a large file is never materialised whole.
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            # A null optional column (alpaca's input) is an absent key, as in JSONL.
            yield f"{path}: row {n}", {k: v for k, v in row.items() if v is not None}


def _csv_rows(path: Path):
    import csv
    import sys

    csv.field_size_limit(min(sys.maxsize, MAX_ROW_BYTES))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    _fail(where, "row", "has more fields than the header", "quote fields that contain commas")
                yield where, {k: v for k, v in row.items() if v not in (None, "")}
        except UnicodeDecodeError as exc:
            _fail(f"{path}:{reader.line_num + 1}", "row", f"not UTF-8 (byte {exc.start} of the file)", "save the file as UTF-8")
        except csv.Error as exc:
            _fail(f"{path}:{reader.line_num}", "row", f"not CSV ({exc})", "fix the row, or use JSONL")


# ------------------------------------------------------------------------------------------ formats and rows

def detect_format(keys: set[str]) -> str | None:
    for name, (required, optional) in FORMATS.items():
        if required <= keys:
            return name
    return None


def _format_of(row: dict, where: str, forced: str) -> str:
    keys = set(row)
    name = forced if forced != "auto" else detect_format(keys)
    if name is None:
        _fail(where, ", ".join(sorted(keys)) or "(no keys)", "these keys match no format", "use messages, "
              "prompt+completion, instruction+output (alpaca), conversations (sharegpt) or text; or set data.format")
    required, optional = FORMATS[name]
    missing = sorted(required - keys)
    if missing:
        _fail(where, missing[0], f"missing, which a {name} row needs (data.format={forced})",
              f"add it, or set data.format to the rows' format")
    extra = sorted(keys - required - optional)
    if extra:
        _fail(where, extra[0], f"a key (or column) that a {name} row does not have", f"remove it; a {name} row has "
              f"{', '.join(sorted(required | optional))}")
    return name


def _text(value, where: str, key: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        _fail(where, key, f"must be a string, got {type(value).__name__}", "write the text as a JSON string")
    if not allow_empty and not value.strip():
        _fail(where, key, "is empty", "give it text, or remove the row")
    return value


def _messages(items, where: str, key: str, role_key: str = "role", content_key: str = "content",
              roles: dict | None = None) -> list[tuple[str, str]]:
    if not isinstance(items, list):
        _fail(where, key, f"must be a list of turns, got {type(items).__name__}", f'write [{{"{role_key}": ..., '
              f'"{content_key}": ...}}, ...]')
    out = []
    for i, m in enumerate(items):
        k = f"{key}[{i}]"
        if not isinstance(m, dict):
            _fail(where, k, f"must be an object, got {type(m).__name__}", f'write {{"{role_key}": ..., "{content_key}": ...}}')
        extra = sorted(set(m) - {role_key, content_key})
        if extra:
            _fail(where, f"{k}.{extra[0]}", "a key that a turn does not have here", f"remove it; a turn has {role_key} "
                  f"and {content_key} (tool calls are not supported)")
        role = m.get(role_key)
        if role is None:
            _fail(where, f"{k}.{role_key}", "missing", f"give each turn a {role_key}")
        if roles is not None:
            if role not in roles:
                _fail(where, f"{k}.{role_key}", f"unknown value {role!r}", f"use one of {', '.join(roles)}")
            role = roles[role]
        elif role in TOOL_ROLES:
            _fail(where, f"{k}.{role_key}", f"a {role!r} turn: tool and function turns are not supported (only system, "
                  "user and assistant turns are trained)", "remove those turns or the row")
        elif role not in ROLES:
            _fail(where, f"{k}.{role_key}", f"unknown role {role!r}", f"use one of {', '.join(ROLES)}")
        if content_key not in m:
            _fail(where, f"{k}.{content_key}", "missing", f"give each turn its {content_key}")
        out.append((role, _text(m[content_key], where, f"{k}.{content_key}")))
    return out


def _check_order(turns: list[tuple[str, str]], where: str, key: str) -> None:
    """An optional system turn, then user and assistant alternating, ending with an assistant turn."""
    if not turns:
        _fail(where, key, "has no turns", "give the conversation at least a user and an assistant turn")
    body = turns[1:] if turns[0][0] == "system" else turns
    if not any(r == "assistant" for r, _ in body):
        _fail(where, key, "has no assistant turn, so nothing to train on", "add the assistant's reply, or remove the row")
    for i, (role, _) in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            n = i + (len(turns) - len(body))
            _fail(where, f"{key}[{n}].role", f"is {role!r} where {expected!r} was expected: turns must alternate user, "
                  "assistant (after one optional system turn), as chat templates require",
                  "merge consecutive turns of one role, or fix the order")
    if body[-1][0] != "assistant":
        _fail(where, key, "ends with a user turn that has no reply", "end the conversation with the assistant's turn")


def to_example(fmt: str, row: dict, where: str) -> ChatExample:
    """One validated row in the canonical form."""
    if fmt == "text":
        text = _text(row["text"], where, "text")
        return ChatExample((), text, where, _hash(text))
    if fmt == "messages":
        turns = _messages(row["messages"], where, "messages")
        key = "messages"
    elif fmt == "sharegpt":
        turns = _messages(row["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES)
        if "system" in row:
            turns = [("system", _text(row["system"], where, "system"))] + turns
        key = "conversations"
    elif fmt == "alpaca":
        instruction = _text(row["instruction"], where, "instruction")
        extra = _text(row.get("input", ""), where, "input", allow_empty=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = ([("system", _text(row["system"], where, "system"))] if "system" in row else []) + \
            [("user", user), ("assistant", _text(row["output"], where, "output"))]
        key = "instruction"
    else:  # prompt_completion: strings, or message lists
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) != isinstance(completion, str):
            _fail(where, "completion" if isinstance(prompt, str) else "prompt", "is a message list while the other is "
                  "a string", "make both strings, or both message lists")
        if isinstance(prompt, str):
            turns = [("user", _text(prompt, where, "prompt")), ("assistant", _text(completion, where, "completion"))]
        else:
            head = _messages(prompt, where, "prompt")
            tail = _messages(completion, where, "completion")
            if not tail or any(r != "assistant" for r, _ in tail):
                _fail(where, "completion", "must hold assistant turns only", "move other turns into prompt")
            turns = head + tail
        key = "prompt"
    _check_order(turns, where, key)
    return ChatExample(tuple(turns), None, where, _hash(turns))


def _hash(content) -> str:
    # The content, not the format: one conversation written as alpaca and as messages is one row.
    return hashlib.sha256(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def load_file(path: Path, forced: str = "auto") -> tuple[list[ChatExample], FileFormat]:
    """Every row of one file, in one format; a row of another format is an error naming its line."""
    out, fmt, first = [], None, None
    for where, row in read_rows(path):
        this = _format_of(row, where, forced)
        if fmt is None:
            fmt, first = this, where
        elif this != fmt:
            _fail(where, ", ".join(sorted(row)), f"a {this} row, but the file's first row ({first}) is {fmt}: a file "
                  "holds one format", "convert the rows to one format, or split the file by format")
        out.append(to_example(fmt, row, where))
    if not out:
        raise DataError(f"{path}: the file holds no rows. Fix: add rows, or remove the file from data.path.")
    first_keys = sorted(FORMATS[fmt][0])
    reason = (f"set by data.format" if forced != "auto" else f"detected from the keys of its first row "
              f"({', '.join(first_keys)}, {first})")
    return out, FileFormat(str(path), fmt, len(out), reason)


def load(path: str | list[str], forced: str = "auto", key: str = "data.path") -> tuple[list[ChatExample], list[FileFormat]]:
    examples, formats = [], []
    for f in data_files(path, key):
        rows, fmt = load_file(f, forced)
        examples += rows
        formats.append(fmt)
    return examples, formats


def load_hub(dataset: str, config: str | None, split: str, forced: str = "auto") -> tuple[list[ChatExample], list[FileFormat]]:
    """A Hub dataset's split through `datasets` (where the Hub is reachable), rows checked as a file's are."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # datasets raises many types for "not reachable / not found"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data.dataset={dataset}: cannot load split '{split}' ({first}). Fix: check the network, or "
                        "point data.path at local files.") from None
    out, fmt = [], None
    for i, row in enumerate(ds, 1):
        where = f"{dataset}[{split}]: row {i}"
        this = _format_of({k: v for k, v in row.items() if v is not None}, where, forced)
        fmt = fmt or this
        out.append(to_example(fmt, {k: v for k, v in row.items() if v is not None}, where))
    if not out:
        raise DataError(f"data.dataset={dataset}[{split}] holds no rows. Fix: choose another split (data.split).")
    return out, [FileFormat(f"{dataset}[{split}]", fmt, len(out), "detected from the columns")]


# ------------------------------------------------------------------------------------------------ the split

@dataclass(frozen=True)
class Split:
    train: list[ChatExample]
    evals: list[ChatExample]
    held_out_not_evaluated: int  # on the held-out side beyond eval.limit: neither trained nor evaluated
    duplicates_removed: int  # training rows equal to a held-out row, removed from training
    source: str

    def as_dict(self) -> dict:
        return {"train_rows": len(self.train), "eval_rows": len(self.evals),
                "held_out_not_evaluated": self.held_out_not_evaluated,
                "duplicates_removed_from_training": self.duplicates_removed, "eval_source": self.source}


def held_out(example: ChatExample, fraction: float) -> bool:
    """Whether a row is on the held-out side: the first 64 bits of its content hash, as a share of 2^64.

    A function of the row alone, so appending rows never moves an existing row from one side to the other,
    and identical rows always land on the same side."""
    return int(example.key[:16], 16) < fraction * 2**64


def split(rows: list[ChatExample], fraction: float, limit: int | None, evals: list[ChatExample] | None = None) -> Split:
    """Training and held-out rows: the given evaluation rows (eval.path), else a content-hash share of rows."""
    if evals is not None:
        source = "eval.path"
        train = rows
    else:
        source = f"{fraction:g} of the rows by content hash (data.eval_fraction)"
        train = [r for r in rows if not held_out(r, fraction)]
        evals = [r for r in rows if held_out(r, fraction)]
    seen = {e.key for e in evals}
    kept = [r for r in train if r.key not in seen]
    over = max(0, len(evals) - limit) if limit else 0
    return Split(kept, evals[:limit] if limit else evals, over, len(train) - len(kept), source)
