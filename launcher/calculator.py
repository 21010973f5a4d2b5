"""Calculator-augmented decoding (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"):
a model trained on solutions annotated `48/2 = <<48/2=24>>24` writes `<<EXPR=`, an exact calculator writes
`RESULT>>`, and generation goes on from there.

Two parts, both written by hand: `calculate` (no library evaluates untrusted arithmetic safely and exactly:
`eval` runs code, `ast.literal_eval` does no arithmetic, and floats would write 0.1+0.2 as
0.30000000000000004), and `CalculatorProcessor`, a transformers LogitsProcessor that forces the result's
tokens row by row inside the batched greedy loop of launcher.evaluate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from fractions import Fraction
from functools import lru_cache

OPEN, EQUALS, CLOSE = "<<", "=", ">>"
# Bounds that keep every calculation small and quick, whatever the model writes. GSM8K's longest annotation
# is 36 characters, its largest value below 10^9; unit conversion's stay under 30 characters.
MAX_EXPRESSION_CHARS = 120
MAX_MAGNITUDE = 10 ** 15     # any intermediate or final value beyond this: declined
MAX_DENOMINATOR = 10 ** 18   # exact fractions with longer denominators: declined
MAX_EXPONENT = 12            # `a ** b` with an integer 0 <= b <= 12 only
MAX_NESTING = 16             # parentheses and unary signs in a row
# A result that ends within RESULT_DECIMALS decimals is written exactly; any other (10/3) is rounded half-even to
# RESULT_DIGITS significant digits. Trailing zeros are dropped, an integer has no decimal point (GSM8K writes
# `<<48/2=24>>`, never 24.0).
RESULT_DECIMALS = 6
RESULT_DIGITS = 6
# Marks around the text the calculator wrote, in predictions.jsonl's `calculator.marked` (never in `generated`).
MARK_OPEN, MARK_CLOSE = "\u27e6", "\u27e7"

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<number>\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\$?\.\d+)(?P<percent>%)?
    | (?P<op>\*\*|//|[-+*/()])
    )""", re.VERBOSE | re.ASCII)


class Declined(Exception):
    """The calculator does not answer this expression; the model's own tokens stay."""


@dataclass(frozen=True)
class Calculation:
    result: str | None  # the text written after `=`, or None when declined
    reason: str = ""    # why it was declined


@lru_cache(maxsize=4096)
def calculate(expression: str) -> Calculation:
    """EXPR of `<<EXPR=` as the result's text, or a declined Calculation with the reason. Never raises."""
    try:
        return Calculation(format_result(_evaluate(expression)))
    except Declined as exc:
        return Calculation(None, str(exc))


def _tokens(expression: str) -> list[str]:
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise Declined(f"longer than {MAX_EXPRESSION_CHARS} characters")
    out, pos, text = [], 0, expression.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise Declined(f"unexpected character {text[pos:].lstrip()[:1]!r}")
        if m.group("number"):
            out.append(m.group("number") + (m.group("percent") or ""))
        else:
            out.append(m.group("op"))
        pos = m.end()
    if not out:
        raise Declined("empty expression")
    return out


def _number(token: str) -> Fraction:
    percent = token.endswith("%")
    text = token.rstrip("%").replace("$", "").replace(",", "")
    value = Fraction(text.rstrip(".") or "0")
    return value / 100 if percent else value


def _check(value: Fraction) -> Fraction:
    if abs(value) > MAX_MAGNITUDE:
        raise Declined(f"a value beyond {MAX_MAGNITUDE:.0e}")
    if value.denominator > MAX_DENOMINATOR:
        raise Declined("a fraction too long to be exact")
    return value


def _evaluate(expression: str) -> Fraction:
    """Recursive descent over + - * / // ** ( ) and unary signs, in exact fractions, every value bounded."""
    tokens = _tokens(expression)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr(depth: int) -> Fraction:
        value = term(depth)
        while peek() in ("+", "-"):
            value = _check(value + term(depth) if take() == "+" else value - term(depth))
        return value

    def term(depth: int) -> Fraction:
        value = unary(depth)
        while peek() in ("*", "/", "//"):
            op = take()
            if op == "*":
                value = _check(value * unary(depth))
            else:
                divisor = unary(depth)
                if divisor == 0:
                    raise Declined("division by zero")
                value = _check(value / divisor if op == "/" else Fraction(value // divisor))
        return value

    def unary(depth: int) -> Fraction:
        if depth > MAX_NESTING:
            raise Declined(f"nested deeper than {MAX_NESTING}")
        if peek() in ("+", "-"):
            return -unary(depth + 1) if take() == "-" else unary(depth + 1)
        return power(depth)

    def power(depth: int) -> Fraction:
        base = atom(depth)
        if peek() != "**":
            return base
        take()
        exponent = unary(depth + 1)
        if exponent.denominator != 1 or not 0 <= exponent <= MAX_EXPONENT:
            raise Declined(f"an exponent other than an integer from 0 to {MAX_EXPONENT}")
        if base != 0 and int(exponent) * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
            raise Declined(f"a value beyond {MAX_MAGNITUDE:.0e}")
        return _check(base ** int(exponent))

    def atom(depth: int) -> Fraction:
        token = peek()
        if token is None:
            raise Declined("the expression ends early")
        if token == "(":
            take()
            value = expr(depth + 1)
            if peek() != ")":
                raise Declined("an unclosed parenthesis")
            take()
            return value
        if token[0].isdigit() or token[0] in "$.":
            take()
            return _check(_number(token))
        raise Declined(f"unexpected {token!r}")

    value = expr(0)
    if pos != len(tokens):
        raise Declined(f"unexpected {tokens[pos]!r}")
    return value


def format_result(value: Fraction) -> str:
    """As GSM8K's annotations write results: `24`, `0.5`, `-7`, `2.1336`; repeating decimals rounded (`3.33333`)."""
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec = 60
        exact = Decimal(value.numerator) / Decimal(value.denominator)
        if Fraction(exact.quantize(Decimal(1).scaleb(-RESULT_DECIMALS))) == value:
            rounded = exact.quantize(Decimal(1).scaleb(-RESULT_DECIMALS))
        else:
            places = RESULT_DIGITS - 1 - exact.copy_abs().adjusted()
            if places > 2 * RESULT_DECIMALS:
                raise Declined(f"a value too close to 0 ({RESULT_DIGITS} significant digits need more than "
                               f"{2 * RESULT_DECIMALS} decimals)")
            rounded = exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)
    text = format(rounded, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def annotate(expression: str) -> str:
    """`<<EXPR=RESULT>>RESULT` for a training target; the expression must be one the calculator answers."""
    calc = calculate(expression)
    if calc.result is None:
        raise ValueError(f"the calculator declines {expression!r}: {calc.reason}")
    return f"{OPEN}{expression}{EQUALS}{calc.result}{CLOSE}{calc.result}"


def pending(text: str) -> tuple[str, str] | None:
    """What the calculator must still write at the end of `text`: (expression, the result text plus `>>` not yet
    written), or None: no open `<<EXPR=` at the end, the calculator declines EXPR, or the model already wrote
    something after `=` that is not the start of the result (its own tokens stay)."""
    start = text.rfind(OPEN)
    if start < 0:
        return None
    inside = text[start + len(OPEN):]
    if CLOSE in inside or EQUALS not in inside:
        return None
    expression, _, written = inside.partition(EQUALS)
    calc = calculate(expression)
    if calc.result is None:
        return None
    wanted = calc.result + CLOSE
    if not wanted.startswith(written) or written == wanted:
        return None
    return expression, wanted[len(written):]


@dataclass
class CalculatorProcessor:
    """A LogitsProcessor for greedy decoding: in each row whose text ends inside `<<EXPR=RESULT>>` it leaves only
    the next token of RESULT>> possible, so the calculator, not the model, writes the result; rows are independent.

    `rows` maps the batch's rows to the caller's item numbers (launcher.evaluate drops finished rows between
    generate calls); `forced[item]` collects the positions (counted from the first generated token) of the
    tokens the calculator wrote. Stateless otherwise: each step reads the row's own tokens.
    """

    tokenizer: object
    prompt_length: int
    rows: list[int]
    forced: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        # Token ids whose text holds '<': a row without one has no open annotation to finish. Read from the
        # vocabulary's token strings ('<' is itself in byte-level BPE and SentencePiece vocabularies alike).
        self._lt = {i for token, i in self.tokenizer.get_vocab().items() if "<" in token}
        self._eos = self.tokenizer.eos_token_id
        self._first_token = lru_cache(maxsize=4096)(
            lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"][0])

    def __call__(self, input_ids, scores):
        for r, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            token = self.next_token(ids)
            if token is not None:
                scores[r, :] = -math.inf
                scores[r, token] = 0.0
                self.forced.setdefault(self.rows[r], []).append(len(ids))
        return scores

    def next_token(self, ids: list[int]) -> int | None:
        """The token the calculator writes next after the generated tokens `ids`, or None."""
        if self._eos in ids:
            return None
        last = next((k for k in range(len(ids) - 1, -1, -1) if ids[k] in self._lt), None)
        if last is None:
            return None
        # One token before the last '<' too: `<<` may be split over two tokens.
        todo = pending(self.tokenizer.decode(ids[max(0, last - 1):], skip_special_tokens=True))
        return None if todo is None else self._first_token(todo[1])


def marked(tokenizer, ids: list[int], forced: list[int]) -> str:
    """The generated text with what the calculator wrote between MARK_OPEN and MARK_CLOSE."""
    from itertools import groupby

    forced_at = set(forced)
    out = []
    for is_forced, run in groupby(range(len(ids)), key=lambda k: k in forced_at):
        text = tokenizer.decode([ids[k] for k in run], skip_special_tokens=True)
        out.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if is_forced else text)
    return "".join(out)


def calls(forced: list[int]) -> int:
    """How many results the calculator wrote: runs of consecutive forced positions."""
    positions = sorted(forced)
    return sum(1 for k, p in enumerate(positions) if k == 0 or p != positions[k - 1] + 1)
