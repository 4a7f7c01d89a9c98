"""Python functions as tools: `@tool` on a typed function, async or not.

    from chorus.tools import tool

    @tool
    async def define(term: str, max_words: int = 40) -> str:
        \"\"\"Look a term up in the team's glossary.

        Args:
            term: the word or phrase to define
            max_words: the longest answer wanted
        \"\"\"

The parameters become a msgspec Struct (`msgspec.defstruct`); its JSON schema is what the
model sees (the description is the docstring's first paragraph, each parameter's the `Args:`
line that names it), and the model's arguments are converted with `msgspec.convert` against
the same Struct, so a wrong argument is a `ToolFailed` naming the field, which goes back to
the model. A parameter annotated `ToolCallContext` is given the call's context and is not
shown to the model. A sync function runs in a thread so it cannot stall the agent.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
import typing
from collections.abc import Callable
from typing import Annotated, Any, overload

import msgspec

from chorus.errors import ConfigError, ToolFailed
from chorus.tools.base import DEFAULT_TOOL_TIMEOUT_S, MAX_TOOL_NAME, ToolCallContext, ToolDefinition

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?):\s*$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The first paragraph, and per-parameter descriptions from a Google-style `Args:`."""
    text = inspect.cleandoc(doc or "")
    first = text.split("\n\n", 1)[0]
    summary = "" if _SECTION.match(first.split("\n", 1)[0]) else " ".join(first.split())
    params: dict[str, str] = {}
    current: str | None = None
    in_args = False
    for line in text.splitlines():
        section = _SECTION.match(line)
        if section:
            in_args = section.group(1) in ("Args", "Arguments", "Parameters")
            current = None
            continue
        if not in_args or not line.strip():
            continue
        indented = len(line) - len(line.lstrip()) > 4
        match = _ARG_LINE.match(line)
        if match and not indented:
            current = match.group(1).lstrip("*")
            params[current] = match.group(2).strip()
        elif current is not None:  # a continuation line
            params[current] = f"{params[current]} {line.strip()}".strip()
    return summary, params


def _is_context(annotation: Any) -> bool:
    """`ToolCallContext`, or an optional one."""
    return annotation is ToolCallContext or ToolCallContext in typing.get_args(annotation)


def _inline_root(schema: dict[str, Any]) -> dict[str, Any]:
    """msgspec gives `{"$ref": ..., "$defs": {...}}`: put the root object in place."""
    defs: dict[str, Any] = dict(schema.get("$defs", {}))
    ref = schema.get("$ref", "")
    root: dict[str, Any] = dict(defs.pop(ref.rsplit("/", 1)[-1], schema))
    root.pop("title", None)
    if defs:
        root["$defs"] = defs
    return root


class PythonTool:
    """A function with its definition; calling the object still calls the function."""

    def __init__(
        self,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        side_effect: bool = False,
        timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
    ) -> None:
        self.function = function
        tool_name = name or function.__name__
        if not _NAME.match(tool_name):
            raise ConfigError(
                f"tool name {tool_name!r} must be 1 to {MAX_TOOL_NAME} letters, digits, '_' or '-'"
            )
        summary, docs = parse_docstring(function.__doc__)
        self._context_param: str | None = None
        fields: list[tuple[str, Any, Any] | tuple[str, Any]] = []
        try:
            hints = inspect.get_annotations(function, eval_str=True)
        except NameError as exc:
            raise ConfigError(f"tool {tool_name}: cannot read its annotations: {exc}") from None
        for param in inspect.signature(function).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ConfigError(f"tool {tool_name}: *args and **kwargs cannot be described")
            annotation = hints.get(param.name, Any)
            if _is_context(annotation):
                self._context_param = param.name
                continue
            if param.name in docs:
                annotation = Annotated[annotation, msgspec.Meta(description=docs[param.name])]
            if param.default is param.empty:
                fields.append((param.name, annotation))
            else:
                fields.append((param.name, annotation, param.default))
        self.arguments_type = msgspec.defstruct(
            f"{tool_name}_arguments", fields, kw_only=True, forbid_unknown_fields=True
        )
        try:
            parameters = _inline_root(msgspec.json.schema(self.arguments_type))
        except TypeError as exc:
            raise ConfigError(f"tool {tool_name}: a parameter has no JSON schema: {exc}") from None
        self._definition = ToolDefinition(
            name=tool_name,
            description=description if description is not None else summary,
            parameters=parameters,
            side_effect=side_effect,
            timeout_s=timeout_s,
        )
        self._is_async = inspect.iscoroutinefunction(function)

    @property
    def definition(self) -> ToolDefinition:
        return self._definition

    async def call(self, arguments: dict[str, Any], ctx: ToolCallContext) -> Any:
        try:
            parsed = msgspec.convert(arguments, self.arguments_type)
        except msgspec.ValidationError as exc:
            raise ToolFailed(f"invalid arguments for {self._definition.name}: {exc}") from None
        kwargs = {f: getattr(parsed, f) for f in parsed.__struct_fields__}
        if self._context_param is not None:
            kwargs[self._context_param] = ctx
        if self._is_async:
            return await self.function(**kwargs)
        return await asyncio.to_thread(self.function, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<tool {self._definition.name}>"


@overload
def tool(function: Callable[..., Any], /) -> PythonTool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    side_effect: bool = False,
    timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
) -> Callable[[Callable[..., Any]], PythonTool]: ...


def tool(
    function: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    side_effect: bool = False,
    timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
) -> PythonTool | Callable[[Callable[..., Any]], PythonTool]:
    """Make a typed function a tool: `@tool`, or `@tool(name=..., side_effect=True, ...)`."""

    def wrap(fn: Callable[..., Any]) -> PythonTool:
        return PythonTool(
            fn, name=name, description=description, side_effect=side_effect, timeout_s=timeout_s
        )

    return wrap(function) if function is not None else wrap


def load_python_tool(reference: str) -> PythonTool:
    """`package.module:function`: a `@tool`, or a plain typed function made one."""
    module_name, _, attribute = reference.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load python tool {reference!r}: {exc}") from None
    if isinstance(target, PythonTool):
        return target
    if callable(target):
        return PythonTool(target)
    raise ConfigError(f"python tool {reference!r} is not a function")
