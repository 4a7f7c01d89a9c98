"""Text templates: `{{ expression }}` replaced by the expression's value, as text.

    Template("Summarise: {{ steps.research.output }}").render(context)

Expressions are the language of `chorus.specs.expressions`, checked when the template is
built, so a bad template is reported before anything runs. Values read as text: strings as they
are, None as empty, numbers as digits, true/false, lists and mappings as JSON.

Rendering is bounded like evaluating (see `chorus.workflows.expressions`): the placeholders
share one work budget, and the text is refused as soon as it would grow past
MAX_RENDERED_CHARS, checked before each piece is added. From async code use `render_async`,
which renders in a worker thread within a deadline.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from chorus.errors import ExpressionError
from chorus.specs.expressions import (
    EVALUATION_TIMEOUT_S,
    Budget,
    Expression,
    off_the_loop,
    parse,
)

MAX_RENDERED_CHARS: Final = 1_000_000  # characters of one rendered template, all pieces together

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)


class Template:
    """A parsed template: literal text and expressions, in order."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._parts: list[str | Expression] = []
        position = 0
        for match in _PLACEHOLDER.finditer(source):
            self._parts.append(source[position : match.start()])
            self._parts.append(parse(match.group(1)))
            position = match.end()
        rest = source[position:]
        if "{{" in rest or "}}" in rest:
            raise ExpressionError(f"template {_short(source)!r}: a '{{{{' or '}}}}' is unpaired")
        self._parts.append(rest)

    @property
    def expressions(self) -> list[Expression]:
        return [p for p in self._parts if isinstance(p, Expression)]

    def render(self, context: Mapping[str, Any], *, budget: Budget | None = None) -> str:
        """The text, on the calling thread: from async code use `render_async`."""
        budget = budget or Budget()
        pieces: list[str] = []
        length = 0
        for part in self._parts:
            piece = part if isinstance(part, str) else part.text(context, budget=budget)
            length += len(piece)
            if length > MAX_RENDERED_CHARS:
                raise ExpressionError(
                    f"template {_short(self.source)!r}: the rendered text would be over the "
                    f"limit of {MAX_RENDERED_CHARS} characters"
                )
            pieces.append(piece)
        return "".join(pieces)

    async def render_async(
        self, context: Mapping[str, Any], *, timeout: float = EVALUATION_TIMEOUT_S
    ) -> str:
        """`render` in a worker thread, refused (ExpressionError) past `timeout` seconds."""
        budget = Budget(timeout=timeout)
        return await off_the_loop(lambda: self.render(context, budget=budget), budget)


def _short(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."
