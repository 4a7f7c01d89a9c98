"""The agent container's entry point, the same as `chorus agent run SPEC`.

The wiring lives in `chorus.agent.process`: the CLI and this entry point start the same thing.
"""

from __future__ import annotations

import sys

from chorus.agent.process import serve
from chorus.cli.main import main as chorus_main

__all__ = ["main", "serve"]


def main() -> int:
    return chorus_main(["agent", "run", *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
