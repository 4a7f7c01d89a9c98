"""The orchestrator container's entry point, the same as `chorus orchestrator`.

The wiring lives in `chorus.orchestrator.process`: the CLI and this start the same thing.
"""

from __future__ import annotations

import sys

from chorus.cli.main import main as chorus_main
from chorus.orchestrator.process import serve

__all__ = ["main", "serve"]


def main() -> int:
    return chorus_main(["orchestrator", *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
