"""Generation metrics for the chat task (eval.metrics): each reply against its reference, one bool per metric.

exact     equal after whitespace normalisation
contains  the normalised reference appears in the normalised reply
numeric   the last number of the reply equals the reference's last number, within eval.rel_tol
regex     eval.answer_regex's one group, from reply and reference, equal after normalisation
judge     eval.judge = 'package.module:function', imported (never `eval` of a string) and called with
          (reply, reference, row); it returns a bool

The comparison of base and trained (accuracy, Wilson intervals, McNemar) is launcher.evaluate.compare's,
applied to each metric in turn.
"""

from __future__ import annotations

import importlib
import math
import re

from launcher.errors import DataError
from launcher.evaluate import metrics as summary
from launcher.tasks.gsm8k import _last_number  # the number syntax GSM8K's judge already handles: -3, $1,000, .5

NAMES = ("exact", "contains", "numeric", "regex", "judge")


def normalise(text: str) -> str:
    return " ".join(text.split())


def load_judge(spec: str):
    """The function named by 'package.module:function'; a DataError that names the key when it cannot be had."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while it loads
        raise DataError(f"eval.judge={spec}: cannot import {module_name} ({type(exc).__name__}: {exc}). Fix: make the "
                        "module importable from the folder sftlaunch runs in (or on PYTHONPATH), or remove judge from "
                        "eval.metrics.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f"eval.judge={spec}: {module_name} has no function {attr!r}. Fix: name a function defined there.")
    return fn


class Metrics:
    """The metrics of eval.metrics, with their settings; the first one is the run's accuracy."""

    def __init__(self, names: list[str], rel_tol: float = 0.0, answer_regex: str | None = None, judge: str | None = None):
        self.names, self.rel_tol = list(names), rel_tol
        self.regex = re.compile(answer_regex) if answer_regex else None
        self.judge_spec = judge
        self.judge = load_judge(judge) if "judge" in names else None

    @classmethod
    def from_recipe(cls, recipe) -> "Metrics":
        e = recipe.eval
        return cls(e.metrics, e.rel_tol, e.answer_regex, e.judge)

    def check_references(self, examples) -> None:
        """References a metric cannot read (no number, no regex match): found before a model loads."""
        for ex in examples:
            if ex.reference is None:
                raise DataError(f"{ex.where}: text: a plain-text row has no reference answer, so eval.metrics="
                                f"{self.names} cannot score it. Fix: eval.metrics=[] (the held-out loss only), or "
                                "evaluate on conversations (eval.path).")
            if "numeric" in self.names and _last_number(ex.reference) is None:
                raise DataError(f"{ex.where}: the reference (last assistant turn) has no number for the numeric metric: "
                                f"{ex.reference[:80]!r}. Fix: remove numeric from eval.metrics, or fix the row.")
            if self.regex is not None and self.regex.search(ex.reference) is None:
                raise DataError(f"{ex.where}: eval.answer_regex={self.regex.pattern!r} does not match the reference "
                                f"(last assistant turn) {ex.reference[:80]!r}. Fix: change eval.answer_regex so that it "
                                "matches every reference.")

    def one(self, name: str, reply: str, ex) -> tuple[bool, object]:
        """(correct, what was read from the reply) for one metric."""
        reference = ex.reference
        if name == "exact":
            got = normalise(reply)
            return got == normalise(reference), got or None
        if name == "contains":
            got = normalise(reply)
            return bool(got) and normalise(reference) in got, got or None
        if name == "numeric":
            got, want = _last_number(reply), _last_number(reference)
            ok = got is not None and want is not None and (
                got == want if self.rel_tol == 0 else math.isclose(got, want, rel_tol=self.rel_tol))
            return ok, got
        if name == "regex":
            m, w = self.regex.search(reply), self.regex.search(reference)
            got = normalise(m.group(1) or "") if m else None
            return got is not None and w is not None and got == normalise(w.group(1) or ""), got
        if name == "judge":
            try:
                verdict = self.judge(reply, reference, ex.as_row())
            except Exception as exc:  # the user's code: any error is theirs to see, with the item it failed on
                raise DataError(f"eval.judge={self.judge_spec} raised {type(exc).__name__}: {exc} on {ex.where}. Fix: "
                                "make the judge handle every reply (return False for a wrong one).") from None
            if not isinstance(verdict, bool):
                raise DataError(f"eval.judge={self.judge_spec} returned {type(verdict).__name__} ({verdict!r:.40}) on "
                                f"{ex.where}, not True or False. Fix: return a bool.")
            return verdict, verdict
        raise KeyError(name)

    def score(self, examples, generated: list[str]) -> tuple[dict, list[dict]]:
        """Metrics over all items (accuracy: the first metric's) and one prediction record per item."""
        if len(generated) != len(examples):
            raise DataError(f"{len(generated)} generations for {len(examples)} items. Fix: one generation per item, in order.")
        records = []
        for ex, reply in zip(examples, generated):
            results = {name: self.one(name, reply, ex) for name in self.names}
            first = results[self.names[0]]
            records.append({"question": ex.question, "reference": ex.reference, "generated": reply, "parsed": first[1],
                            "correct": first[0], "metrics": {k: v[0] for k, v in results.items()}, "group": ex.group})
        out = summary(records)
        out["metrics"] = {name: sum(r["metrics"][name] for r in records) / len(records) if records else 0.0
                          for name in self.names}
        return out, records
