"""The answers of human steps: their `schema:` (JSON Schema) checked when the workflow is
read, and each answer checked against it, with errors that say where and what is wrong.

The `jsonschema` library does the checking (Draft 2020-12, the draft msgspec emits)."""

from __future__ import annotations

from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError
from jsonschema.validators import Draft202012Validator

from chorus.errors import InvalidAnswer, InvalidWorkflow

MAX_LISTED = 5


def check_answer_schema(schema: dict[str, Any], field: str = "schema") -> None:
    """InvalidWorkflow naming the field when `schema` is not a valid JSON Schema."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise InvalidWorkflow(f"`{field}{where}`: not a valid JSON Schema: {exc.message}") from None


def _path(error: jsonschema.ValidationError) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def check_answer(schema: dict[str, Any] | None, value: Any, *, step: str = "") -> None:
    """InvalidAnswer listing what in `value` the schema refuses (where, and why)."""
    if schema is None:
        return
    errors = sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: e.path)
    if not errors:
        return
    problems = [f"at {_path(e)}: {e.message}" for e in errors[:MAX_LISTED]]
    if len(errors) > MAX_LISTED:
        problems.append(f"and {len(errors) - MAX_LISTED} more")
    what = f"the answer to step {step}" if step else "the answer"
    raise InvalidAnswer(
        f"{what} does not match its schema: {'; '.join(problems)}. The run is still waiting: "
        "send a corrected answer"
    )
