"""Text templates: `{{ expression }}` replaced by the expression's value, as text.

    Template("Summarise: {{ steps.research.output }}").render(context)

Expressions are the language of `chorus.specs.expressions`, checked when the template is
built, so a bad template is reported before anything runs. Values read as text: strings as they
are, None as empty, numbers as digits, true/false, lists and mappings as JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from chorus.errors import ExpressionError
from chorus.specs.expressions import Expression, as_text, parse

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

    def render(self, context: Mapping[str, Any]) -> str:
        return "".join(
            part if isinstance(part, str) else as_text(part.evaluate(context))
            for part in self._parts
        )


def _short(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def render(source: str, context: Mapping[str, Any]) -> str:
    return Template(source).render(context)
