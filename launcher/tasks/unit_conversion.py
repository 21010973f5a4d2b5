"""Unit conversion: a seeded question generator, target texts, and the judge.

Written by hand because no library generates this task. Units are defined by their size in one base
unit per dimension; a year is 365.2425 days, a month a twelfth of a year, data sizes are decimal
(1 KB = 1000 B), volumes are US liquid measures.
"""

from __future__ import annotations

import itertools
import math
import random
import re

from launcher.tasks import Example

# dimension -> [(abbreviation, singular, plural, size in the dimension's base unit)]
DAY = 86400.0
YEAR = 365.2425 * DAY
UNITS: dict[str, list[tuple[str, str, str, float]]] = {
    "time": [
        ("s", "second", "seconds", 1.0),
        ("min", "minute", "minutes", 60.0),
        ("h", "hour", "hours", 3600.0),
        ("d", "day", "days", DAY),
        ("wk", "week", "weeks", 7 * DAY),
        ("mo", "month", "months", YEAR / 12),
        ("yr", "year", "years", YEAR),
    ],
    "length": [
        ("mm", "millimeter", "millimeters", 0.001),
        ("cm", "centimeter", "centimeters", 0.01),
        ("m", "meter", "meters", 1.0),
        ("km", "kilometer", "kilometers", 1000.0),
        ("in", "inch", "inches", 0.0254),
        ("ft", "foot", "feet", 0.3048),
        ("yd", "yard", "yards", 0.9144),
        ("mi", "mile", "miles", 1609.344),
    ],
    "mass": [
        ("mg", "milligram", "milligrams", 1e-6),
        ("g", "gram", "grams", 0.001),
        ("kg", "kilogram", "kilograms", 1.0),
        ("t", "metric ton", "metric tons", 1000.0),
        ("oz", "ounce", "ounces", 0.028349523125),
        ("lb", "pound", "pounds", 0.45359237),
    ],
    "volume": [
        ("mL", "milliliter", "milliliters", 0.001),
        ("L", "liter", "liters", 1.0),
        ("tsp", "teaspoon", "teaspoons", 0.00492892159375),
        ("tbsp", "tablespoon", "tablespoons", 0.01478676478125),
        ("fl oz", "fluid ounce", "fluid ounces", 0.0295735295625),
        ("cup", "cup", "cups", 0.2365882365),
        ("pt", "pint", "pints", 0.473176473),
        ("qt", "quart", "quarts", 0.946352946),
        ("gal", "gallon", "gallons", 3.785411784),
    ],
    "speed": [
        ("m/s", "meter per second", "meters per second", 1.0),
        ("km/h", "kilometer per hour", "kilometers per hour", 1000 / 3600),
        ("mph", "mile per hour", "miles per hour", 1609.344 / 3600),
        ("kn", "knot", "knots", 1852 / 3600),
        ("ft/s", "foot per second", "feet per second", 0.3048),
    ],
    "data": [
        ("B", "byte", "bytes", 1.0),
        ("KB", "kilobyte", "kilobytes", 1e3),
        ("MB", "megabyte", "megabytes", 1e6),
        ("GB", "gigabyte", "gigabytes", 1e9),
        ("TB", "terabyte", "terabytes", 1e12),
    ],
}

# Factors outside this range give answers that round to 0 at 3 decimals, or numbers too long to be a
# fair test of a 135M model; such pairs are left out.
MIN_FACTOR, MAX_FACTOR = 0.01, 1e6

# {q} quantity, {a}/{A}: from-unit name/abbreviation, {b}/{B}: to-unit plural/abbreviation.
TRAIN_PHRASINGS = (
    "Convert {q} {a} to {b}.",
    "How many {b} are in {q} {a}?",
    "What is {q} {a} in {b}?",
    "{q} {a} equals how many {b}?",
    "Express {q} {a} in {b}.",
    "{q} {A} to {B}",
    "Please convert {q} {a} into {b}.",
    "How many {B} is {q} {A}?",
)
# Never used for training: accuracy on these is reported separately.
HELDOUT_PHRASINGS = (
    "I have {q} {a}. What is that in {b}?",
    "Change {q} {A} into {b}, please.",
    "{q} {a} is the same as how many {b}?",
)


def fmt(x: float, sig: int = 6) -> str:
    """A number as a model should write it: `sig` significant digits, no exponent, no trailing zeros."""
    if x == 0:
        return "0"
    digits = max(0, sig - 1 - math.floor(math.log10(abs(x))))
    text = f"{round(x, digits):.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# Targets write factors with 4 significant digits: within 0.05% of exact (0.1% for two), far inside the judge's
# 5% tolerance, and short enough for a small model to recall. The result is the calculator's for those factors.
FACTOR_DIGITS = 4
# Every unit is known by one fact, its size against its dimension's reference unit (`1 qt = 946.4 mL`); a
# conversion recalls at most two such facts (`1 qt = 946.4 mL and 1 tsp = 4.929 mL`). A model trained on one
# factor per unit pair (113 pairs) recalled a wrong one in 34 of 150 held-out questions, often a pair's
# neighbour (`1 gal = 8 pt` for gallons to teaspoons); 34 unit facts are each seen several times as often.
REFERENCE = {"time": "h", "length": "m", "mass": "g", "volume": "mL", "speed": "km/h", "data": "MB"}
SIZES = {u[0]: (dim, u[3]) for dim, units in UNITS.items() for u in units}


def unit_fact(unit: str) -> tuple[str, str, bool]:
    """The fact about a unit, stated from the larger of it and its reference unit so its number is >= 1:
    `1 qt = 946.4 mL`, `1 m = 39.37 in`. Returns (statement, the number's text, whether the unit is the larger)."""
    dim, size = SIZES[unit]
    ref = REFERENCE[dim]
    ratio = size / SIZES[ref][1]
    if ratio >= 1:
        return f"1 {unit} = {fmt(ratio, FACTOR_DIGITS)} {ref}", fmt(ratio, FACTOR_DIGITS), True
    return f"1 {ref} = {fmt(1 / ratio, FACTOR_DIGITS)} {unit}", fmt(1 / ratio, FACTOR_DIGITS), False


def conversion_steps(a: str, b: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The facts a conversion from a to b recalls, and the (operator, number) steps that apply them to the
    quantity: to the reference unit, then from it (one step when a or b is the reference)."""
    ref = REFERENCE[SIZES[a][0]]
    statements, steps = [], []
    if a != ref:
        statement, number, larger = unit_fact(a)
        statements.append(statement)
        steps.append(("*" if larger else "/", number))
    if b != ref:
        statement, number, larger = unit_fact(b)
        statements.append(statement)
        steps.append(("/" if larger else "*", number))
    return statements, steps


def target_text(reference: float, style: str, *, q: int | None = None, a: str = "", b: str = "",
                calculator: bool = False) -> str:
    """`7 qt in tsp: 1 qt = 946.4 mL and 1 tsp = 4.929 mL, so 7 * 946.4 / 4.929 = 1344.05 <answer>1344.05</answer>`;
    with `calculator` the arithmetic is annotated for launcher.calculator: `= <<7*946.4/4.929=1344.05>>1344.05`."""
    from launcher.calculator import annotate, calculate

    if style == "bare" or not a:
        return f"<answer>{fmt(reference, FACTOR_DIGITS)}</answer>"
    statements, steps = conversion_steps(a, b)
    expression = f"{q}" + "".join(op + number for op, number in steps)
    result = calculate(expression).result
    shown = f"{q} " + " ".join(f"{op} {number}" for op, number in steps)
    work = f"{shown} = {annotate(expression) if calculator else result}"
    # Restating quantity and both units first puts them right before the facts the model must recall.
    return f"{q} {a} in {b}: {' and '.join(statements)}, so {work} <answer>{result}</answer>"


# Training items that state one unit's fact on its own (every FACT_EVERY-th training item): recall practised
# apart from the arithmetic, both unit orders in the question, the larger unit first in the answer.
FACT_EVERY = 8
FACT_PHRASINGS = (
    "What is the conversion factor between {a} and {b}?",
    "How do {a} and {b} relate?",
)


def _combos() -> list[tuple[str, int, int, int]]:
    out = []
    for dim, units in UNITS.items():
        for i, j in itertools.permutations(range(len(units)), 2):
            factor = units[i][3] / units[j][3]
            if MIN_FACTOR <= factor <= MAX_FACTOR:
                out.extend((dim, i, j, q) for q in range(1, 11))
    return out


def _example(dim: str, i: int, j: int, q: int, phrasing: str, style: str, group: str, calculator: bool = False) -> Example:
    src, dst = UNITS[dim][i], UNITS[dim][j]
    factor = src[3] / dst[3]
    reference = q * factor
    question = phrasing.format(q=q, a=src[1] if q == 1 else src[2], A=src[0], b=dst[2], B=dst[0])
    return Example(question, target_text(reference, style, q=q, a=src[0], b=dst[0], calculator=calculator),
                   reference, group)


def _fact(unit: tuple[str, str, str, float], ref: tuple[str, str, str, float], swap: bool, phrasing: str) -> Example:
    statement, number, _ = unit_fact(unit[0])
    a, b = (ref, unit) if swap else (unit, ref)
    return Example(phrasing.format(a=a[2], b=b[2]), f"{statement} <answer>{number}</answer>", float(number), "fact")


def _round_robin(combos: list) -> list:
    """Interleave unit pairs so any prefix of the training list covers every pair about equally often."""
    by_pair: dict[tuple, list] = {}
    for combo in combos:
        by_pair.setdefault(combo[:3], []).append(combo)
    queues = list(by_pair.values())
    out = []
    for i in range(max(len(q) for q in queues)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def generate(train_size: int, eval_size: int, seed: int, style: str = "reasoning",
             calculator: bool = False) -> tuple[list[Example], list[Example]]:
    """Seeded train and held-out sets. They never share a (quantity, from-unit, to-unit) question.

    Held-out items use every phrasing; those with a phrasing never seen in training are marked
    group="unseen_phrasing". With reasoning targets every FACT_EVERY-th training item states one unit's fact
    on its own (units taken in turn). `calculator`: targets carry calculator annotations.
    """
    combos = _combos()
    rng = random.Random(seed)
    rng.shuffle(combos)
    if eval_size >= len(combos):
        raise ValueError(f"eval size {eval_size} leaves no training questions (only {len(combos)} exist)")
    held, rest = combos[:eval_size], _round_robin(combos[eval_size:])
    evals = []
    for n, combo in enumerate(held):
        # Every third held-out item uses an unseen phrasing, so both groups are large enough to report.
        if n % 3 == 2:
            phrasing, group = rng.choice(HELDOUT_PHRASINGS), "unseen_phrasing"
        else:
            phrasing, group = rng.choice(TRAIN_PHRASINGS), "seen_phrasing"
        evals.append(_example(*combo, phrasing, style, group, calculator))
    # Every FACT_EVERY-th item a unit's fact on its own (reasoning targets), the rest conversions; more conversions
    # than distinct combos: repeat combos with other phrasings.
    facts = train_size // FACT_EVERY if style == "reasoning" else 0
    conversions = [_example(*rest[n % len(rest)], rng.choice(TRAIN_PHRASINGS), style, "train", calculator)
                   for n in range(train_size - facts)]
    units = [(u, next(r for r in UNITS[dim] if r[0] == REFERENCE[dim])) for dim in UNITS for u in UNITS[dim]
             if u[0] != REFERENCE[dim]]
    rng.shuffle(units)
    train = []
    for k in range(facts):
        unit, ref = units[k % len(units)]
        train += conversions[k * (FACT_EVERY - 1):(k + 1) * (FACT_EVERY - 1)]
        # Both orders of naming the pair, taking turns as the list comes round again.
        train.append(_fact(unit, ref, (k // len(units)) % 2 == 1, FACT_PHRASINGS[k % len(FACT_PHRASINGS)]))
    train += conversions[facts * (FACT_EVERY - 1):]
    return train, evals


def parse_answer(text: str) -> float | None:
    """The value between the first <answer> and </answer> (or the end); None if it is not a number."""
    start = text.find("<answer>")
    if start < 0:
        return None
    body = text[start + len("<answer>"):]
    end = body.find("</answer>")
    if end >= 0:
        body = body[:end]
    try:
        value = float(body.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def is_correct(predicted: float | None, reference: float) -> bool:
    if predicted is None:
        return False
    p, r = round(predicted, 3), round(reference, 3)
    if r == 0:  # 5% of 0 is nothing: an answer that also rounds to 0 at 3 decimals is right
        return p == 0
    return abs(p - r) < 0.05 * abs(r)


_UNIT = "|".join(re.escape(a) for a in sorted(SIZES, key=len, reverse=True))
_PAIR = re.compile(rf"^\d+ ({_UNIT}) in ({_UNIT}):")
_STATEMENT = re.compile(rf"1 ({_UNIT}) = ([0-9][0-9,]*(?:\.[0-9]+)?) ({_UNIT})(?![A-Za-z/])")
# A stated factor within this of the true one is a right fact (targets round to 4 significant digits: 0.05%).
FACTOR_TOLERANCE = 0.005
ERROR_KINDS = ("correct", "no_answer", "wrong_factor", "wrong_product", "wrong")


def error_kind(example: Example, generated: str, correct: bool, parsed: float | None) -> str:
    """Why an answer is wrong. wrong_factor: a `1 U = N V` stated before the arithmetic is false (more than
    FACTOR_TOLERANCE off, or units of two dimensions), none is stated, or the statements leave out the question's
    from-unit or to-unit (a neighbour's fact); wrong_product: the facts are right and the answer is not;
    wrong: a wrong answer to a question whose units are unknown (a data file's bare targets)."""
    if correct:
        return "correct"
    if parsed is None:
        return "no_answer"
    pair = _PAIR.match(example.target)
    if pair is None:
        return "wrong"
    a, b = pair.groups()
    facts = _STATEMENT.findall(generated.split(", so ", 1)[0])
    if not facts:
        return "wrong_factor"
    for u, number, v in facts:
        if SIZES[u][0] != SIZES[v][0]:
            return "wrong_factor"
        try:
            n = float(number.replace(",", ""))
        except ValueError:
            return "wrong_factor"
        true = SIZES[u][1] / SIZES[v][1]
        if abs(n - true) > FACTOR_TOLERANCE * true:
            return "wrong_factor"
    named = {u for u, _, v in facts} | {v for u, _, v in facts}
    if a not in named or b not in named:
        return "wrong_factor"
    return "wrong_product"


def error_kinds(examples: list[Example], records: list[dict]) -> dict:
    """Each record's `error_kind` (error_kind), and their counts for eval.json."""
    counts = dict.fromkeys(ERROR_KINDS, 0)
    for ex, r in zip(examples, records):
        r["error_kind"] = error_kind(ex, r["generated"], r["correct"], r["parsed"])
        counts[r["error_kind"]] += 1
    return counts


def reference_from_answer(answer: object) -> float:
    """A data file's answer as a number: a number, a numeric string, or text with an <answer> tag."""
    if isinstance(answer, bool):
        raise ValueError("a boolean is not a numeric answer")
    if isinstance(answer, (int, float)):
        value = float(answer)
    elif isinstance(answer, str):
        tagged = parse_answer(answer)
        value = tagged if tagged is not None else float(answer.strip())
    else:
        raise ValueError(f"answer must be a number or a string, got {type(answer).__name__}")
    if not math.isfinite(value):  # json.loads reads NaN and Infinity; no generation can be scored against them
        raise ValueError("NaN or infinity is no answer a model can be scored against")
    return value


DEFAULT_MAX_LENGTH = (128, "a generated question with its reasoning target and calculator annotations is at most 119 tokens")


def load_file(path) -> list[Example]:
    """A JSON array of [question, answer] pairs. An answer already holding <answer> is the target as is."""
    import json
    from pathlib import Path

    from launcher.errors import DataError

    from launcher.jsonl import check_regular_file

    path = Path(path)
    check_regular_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to read. Fix: a JSON array of [question, answer] pairs.") from None
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
            reference = reference_from_answer(answer)
        except ValueError as exc:
            raise DataError(f"{path}: item {i} has answer {json.dumps(answer)[:60]}: {exc}. Fix: give a number.") from None
        target = answer if isinstance(answer, str) and "<answer>" in answer else target_text(reference, "bare")
        examples.append(Example(question, target, reference, "file"))
    return examples


def examples(recipe, data_path: str | None = None) -> tuple[list[Example], list[Example]]:
    """Generated questions, or the recipe's data files where given."""
    d, e = recipe.data, recipe.eval
    train, evals = generate(d.train_size, e.size, recipe.train.seed, d.target_style, d.calculator_annotations)
    if data_path or d.path:
        train = load_file(data_path or d.path)
    if e.path:
        evals = load_file(e.path)
    return train, evals


def eval_examples(recipe, data_path: str | None = None) -> list[Example]:
    """The held-out items alone (generated with the training set, which costs nothing; or eval.path)."""
    d, e = recipe.data, recipe.eval
    return load_file(e.path) if e.path else generate(d.train_size, e.size, recipe.train.seed, d.target_style,
                                                     d.calculator_annotations)[1]
