"""Decode YAML files (agent specs, workflows) into Structs, with errors that name field and line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import yaml

from chorus.errors import ConfigError

T = TypeVar("T")

_PATH = re.compile(r"at `\$((?:\.[^.\[`]+|\[\d+\])*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _line_of(root: yaml.Node | None, path: str) -> int | None:
    """The 1-based line of the node at a msgspec error path like `.steps[2].agent`."""
    node = root
    line = node.start_mark.line + 1 if node else None
    for key, index in _STEP.findall(path):
        if isinstance(node, yaml.MappingNode) and key:
            match = [(k, v) for k, v in node.value if getattr(k, "value", None) == key]
            if not match:
                return line
            node = match[0][1]
        elif isinstance(node, yaml.SequenceNode) and index:
            if int(index) >= len(node.value):
                return line
            node = node.value[int(index)]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def decode_yaml(text: str, kind: type[T], source: str = "<string>") -> T:
    """Parse YAML and convert it into `kind`, forbidding unknown fields where `kind` does."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if raw is None:
        raise ConfigError(f"{source}: the file is empty")
    return convert(raw, kind, source, root)


def convert(raw: Any, kind: type[T], source: str, root: yaml.Node | None = None) -> T:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH.search(message)
        path = match.group(1) if match else ""
        unknown = _UNKNOWN.search(message)
        if unknown:  # the error points at the object: point at the unknown key instead
            path = f"{path}.{unknown.group(1)}"
        where = ""
        if path:
            line = _line_of(root, path)
            where = f" (field {path.lstrip('.')}" + (f", line {line})" if line else ")")
        raise ConfigError(f"{source}{where}: {message}") from None


def load_yaml(path: str | Path, kind: type[T]) -> T:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
    return decode_yaml(text, kind, str(file))
