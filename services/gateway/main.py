"""The gateway container's entry point, the same as `chorus gateway`.

The wiring lives in `chorus.gateway.process`: the CLI and this entry point start the same thing.
"""

from __future__ import annotations

import sys

from chorus.cli.main import main as chorus_main
from chorus.gateway.process import serve

__all__ = ["main", "serve"]


def main() -> int:
    return chorus_main(["gateway", *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
