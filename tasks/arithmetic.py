"""Synthetic multi-step integer arithmetic: problems whose every step and answer can be checked.

A problem is an expression over integers 0-99 with `+ - *` and parentheses, printed with
only the parentheses its tree needs, e.g. `(7+5)*3-4`. A solution reduces one innermost operation
per step and restates what is left; each step ends with the step delimiter and the last one boxes
the answer instead:

    7+5=12, so 12*3-4\\n\\n12*3=36, so 36-4\\n\\n36-4=32 \\boxed{32}

The restatement is a scratchpad: a small model finds the next operation in the text just written
instead of replaying every earlier substitution (without it, picking the wrong operands was most
of a 1.6M-parameter policy's errors). The checker accepts steps with or without it.

Every value of a generated problem stays in `[min_value, max_value]` (no division). Below zero
(`2-5+4`) the steps carry signed numbers (`2-5=-3, so -3+4`), which the checker reads. Splits
are assigned by a hash of the canonical expression, so train, validation and test never share a
problem whatever the seed or difficulty.

What a user may type is wider than the canonical text: `read_problem` takes any spacing,
redundant parentheses and a light question around the expression (`what is 2 + 3?`), within
what the shipped policy was trained for, and gives the canonical problem the search runs on.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from lodestar.orchestrator.algorithms.answers import canonicalize, final_answer

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
_SPLIT_BOUNDS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}
"""Percent buckets of the expression hash per split (80/10/10)."""

STEP_DELIMITER = "\n\n"
PROMPT_FORMAT = "Q: {expression}\nA:\n"
"""What the policy model sees before its solution (its chat template renders the same)."""

OPS = ("+", "-", "*")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}

Tree = int | tuple[str, "Tree", "Tree"]
"""A leaf value, or `(op, left, right)`."""


class ArithmeticProblemError(ValueError):
    """The text is not an expression of this task (names the text and what is wrong)."""


@dataclass(frozen=True)
class Difficulty:
    """The generator's knobs: operations per problem, operand range, bounds on every value.

    The defaults are the shipped task's domain, what a user types: operands 0-99, every value
    (leaves, intermediates, answer) within -999..999, so `3-5` and `4*(2-9)` are in it."""

    ops: int = 2
    min_operand: int = 0
    max_operand: int = 99
    max_value: int = 999
    min_value: int = -999

    def __post_init__(self) -> None:
        if self.ops < 1:
            raise ValueError(f"ops must be >= 1, got {self.ops}")
        if not 0 <= self.min_operand <= self.max_operand <= self.max_value:
            raise ValueError(
                "need 0 <= min_operand <= max_operand <= max_value, got "
                f"{self.min_operand}, {self.max_operand}, {self.max_value}"
            )
        if self.min_value > self.min_operand:
            raise ValueError(f"min_value must be <= min_operand, got {self.min_value}")


DEFAULT_OPS = (1, 2, 3, 4)
"""The default mix: equal shares of 1-4 operations at the default operands and values (the
shipped policy's accuracy per operation count is in models/arith-policy/README.md)."""


@dataclass(frozen=True)
class Problem:
    expression: str
    """Canonical text: minimal parentheses, no spaces."""
    tree: Tree = field(repr=False, compare=False)
    answer: int = field(compare=False)


# -- expressions --------------------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*()]))")


def parse_expression(text: str, *, signed: bool = False) -> Tree:
    """The tree of `text` under the usual precedence (`*` over `+ -`, left-associative).

    Raises `ArithmeticProblemError` for anything else: other symbols, unary minus, division,
    unbalanced parentheses, a bare number. With `signed`, a `-` right before a number where an
    operand is due is its sign (`-3+4`, `5--3`: a restatement once a value went negative).
    """
    tokens: list[str] = []
    pos, stripped = 0, text.rstrip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if m is None:
            raise ArithmeticProblemError(
                f"not an arithmetic problem: unexpected {stripped[pos:].lstrip()[:10]!r} in "
                f"{text!r}"
            )
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    if not tokens:
        raise ArithmeticProblemError(f"not an arithmetic problem: empty expression {text!r}")
    i = 0

    def fail(what: str) -> ArithmeticProblemError:
        return ArithmeticProblemError(f"not an arithmetic problem: {what} in {text!r}")

    def atom() -> Tree:
        nonlocal i
        if i >= len(tokens):
            raise fail("unexpected end")
        tok = tokens[i]
        i += 1
        if tok.isdigit():
            return int(tok)
        if signed and tok == "-" and i < len(tokens) and tokens[i].isdigit():
            i += 1
            return -int(tokens[i - 1])
        if tok == "(":
            node = expr()
            if i >= len(tokens) or tokens[i] != ")":
                raise fail("unbalanced parentheses")
            i += 1
            return node
        raise fail(f"unexpected {tok!r}")

    def term() -> Tree:
        nonlocal i
        node = atom()
        while i < len(tokens) and tokens[i] == "*":
            i += 1
            node = ("*", node, atom())
        return node

    def expr() -> Tree:
        nonlocal i
        node = term()
        while i < len(tokens) and tokens[i] in ("+", "-"):
            op = tokens[i]
            i += 1
            node = (op, node, term())
        return node

    tree = expr()
    if i != len(tokens):
        raise fail(f"unexpected {tokens[i]!r}")
    if isinstance(tree, int):
        raise fail("no operation")
    return tree


def format_expression(tree: Tree) -> str:
    """Text that parses back to exactly `tree`, with only the parentheses that requires."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    ls, rs = format_expression(left), format_expression(right)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        ls = f"({ls})"
    # Left-associative parsing: a right child of equal precedence needs parentheses too.
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        rs = f"({rs})"
    return f"{ls}{op}{rs}"


def apply_op(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def evaluate(tree: Tree) -> int:
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    return apply_op(op, evaluate(left), evaluate(right))


def _within(tree: Tree, low: int, high: int) -> bool:
    """Every value the tree computes (leaves and intermediates) lies in [low, high]."""
    if isinstance(tree, int):
        return low <= tree <= high
    _, left, right = tree
    return _within(left, low, high) and _within(right, low, high) and low <= evaluate(tree) <= high


@lru_cache(maxsize=65_536)
def _problem_from_canonical(expression: str) -> Problem:
    tree = parse_expression(expression)
    return Problem(expression=expression, tree=tree, answer=evaluate(tree))


def problem_from_text(text: str) -> Problem:
    """The problem for an expression text (any spacing or redundant parentheses).

    Raises `ArithmeticProblemError` when the text is not an expression of this task.
    """
    return _problem_from_canonical(format_expression(parse_expression(text)))


# -- what a user types ---------------------------------------------------------------------------
MAX_OPERAND = Difficulty().max_operand
MAX_OPS = max(DEFAULT_OPS)
MAX_VALUE = Difficulty().max_value
"""The shipped policy's domain, what it was trained on (models/arith-policy/README.md): what lies
beyond is refused at submit rather than searched."""
SHIPPED_DOMAIN = (
    f"the shipped arithmetic models take an expression of integers 0-{MAX_OPERAND} with + - * "
    f"and parentheses, 1-{MAX_OPS} operations, every value within +-{MAX_VALUE}, e.g. (7+5)*3-4"
)
"""What a client is told the shipped task accepts (after the reason it was refused)."""

_WRAPPING = re.compile(
    r"\s*(?:(?:what\s*(?:is|'s|\u2019s|s)|compute|calculate|evaluate|solve)\b\s*:?)?"
    r"(?P<expression>.*?)\s*=?\s*[?.!]?\s*",
    re.IGNORECASE | re.DOTALL,
)
"""A light question around an expression: `what is 2+3?`, `What's (7+5)*3?`, `Compute 2 + 3.`,
`2+3=`. Nothing else around it is read (`2+3, please` is refused: words beyond the wrapping)."""


class OutsideDomain(ArithmeticProblemError):
    """What a user typed is not a problem of this task; `reason` says why without quoting the
    text, so it is safe to show any client."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"not an arithmetic problem: {reason} in {text!r}")
        self.reason = reason


def extract_expression(text: str) -> str:
    """The expression inside a light question (`_WRAPPING`); the text itself when there is none."""
    m = _WRAPPING.fullmatch(text)
    return m.group("expression") if m is not None else text


def read_problem(text: str, *, bounded: bool = True) -> Problem:
    """The canonical problem in what a user typed: the expression inside a light question, with
    any spacing and redundant parentheses. With `bounded` it must also be within the shipped
    policy's domain (operands 0-MAX_OPERAND, 1-MAX_OPS operations, every value within
    +-MAX_VALUE; negative intermediate values and answers are fine). Raises `OutsideDomain`,
    whose `reason` never quotes the text.
    """
    expression = extract_expression(text)
    # Counted on the text, so a tree deeper than the stack is refused before it is built.
    ops, most = len(re.findall(r"[-+*]", expression)), MAX_OPS if bounded else MAX_CHECKED_OPS
    if ops > most:
        raise OutsideDomain(text, f"{ops} operations, at most {most}")
    if (parens := expression.count("(")) > MAX_CHECKED_OPS:
        raise OutsideDomain(text, f"{parens} parentheses, at most {MAX_CHECKED_OPS}")
    try:
        tree = parse_expression(expression)
    except ArithmeticProblemError:
        raise OutsideDomain(text, _why_not(expression)) from None
    if bounded and max(operands(tree)) > MAX_OPERAND:
        raise OutsideDomain(text, f"an operand over {MAX_OPERAND}")
    if bounded and not _within(tree, -MAX_VALUE, MAX_VALUE):
        raise OutsideDomain(text, f"a value beyond +-{MAX_VALUE}")
    return _problem_from_canonical(format_expression(tree))


MAX_CHECKED_OPS = 100
"""Operations (and opening parentheses) of any problem read here, shipped policy or not: the
tree is built and walked recursively, so a bigger one would overflow the stack, not be refused."""


def _why_not(expression: str) -> str:
    """Why `expression` does not parse, in words that do not quote it."""
    if not expression.strip():
        return "no expression"
    if re.search(r"[/\u00f7:]", expression):
        return "division"
    if re.search(r"\d\s*[.,]\s*\d", expression):
        return "a decimal number"
    if re.search(r"[^\W\d_]", expression):
        return "words beyond 'what is ...?'"
    if not _balanced(expression):
        return "unbalanced parentheses"
    if re.fullmatch(r"[\s()]*\d+[\s()]*", expression):
        return "no operation"
    if re.search(r"(?:^|[-+*(])\s*-", expression):
        return "a negative operand"
    return "not an expression"


def _balanced(expression: str) -> bool:
    depth = 0
    for c in expression:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def operands(tree: Tree) -> list[int]:
    """The leaves of `tree`, left to right."""
    if isinstance(tree, int):
        return [tree]
    return [*operands(tree[1]), *operands(tree[2])]


def _as_problem(problem: Problem | str) -> Problem:
    return problem if isinstance(problem, Problem) else problem_from_text(problem)


def format_problem(problem: Problem | str) -> str:
    """The plain-text prompt (`Q: <expr>\\nA:\\n`) for models without a chat template."""
    return PROMPT_FORMAT.format(expression=_as_problem(problem).expression)


# -- generation and splits ----------------------------------------------------------------------
def split_of(expression: str | Problem) -> Split:
    """The split a problem belongs to, from a hash of its canonical expression."""
    return _split_of_canonical(_as_problem(expression).expression)


def _split_of_canonical(expression: str) -> Split:
    bucket = int.from_bytes(hashlib.blake2b(expression.encode(), digest_size=8).digest()) % 100
    return next(s for s, (lo, hi) in _SPLIT_BOUNDS.items() if lo <= bucket < hi)


def random_tree(rng: random.Random, difficulty: Difficulty) -> Tree | None:
    """A random expression with `difficulty.ops` operations, or None if a value left the bounds.

    The shape is drawn by splitting the remaining operations between the two children uniformly.
    """

    def build(n: int) -> Tree:
        if n == 0:
            return rng.randint(difficulty.min_operand, difficulty.max_operand)
        k = rng.randint(0, n - 1)
        op = rng.choice(OPS)
        return (op, build(k), build(n - 1 - k))

    tree = build(difficulty.ops)
    return tree if _within(tree, difficulty.min_value, difficulty.max_value) else None


def iter_problems(
    split: Split, difficulty: Difficulty = Difficulty(), seed: int = 0, *, unique: bool = True
) -> Iterator[Problem]:
    """An endless deterministic stream of `split` problems (distinct when `unique`).

    Raises `RuntimeError` when the split seems exhausted (small operand ranges have few problems).
    """
    if split not in _SPLIT_BOUNDS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(f"arithmetic|{split}|{difficulty}|{seed}")
    seen: set[str] = set()
    misses = 0
    while True:
        tree = random_tree(rng, difficulty)
        if tree is None:
            continue
        expression = format_expression(tree)
        if _split_of_canonical(expression) != split or (unique and expression in seen):
            misses += 1
            if misses > 100_000:
                raise RuntimeError(f"no new {split} problems found at {difficulty}")
            continue
        misses = 0
        if unique:
            seen.add(expression)
        yield _problem_from_canonical(expression)


def generate_problems(
    split: Split, n: int, difficulty: Difficulty = Difficulty(), seed: int = 0
) -> list[Problem]:
    """`n` distinct problems of `split` at `difficulty`; the same arguments give the same list."""
    stream = iter_problems(split, difficulty, seed)
    return [next(stream) for _ in range(n)]


# -- solutions ----------------------------------------------------------------------------------
Reduction = tuple[str, int, int]


def reductions(tree: Tree) -> list[tuple[Reduction, Tree]]:
    """Every innermost operation of `tree` (left to right) with the tree after computing it."""
    if isinstance(tree, int):
        return []
    op, left, right = tree
    if isinstance(left, int) and isinstance(right, int):
        return [((op, left, right), apply_op(op, left, right))]
    out = [(r, (op, new, right)) for r, new in reductions(left)]
    out += [(r, (op, left, new)) for r, new in reductions(right)]
    return out


def solution_steps(
    problem: Problem | str, rng: random.Random | None = None, *, restate: bool = True
) -> list[str]:
    """A correct solution as steps: leftmost innermost operation first, or a random legal order
    when `rng` is given. Each step but the last restates the remaining expression (unless not
    `restate`) and ends with the delimiter; the last boxes the answer.
    """
    tree = _as_problem(problem).tree
    steps: list[str] = []
    while not isinstance(tree, int):
        options = reductions(tree)
        (op, a, b), tree = options[0] if rng is None else rng.choice(options)
        step = f"{a}{op}{b}={apply_op(op, a, b)}"
        if isinstance(tree, int):
            steps.append(f"{step} \\boxed{{{tree}}}")
        else:
            rest = f", so {format_expression(tree)}" if restate else ""
            steps.append(f"{step}{rest}{STEP_DELIMITER}")
    return steps


def solution_text(
    problem: Problem | str, rng: random.Random | None = None, *, restate: bool = True
) -> str:
    return "".join(solution_steps(problem, rng, restate=restate))


def split_steps(text: str) -> list[str]:
    """Cut a solution text into steps, each keeping its delimiter (the last may lack one)."""
    parts = text.split(STEP_DELIMITER)
    steps = [p + STEP_DELIMITER for p in parts[:-1]]
    return [*steps, parts[-1]] if parts[-1] else steps


_STEP = re.compile(
    r"(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)"  # the operation (signed once below zero)
    r"(?:\s*,\s*so\s+([-+*()\d\s]+?))?"  # optional restatement of what is left
    r"(?:\s*\\boxed\{\s*(-?\d+)\s*\})?"  # optional boxed answer
)
_BARE_ANSWER = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def evaluate_steps(problem: Problem | str, steps: Sequence[str]) -> list[bool]:
    """Whether each step is correct: a legal reduction of the expression so far, rightly computed.

    A step `a op b = c` is correct iff some innermost operation of the current expression has
    operands `a`, `b` (either order for `+` and `*`) and `c` is its value; any legal order of
    reductions is accepted (all readings are tracked when equal operations appear twice). A
    restatement `, so <expr>` must be what is left after that reduction (any spacing). A step
    that boxes an answer must be the last reduction and box its value; a bare `\\boxed{v}` step is
    also correct once the expression is fully reduced to v. After a wrong step, or after the
    answer, every step is wrong.
    """
    states: set[Tree] = {_as_problem(problem).tree}
    finished = False
    out: list[bool] = []
    for step in steps:
        ok = not finished and bool(states)
        if ok:
            states, finished, ok = _advance(states, step.strip())
        if not ok:
            states = set()
        out.append(ok)
    return out


def _advance(states: set[Tree], step: str) -> tuple[set[Tree], bool, bool]:
    """(states after `step`, whether it finished the solution, whether it was correct)."""
    bare = _BARE_ANSWER.fullmatch(step)
    if bare is not None:
        values = {s for s in states if isinstance(s, int)}
        return states, True, bool(values) and int(bare.group(1)) in values
    m = _STEP.fullmatch(step)
    if m is None:
        return states, False, False
    a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    if c != apply_op(op, a, b):
        return states, False, False
    wanted = {(op, a, b), (op, b, a)} if op in ("+", "*") else {(op, a, b)}
    after = {new for s in states for r, new in reductions(s) if r in wanted}
    if m.group(5) is not None:
        rest = parse_rest(m.group(5))
        after = {t for t in after if t == rest}
    if not after:
        return states, False, False
    if m.group(6) is None:
        return after, False, True
    # A boxed answer ends the solution: only right when nothing is left to compute.
    return after, True, after == {c} and int(m.group(6)) == c


def parse_rest(text: str) -> Tree | None:
    """The tree of a restated expression (a bare number when all is computed), None if invalid."""
    if re.fullmatch(r"\s*-?\d+\s*", text):
        return int(text)
    try:
        return parse_expression(text, signed=True)
    except ArithmeticProblemError:
        return None


def is_correct(problem: Problem | str, answer_text: str) -> bool:
    """Whether the last completed `\\boxed{...}` in `answer_text` is the problem's value."""
    answer = final_answer(answer_text)
    return answer is not None and answer == canonicalize(str(_as_problem(problem).answer))
