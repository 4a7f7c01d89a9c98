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
- Everything else is refused when the expression is parsed: lambdas, comprehensions,
  f-strings, `**`, `:=`, starred arguments, keyword arguments, any other call.

Values are the JSON types (str, int, float, bool, None, list, dict). Results are bounded in size,
and expressions in length, so an expression cannot exhaust memory.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec

from chorus.errors import ExpressionError

MAX_EXPRESSION_CHARS: Final = 2000
MAX_VALUE_SIZE: Final = 1_000_000  # items or characters an operation may produce

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
    "round": (round, 1, 2),
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

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        """The expression's value; raises ExpressionError naming the expression and the problem."""
        try:
            return _Evaluator(context).visit(self._tree)
        except _Missing as exc:
            raise self.error(str(exc)) from None
        except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
            raise self.error(f"{exc}") from None
        except RecursionError:
            raise self.error("nested too deeply") from None

    def is_true(self, context: Mapping[str, Any]) -> bool:
        return bool(self.evaluate(context))


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
    expression = Expression(text, tree.body)
    for node in _in_reporting_order(tree.body):
        problem = _refusal(node)
        if problem:
            raise expression.error(problem)
    return expression


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


def _check_size(value: Any) -> Any:
    if isinstance(value, str | list | tuple) and len(value) > MAX_VALUE_SIZE:
        raise ValueError(f"a result of {len(value)} items is over the limit of {MAX_VALUE_SIZE}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is not a finite number")
    return value


class _Evaluator:
    """Walks a checked tree. Only node types `_refusal` lets through can reach here."""

    def __init__(self, context: Mapping[str, Any]) -> None:
        self.context = context

    def visit(self, node: ast.expr) -> Any:
        method: Callable[[Any], Any] = getattr(self, f"visit_{type(node).__name__}")
        return method(node)

    def visit_Constant(self, node: ast.Constant) -> Any:
        return node.value

    def visit_Name(self, node: ast.Name) -> Any:
        if node.id not in self.context:
            known = ", ".join(sorted(self.context)) or "none"
            raise _Missing(f"unknown name {node.id!r} (known names: {known})")
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
            return value[slice(*bounds)]
        return self._key(node.value, self.visit(node.slice), ast.unparse(node))

    def _key(self, container_node: ast.expr, key: Any, where: str) -> Any:
        container = self.visit(container_node)
        _check_key(key)
        owner = ast.unparse(container_node)
        if isinstance(container, Mapping):
            if key not in container:
                keys = ", ".join(sorted(str(k) for k in container)) or "none"
                raise _Missing(f"{owner} has no key {key!r} (keys: {keys})")
            return container[key]
        if isinstance(container, Sequence) and not isinstance(container, str | bytes):
            return self._index(container, key, owner)
        if isinstance(container, str) and isinstance(key, int) and not isinstance(key, bool):
            return self._index(container, key, owner)
        raise TypeError(f"cannot read {where}: {owner} is {_kind(container)}, not a mapping")

    @staticmethod
    def _index(sequence: Sequence[Any], key: Any, owner: str) -> Any:
        if not isinstance(key, int) or isinstance(key, bool):
            raise TypeError(f"{owner} is a list; index it with an integer, not {key!r}")
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
        if isinstance(node.op, ast.Mult):
            # Refuse repetition that would build a huge string or list before building it.
            for seq, count in ((left, right), (right, left)):
                repeated = isinstance(seq, str | list) and isinstance(count, int)
                if repeated and len(seq) * count > MAX_VALUE_SIZE:
                    raise ValueError(
                        f"a result of {len(seq) * count} items is over the limit of "
                        f"{MAX_VALUE_SIZE}"
                    )
        try:
            return _check_size(_BINARY[type(node.op)](left, right))
        except TypeError:
            raise TypeError(
                f"cannot apply {ast.unparse(node)}: unsupported for {_kind(left)} and "
                f"{_kind(right)}"
            ) from None

    def visit_Compare(self, node: ast.Compare) -> bool:
        left = self.visit(node.left)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self.visit(right_node)
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
        function = FUNCTIONS[node.func.id][0]
        args = [self.visit(a) for a in node.args]
        try:
            return _check_size(function(*args))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{node.func.id}(): {exc}") from None

    def visit_List(self, node: ast.List) -> list[Any]:
        return [self.visit(e) for e in node.elts]

    def visit_Tuple(self, node: ast.Tuple) -> list[Any]:
        return [self.visit(e) for e in node.elts]

    def visit_Dict(self, node: ast.Dict) -> dict[Any, Any]:
        return {
            self.visit(k): self.visit(v)
            for k, v in zip(node.keys, node.values, strict=True)
            if k is not None  # `**` unpacking was refused when parsing
        }


def evaluate(source: str, context: Mapping[str, Any]) -> Any:
    """Parse (cached) and evaluate `source` against `context`."""
    return parse(source).evaluate(context)


def as_text(value: Any) -> str:
    """A value as template text: strings as they are, None as empty, containers as JSON."""
    return _text(value)
