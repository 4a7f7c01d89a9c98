"""A small, safe expression language for workflow conditions (`when:`, `require:`) and templates.

Expressions use a strict subset of Python's expression syntax. They are parsed with `ast` and
evaluated by walking the tree here; nothing is ever passed to eval, exec or compile. Grammar:

    expr       := test ["if" test "else" expr]
    test       := and_test ("or" and_test)*
    and_test   := not_test ("and" not_test)*
    not_test   := "not" not_test | comparison
    comparison := sum (compare_op sum)*
    compare_op := "==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in" | "is" | "is not"
    sum        := term (("+" | "-") term)*
    term       := unary (("*" | "/" | "//" | "%") unary)*
    unary      := ("-" | "+") unary | primary
    primary    := atom | primary "." NAME | primary "[" expr "]" | primary "[" [expr] ":" [expr] "]"
                | FUNCTION "(" [expr ("," expr)*] ")"
    atom       := NAME | STRING | INTEGER | FLOAT | "True" | "False" | "None"
                | "(" expr ")" | "[" [expr ("," expr)*] "]" | "{" [expr ":" expr ("," ...)*] "}"

Semantics:
- A NAME is looked up in the context (for workflows: `input`, `data`, `steps`, and in output
  processors also `output` and `result`); an unknown name is an error, never None.
- `a.b` and `a["b"]` both read key `b` of a mapping; `a[0]`, `a[-1]`, `a[1:3]` index a list or
  string. A missing key or index is an error naming it; use `get(a, "b", default)` for optional
  keys. Names and keys that start with `_` are refused.
- FUNCTION is one of: len, lower, upper, strip, contains(container, item),
  startswith(text, prefix), endswith(text, suffix), get(mapping, key[, default]), int, float,
  str, bool, abs, min, max, round(number[, digits]). Methods cannot be called
  (`lower(x)`, not `x.lower()`).
- `%` is arithmetic only: `text % values` formatting is refused when evaluated.
- Everything else is refused when the expression is parsed: lambdas, comprehensions,
  f-strings, `**`, `:=`, starred arguments, keyword arguments, any other call.

Values are the JSON types (str, int, float, bool, None, list, dict).

Limits. Expressions come from workflows sent over the wire, so evaluating one is bounded in
length, nesting, memory, work and time:
- The size a value would have (characters plus elements, nested ones counted) is worked out
  from its operands BEFORE it is built (`*`, `+`, literals, slices, text conversion) and
  refused over MAX_VALUE_SIZE; a list or mapping over MAX_ITEMS elements is refused too.
- Every evaluation has a work Budget (MAX_WORK units): each node visited, element built,
  character copied and, for comparisons and `in`, the sizes of both sides are charged to it.
  A template's placeholders share one budget.
- `evaluate_async`, `Expression.evaluate_async` and `Template.render_async` evaluate in a
  worker thread, off the event loop, with a deadline the evaluator checks as it goes.
Every failure, whatever Python raised underneath, is an ExpressionError naming the expression.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import heapq
import math
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import msgspec

from chorus.errors import ExpressionError

MAX_EXPRESSION_CHARS: Final = 2000
MAX_NESTING: Final = 100  # levels of sub-expressions
MAX_VALUE_SIZE: Final = 1_000_000  # characters plus elements (nested ones counted) of a value
MAX_ITEMS: Final = 100_000  # elements of one list or mapping an expression builds
MAX_INT_BITS: Final = 4096  # a bigger integer is refused (about 1,230 digits)
MAX_ROUND_DIGITS: Final = 100  # round(x, digits) with |digits| over this is refused
MAX_WORK: Final = 5_000_000  # work units of one evaluation (see the module docstring)
EVALUATION_TIMEOUT_S: Final = 2.0  # default deadline of the async evaluations
CLOCK_EVERY: Final = 1000  # work units between two looks at the deadline

T = TypeVar("T")

_BINARY: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}

_COMPARE: Final[dict[type[ast.cmpop], Callable[[Any, Any], Any]]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}

# Why a node is refused, for the ones people are likely to try.
_REFUSED: Final[dict[type[ast.AST], str]] = {
    ast.Lambda: "lambda is not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "generator expressions are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.NamedExpr: "assignment (:=) is not allowed",
    ast.Starred: "* unpacking is not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
    ast.Set: "set literals are not allowed",
}


def _text(value: Any) -> str:
    """How a value reads in a template: strings as they are, None empty, containers as JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return msgspec.json.encode(value).decode()


def _contains(container: Any, item: Any) -> bool:
    if isinstance(container, str):
        return isinstance(item, str) and item in container
    if isinstance(container, Mapping | list | tuple):
        return item in container
    raise TypeError(f"contains() needs a string, list or mapping, not {_kind(container)}")


def _get(mapping: Any, key: Any, default: Any = None) -> Any:
    if not isinstance(mapping, Mapping):
        raise TypeError(f"get() needs a mapping, not {_kind(mapping)}")
    _check_key(key)
    return mapping.get(key, default)


def _str_function(name: str) -> Callable[..., Any]:
    def call(value: Any, *args: Any) -> Any:
        if not isinstance(value, str):
            raise TypeError(f"{name}() needs a string, not {_kind(value)}")
        return getattr(str, name)(value, *args)

    return call


def _extremum(pick: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        values = args[0] if len(args) == 1 and isinstance(args[0], list) else list(args)
        if not values:
            raise TypeError("needs at least one value")
        return pick(values)

    return call


def _round(number: Any, digits: Any = None) -> Any:
    # round(10, -10**9) would compute 10**(10**9) before answering
    if isinstance(digits, int) and abs(digits) > MAX_ROUND_DIGITS:
        raise ValueError(f"digits must be within -{MAX_ROUND_DIGITS}..{MAX_ROUND_DIGITS}")
    return round(number) if digits is None else round(number, digits)


FUNCTIONS: Final[dict[str, tuple[Callable[..., Any], int, int]]] = {
    # name: (function, fewest arguments, most arguments)
    "len": (len, 1, 1),
    "lower": (_str_function("lower"), 1, 1),
    "upper": (_str_function("upper"), 1, 1),
    "strip": (_str_function("strip"), 1, 1),
    "startswith": (_str_function("startswith"), 2, 2),
    "endswith": (_str_function("endswith"), 2, 2),
    "contains": (_contains, 2, 2),
    "get": (_get, 2, 3),
    "int": (int, 1, 1),
    "float": (float, 1, 1),
    "str": (_text, 1, 1),
    "bool": (bool, 1, 1),
    "abs": (abs, 1, 1),
    "min": (_extremum(min), 1, 64),
    "max": (_extremum(max), 1, 64),
    "round": (_round, 1, 2),
}


def _kind(value: Any) -> str:
    return type(value).__name__


def _check_key(key: Any) -> None:
    if isinstance(key, str) and key.startswith("_"):
        raise TypeError(f"keys starting with '_' are not allowed ({key!r})")


class Expression:
    """A parsed, checked expression. Build with `parse`; evaluate against a context mapping."""

    def __init__(self, source: str, tree: ast.expr) -> None:
        self.source = source
        self._tree = tree

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def error(self, problem: str) -> ExpressionError:
        return ExpressionError(f"expression `{self.source}`: {problem}")

    def names(self) -> set[str]:
        """The context names the expression reads (not the functions it calls)."""
        functions = {id(n.func) for n in ast.walk(self._tree) if isinstance(n, ast.Call)}
        return {
            n.id for n in ast.walk(self._tree) if isinstance(n, ast.Name) and id(n) not in functions
        }

    def step_references(self) -> set[str]:
        """Step names read as `steps.<name>` or `steps["<name>"]`, for checks before a run."""
        found: set[str] = set()
        for node in ast.walk(self._tree):
            if isinstance(node, ast.Attribute | ast.Subscript) and _is_name(node.value, "steps"):
                if isinstance(node, ast.Attribute):
                    found.add(node.attr)
                elif isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                    found.add(node.slice.value)
        return found

    def evaluate(self, context: Mapping[str, Any], *, budget: Budget | None = None) -> Any:
        """The expression's value; raises ExpressionError naming the expression and the problem.

        Runs on the calling thread: from async code use `evaluate_async`."""
        return self._run(context, budget, text=False)

    def text(self, context: Mapping[str, Any], *, budget: Budget | None = None) -> str:
        """The value as template text (see `as_text`), its length checked before it is made."""
        return str(self._run(context, budget, text=True))

    def is_true(self, context: Mapping[str, Any], *, budget: Budget | None = None) -> bool:
        return bool(self.evaluate(context, budget=budget))

    async def evaluate_async(
        self, context: Mapping[str, Any], *, timeout: float = EVALUATION_TIMEOUT_S
    ) -> Any:
        """`evaluate` in a worker thread, refused (ExpressionError) past `timeout` seconds."""
        budget = Budget(timeout=timeout)
        return await off_the_loop(lambda: self.evaluate(context, budget=budget), budget)

    async def is_true_async(
        self, context: Mapping[str, Any], *, timeout: float = EVALUATION_TIMEOUT_S
    ) -> bool:
        return bool(await self.evaluate_async(context, timeout=timeout))

    def _run(self, context: Mapping[str, Any], budget: Budget | None, *, text: bool) -> Any:
        evaluator = _Evaluator(context, budget or Budget())
        try:
            value = evaluator.visit(self._tree)
            return evaluator.text(value) if text else value
        except (_Missing, _OverBudget) as exc:
            raise self.error(str(exc)) from None
        except RecursionError:
            raise self.error("nested too deeply") from None
        except MemoryError:
            raise self.error("out of memory: it builds values too big to hold") from None
        except Exception as exc:
            # TypeError, ValueError, ArithmeticError, an encoding error...: whatever Python
            # raised, it is this expression's failure, reported as such (never the caller's).
            raise self.error(str(exc) or type(exc).__name__) from None


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def parse(source: str) -> Expression:
    """Parse and check an expression; raise ExpressionError naming it and what is refused."""
    return _parse(source)


@functools.lru_cache(maxsize=1024)
def _parse(source: str) -> Expression:
    text = source.strip()
    if not text:
        raise ExpressionError("an expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(
            f"expression `{text[:40]}...` is {len(text)} characters; the limit is "
            f"{MAX_EXPRESSION_CHARS}"
        )
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"expression `{text}`: invalid syntax ({exc.msg})") from None
    except (RecursionError, MemoryError):
        raise ExpressionError(f"expression `{text}`: nested too deeply") from None
    expression = Expression(text, tree.body)
    for node in _in_reporting_order(tree.body):
        problem = _refusal(node)
        if problem:
            raise expression.error(problem)
    if _nesting(tree.body) > MAX_NESTING:
        raise expression.error(f"nested too deeply (the limit is {MAX_NESTING} levels)")
    return expression


def _nesting(root: ast.expr) -> int:
    """How many sub-expressions deep `root` goes (counted without recursion)."""
    deepest = 0
    pending: list[tuple[ast.AST, int]] = [(root, 1)]
    while pending:
        node, depth = pending.pop()
        deepest = max(deepest, depth)
        for child in ast.iter_child_nodes(node):
            pending.append((child, depth + 1 if isinstance(child, ast.expr) else depth))
    return deepest


def _in_reporting_order(root: ast.expr) -> list[ast.AST]:
    """Every node, ordered so the most telling refusal is reported: forbidden constructs
    (lambda, comprehensions...) first, then calls innermost first (`__import__` in
    `__import__('os').system(...)`, not the method call around it), then the rest."""
    nodes = list(ast.walk(root))
    calls = [n for n in nodes if isinstance(n, ast.Call)]
    calls.reverse()  # ast.walk is breadth-first: reversed, inner calls come before outer ones
    return [*(n for n in nodes if type(n) in _REFUSED), *calls, *nodes]


def _refusal(node: ast.AST) -> str | None:
    """Why `node` is not allowed, or None when it is."""
    if type(node) in _REFUSED:
        return _REFUSED[type(node)]
    if isinstance(node, ast.Name):
        return "names starting with '_' are not allowed" if node.id.startswith("_") else None
    if isinstance(node, ast.Attribute):
        if node.attr.startswith("_"):
            return f"attributes starting with '_' are not allowed (.{node.attr})"
        return None
    if isinstance(node, ast.Call):
        return _call_refusal(node)
    if isinstance(node, ast.Subscript):
        key = node.slice.value if isinstance(node.slice, ast.Constant) else None
        if isinstance(key, str) and key.startswith("_"):
            return f"keys starting with '_' are not allowed ({key!r})"
        return None
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bytes | complex) or node.value is Ellipsis:
            return f"{_kind(node.value)} literals are not allowed"
        return None
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            return f"the operator {_operator_text(node.op)} is not allowed"
        return None
    if isinstance(node, ast.UnaryOp):
        return None if isinstance(node.op, ast.Not | ast.USub | ast.UAdd) else "~ is not allowed"
    if isinstance(node, ast.Dict):
        return "** unpacking is not allowed" if any(k is None for k in node.keys) else None
    allowed = (
        ast.BoolOp,
        ast.Compare,
        ast.IfExp,
        ast.Subscript,
        ast.Slice,
        ast.List,
        ast.Tuple,
        ast.Load,
        ast.And,
        ast.Or,
        ast.Not,
        ast.USub,
        ast.UAdd,
        ast.operator,
        ast.cmpop,
    )
    if isinstance(node, allowed):
        return None
    return f"{type(node).__name__} is not allowed"


def _call_refusal(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Attribute):
        return (
            f"calling methods is not allowed; write {node.func.attr}(x) instead of "
            f"x.{node.func.attr}() when {node.func.attr} is a known function"
        )
    if not isinstance(node.func, ast.Name):
        return "only the known functions can be called"
    name = node.func.id
    if name not in FUNCTIONS:
        return f"unknown function {name!r}; the known functions are {', '.join(sorted(FUNCTIONS))}"
    if node.keywords:
        return f"{name}() takes no keyword arguments"
    fewest, most = FUNCTIONS[name][1:]
    if not fewest <= len(node.args) <= most:
        wanted = str(fewest) if fewest == most else f"{fewest} to {most}"
        return f"{name}() takes {wanted} arguments, not {len(node.args)}"
    return None


_OPERATOR_TEXT: Final[dict[type[ast.operator], str]] = {
    ast.Pow: "**",
    ast.MatMult: "@",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
}


def _operator_text(op: ast.operator) -> str:
    return _OPERATOR_TEXT.get(type(op), type(op).__name__)


class _Missing(Exception):
    """A name, key or index that is not there."""


class _OverBudget(Exception):
    """An evaluation did more work, or took longer, than its Budget allows."""


class Budget:
    """The work one evaluation may do and when it must end; a template's placeholders share
    one. `charge` raises _OverBudget past either, looking at the clock every CLOCK_EVERY units
    (an evaluation in a worker thread cannot be killed: it has to notice its deadline)."""

    def __init__(self, work: int = MAX_WORK, *, timeout: float | None = None) -> None:
        self.work = work
        self.left = work
        self.timeout = timeout
        self.deadline: float | None = None
        self._next_look = work - CLOCK_EVERY
        self.start_clock()

    def start_clock(self) -> None:
        """The deadline counts from now."""
        if self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout

    def charge(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise _OverBudget(
                f"the work budget of {self.work} units was exceeded: it builds, compares or "
                "converts values too big or too often"
            )
        if self.deadline is not None and self.left <= self._next_look:
            self._next_look = self.left - CLOCK_EVERY
            if time.monotonic() > self.deadline:
                raise _OverBudget(f"the time budget of {self.timeout}s was exceeded")


async def off_the_loop(call: Callable[[], T], budget: Budget) -> T:
    """Run an evaluation that charges `budget` in a worker thread, so the event loop serves on.

    The deadline counts from when the thread starts (time spent queued for one is not the
    expression's), and the evaluation checks it itself: a thread cannot be stopped from
    outside, and the size limits keep any one operation short."""

    def timed() -> T:
        budget.start_clock()
        return call()

    return await asyncio.to_thread(timed)


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, str) or len(value) <= limit else repr(value[:limit])
    return text if len(text) <= limit + 2 else text[:limit] + "..."


def _listing(names: Any, limit: int = 20) -> str:
    """Sorted names for a message, the first `limit` of them when there are more."""
    names = list(names)
    first = heapq.nsmallest(limit, (str(n)[:60] for n in names))
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return (", ".join(first) or "none") + more


_CONTAINERS: Final = frozenset({list, dict, tuple})


def _is_container(value: Any) -> bool:
    return isinstance(value, list | tuple | Mapping)


def _children(value: Any) -> Sequence[Any]:
    if isinstance(value, Mapping):
        return [*value.keys(), *value.values()]
    return value  # type: ignore[no-any-return]


class _Evaluator:
    """Walks a checked tree. Only node types `_refusal` lets through can reach here.

    Sizes: a string's is its length, a number's 1, a list's or mapping's 1 plus the sizes of
    its elements (keys and values), so an element shared N times counts N times, as it would
    when compared or converted to text. Sizes of values are remembered for the evaluation."""

    def __init__(self, context: Mapping[str, Any], budget: Budget) -> None:
        self.context = context
        self.budget = budget
        self._sizes: dict[int, tuple[Any, int]] = {}  # id -> (the value, kept alive; its size)

    def visit(self, node: ast.expr) -> Any:
        self.budget.charge(1)
        method: Callable[[Any], Any] = getattr(self, f"visit_{type(node).__name__}")
        return method(node)

    # sizes, worked out before a value is built

    def size(self, value: Any) -> int:
        if isinstance(value, str):
            return len(value)
        if not _is_container(value):
            return 1
        known = self._sizes.get(id(value))
        if known is not None:
            return known[1]
        sizes = self._sizes
        pending = [value]  # walked without recursion: context values can nest deeply
        while pending:
            top = pending[-1]
            if id(top) in sizes:
                pending.pop()
                continue
            children = _children(top)
            self.budget.charge(len(children) + 1)
            total, waiting = 1, False
            for child in children:  # one pass, no calls: contexts can hold big lists
                if isinstance(child, str):
                    total += len(child)
                elif type(child) in _CONTAINERS or _is_container(child):
                    known = sizes.get(id(child))
                    if known is None:
                        pending.append(child)
                        waiting = True
                    else:
                        total += known[1]
                else:
                    total += 1
            if not waiting:  # else: again once the children are known
                pending.pop()
                sizes[id(top)] = (top, total)
        return self._sizes[id(value)][1]

    def _remember(self, value: Any, size: int) -> Any:
        if _is_container(value):
            self._sizes[id(value)] = (value, size)
        return value

    def plan(self, size: int, items: int = 0, *, text: bool = False) -> None:
        """Refuse a value over the limits before it is built; charge building it."""
        if text and size > MAX_VALUE_SIZE:
            raise ValueError(
                f"a text of {size} characters would be over the limit of {MAX_VALUE_SIZE}"
            )
        if items > MAX_ITEMS:
            raise ValueError(f"a list of {items} elements would be over the limit of {MAX_ITEMS}")
        if size > MAX_VALUE_SIZE:
            raise ValueError(f"a result of size {size} would be over the limit of {MAX_VALUE_SIZE}")
        self.budget.charge(items if items else size)

    def text(self, value: Any) -> str:
        """`as_text(value)`, refused before encoding when it would be too long: JSON text is
        at least as long as the value's size."""
        if isinstance(value, str):
            return value
        if _is_container(value):
            least = self.size(value)
            if least > MAX_VALUE_SIZE:
                raise ValueError(
                    f"as text it would be at least {least} characters, over the limit of "
                    f"{MAX_VALUE_SIZE}"
                )
            self.budget.charge(least)
            encoded = _text(value)
            if len(encoded) > MAX_VALUE_SIZE:
                raise ValueError(
                    f"a text of {len(encoded)} characters is over the limit of {MAX_VALUE_SIZE}"
                )
            return encoded
        return _text(value)

    @staticmethod
    def checked(value: Any) -> Any:
        """A result that was cheap to build but must not travel on: too long, big or odd."""
        if isinstance(value, str | list | tuple) and len(value) > MAX_VALUE_SIZE:
            raise ValueError(
                f"a result of {len(value)} items is over the limit of {MAX_VALUE_SIZE}"
            )
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise ValueError(f"a number over {MAX_INT_BITS} bits is over the limit")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("the result is not a finite number")
        return value

    # the nodes

    def visit_Constant(self, node: ast.Constant) -> Any:
        return self.checked(node.value)

    def visit_Name(self, node: ast.Name) -> Any:
        if node.id not in self.context:
            raise _Missing(f"unknown name {node.id!r} (known names: {_listing(self.context)})")
        return self.context[node.id]

    def visit_Attribute(self, node: ast.Attribute) -> Any:
        return self._key(node.value, node.attr, f"{ast.unparse(node.value)}.{node.attr}")

    def visit_Subscript(self, node: ast.Subscript) -> Any:
        if isinstance(node.slice, ast.Slice):
            value = self.visit(node.value)
            if not isinstance(value, str | list):
                raise TypeError(f"cannot slice {ast.unparse(node.value)} ({_kind(value)})")
            bounds = [
                None if part is None else self.visit(part)
                for part in (node.slice.lower, node.slice.upper, node.slice.step)
            ]
            if not all(b is None or isinstance(b, int) for b in bounds):
                raise TypeError("slice bounds must be integers")
            part = slice(*bounds)
            self.budget.charge(len(range(*part.indices(len(value)))))
            return value[part]
        return self._key(node.value, self.visit(node.slice), ast.unparse(node))

    def _key(self, container_node: ast.expr, key: Any, where: str) -> Any:
        container = self.visit(container_node)
        _check_key(key)
        owner = ast.unparse(container_node)
        if isinstance(container, Mapping):
            self.budget.charge(self.size(key))  # hashing it
            if key not in container:
                raise _Missing(f"{owner} has no key {_shown(key)} (keys: {_listing(container)})")
            return container[key]
        if isinstance(container, Sequence) and not isinstance(container, str | bytes):
            return self._index(container, key, owner)
        if isinstance(container, str) and isinstance(key, int) and not isinstance(key, bool):
            return self._index(container, key, owner)
        raise TypeError(f"cannot read {where}: {owner} is {_kind(container)}, not a mapping")

    @staticmethod
    def _index(sequence: Sequence[Any], key: Any, owner: str) -> Any:
        if not isinstance(key, int) or isinstance(key, bool):
            raise TypeError(f"{owner} is a list; index it with an integer, not {_shown(key)}")
        if not -len(sequence) <= key < len(sequence):
            raise _Missing(f"{owner} has no item {key} (it has {len(sequence)})")
        return sequence[key]

    def visit_BoolOp(self, node: ast.BoolOp) -> Any:
        value: Any = None
        for operand in node.values:
            value = self.visit(operand)
            if isinstance(node.op, ast.And) and not value:
                return value
            if isinstance(node.op, ast.Or) and value:
                return value
        return value

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Any:
        value = self.visit(node.operand)
        if isinstance(node.op, ast.Not):
            return not value
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"cannot negate {_kind(value)}")
        return -value if isinstance(node.op, ast.USub) else +value

    def visit_BinOp(self, node: ast.BinOp) -> Any:
        left, right = self.visit(node.left), self.visit(node.right)
        op, planned = type(node.op), None
        if op is ast.Mult:
            planned = self._plan_product(left, right)
        elif op is ast.Add:
            planned = self._plan_sum(left, right)
        elif op is ast.Mod and isinstance(left, str):
            raise TypeError("% formatting of text is not allowed")  # '%999999999d' % 1
        try:
            result = _BINARY[op](left, right)
        except TypeError:
            raise TypeError(
                f"cannot apply {ast.unparse(node)}: unsupported for {_kind(left)} and "
                f"{_kind(right)}"
            ) from None
        if planned is not None:
            self._remember(result, planned)
        return self.checked(result)

    def _plan_product(self, left: Any, right: Any) -> int | None:
        """Check a repetition (or an integer product) before it is computed; its list size."""
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, str | list) and isinstance(count, int):
                times = max(count, 0)
                if isinstance(seq, str):
                    self.plan(len(seq) * times, text=True)
                    return None
                size = 1 + times * (self.size(seq) - 1)
                self.plan(size, len(seq) * times)
                return size
        ints = isinstance(left, int) and isinstance(right, int)
        if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise ValueError(f"a number over {MAX_INT_BITS} bits would be over the limit")
        return None

    def _plan_sum(self, left: Any, right: Any) -> int | None:
        """Check a concatenation before it is made; its list size."""
        if isinstance(left, str) and isinstance(right, str):
            self.plan(len(left) + len(right), text=True)
        elif isinstance(left, list) and isinstance(right, list):
            size = self.size(left) + self.size(right) - 1
            self.plan(size, len(left) + len(right))
            return size
        return None

    def visit_Compare(self, node: ast.Compare) -> bool:
        left = self.visit(node.left)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self.visit(right_node)
            if not isinstance(op, ast.Is | ast.IsNot):
                # Comparing (or searching) costs at most the sizes of both sides.
                self.budget.charge(self.size(left) + self.size(right))
            try:
                if not _COMPARE[type(op)](left, right):
                    return False
            except TypeError:
                raise TypeError(
                    f"cannot evaluate {ast.unparse(node)} with {_kind(left)} and {_kind(right)}"
                ) from None
            left = right
        return True

    def visit_IfExp(self, node: ast.IfExp) -> Any:
        return self.visit(node.body) if self.visit(node.test) else self.visit(node.orelse)

    def visit_Call(self, node: ast.Call) -> Any:
        assert isinstance(node.func, ast.Name)
        name = node.func.id
        args = [self.visit(a) for a in node.args]
        try:
            if name == "str":
                return self.text(args[0])
            if name not in ("len", "bool"):  # the others read their arguments through
                self.budget.charge(sum(self.size(a) for a in args))
            if name in ("lower", "upper", "strip") and isinstance(args[0], str):
                # upper() can lengthen a text up to 3 times ('ß' -> 'SS')
                self.plan(3 * len(args[0]), text=True)
            return self.checked(FUNCTIONS[name][0](*args))
        except (TypeError, ValueError, ArithmeticError) as exc:
            kind = TypeError if isinstance(exc, TypeError) else ValueError
            raise kind(f"{name}(): {exc}") from None

    def visit_List(self, node: ast.List) -> list[Any]:
        return self._sequence(node.elts)

    def visit_Tuple(self, node: ast.Tuple) -> list[Any]:
        return self._sequence(node.elts)

    def _sequence(self, nodes: list[ast.expr]) -> list[Any]:
        items = [self.visit(e) for e in nodes]
        size = 1 + sum(self.size(i) for i in items)
        self.plan(size, len(items))
        return self._remember(items, size)  # type: ignore[no-any-return]

    def visit_Dict(self, node: ast.Dict) -> dict[Any, Any]:
        pairs = [
            (self.visit(k), self.visit(v))
            for k, v in zip(node.keys, node.values, strict=True)
            if k is not None  # `**` unpacking was refused when parsing
        ]
        size = 1 + sum(self.size(k) + self.size(v) for k, v in pairs)
        self.plan(size, len(pairs))
        return self._remember(dict(pairs), size)  # type: ignore[no-any-return]


def evaluate(source: str, context: Mapping[str, Any]) -> Any:
    """Parse (cached) and evaluate `source` against `context`, on the calling thread."""
    return parse(source).evaluate(context)


async def evaluate_async(
    source: str, context: Mapping[str, Any], *, timeout: float = EVALUATION_TIMEOUT_S
) -> Any:
    """Parse (cached) and evaluate `source` in a worker thread, within `timeout` seconds."""
    return await parse(source).evaluate_async(context, timeout=timeout)


def as_text(value: Any) -> str:
    """A value as template text: strings as they are, None as empty, containers as JSON."""
    return _text(value)
