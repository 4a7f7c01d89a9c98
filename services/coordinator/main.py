"""The coordinator container's entry point, the same as `chorus coordinator`.

The wiring lives in `chorus.coordinator.process`: the CLI and this entry point start the same thing.
"""

from __future__ import annotations

import sys

from chorus.cli.main import main as chorus_main
from chorus.coordinator.process import serve

__all__ = ["main", "serve"]


def main() -> int:
    return chorus_main(["coordinator", *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
