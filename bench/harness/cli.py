"""The flags every benchmark shares, and how a script runs: its work directory (a temporary
one, or `--keep DIR`), then its async main."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from bench.harness.profile import require_py_spy

Main = Callable[[argparse.Namespace, Path], Coroutine[Any, Any, None]]


def parser(
    module: str,
    doc: str | None,
    *,
    trace: str | None = None,
    repeat: str | None = None,
    profile: str | None = None,
) -> argparse.ArgumentParser:
    """`--smoke` and `--keep` always; `--trace N`, `--repeat N` (alias `--runs`) and
    `--profile DIR` where the script has them (the text is their help)."""
    summary, _, usage = (doc or "").partition("\n\n")
    parsed = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=summary,
        epilog=usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parsed.add_argument(
        "--smoke", action="store_true", help="the smallest sizes: checks it works, in seconds"
    )
    parsed.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep the logs, taps and server store in DIR"
    )
    if trace:
        parsed.add_argument("--trace", type=int, metavar="N", help=trace)
    if repeat:
        parsed.add_argument("--repeat", "--runs", dest="repeat", type=int, metavar="N", help=repeat)
    if profile:
        parsed.add_argument("--profile", type=Path, metavar="DIR", help=profile)
    return parsed


@contextlib.contextmanager
def workdir(keep: Path | None, prefix: str) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def run(main: Main, args: argparse.Namespace, prefix: str) -> int:
    """Prepare `--profile DIR` (py-spy must be installed), then `main(args, workdir)`."""
    profile: Path | None = getattr(args, "profile", None)
    if profile is not None:
        require_py_spy()
        profile.mkdir(parents=True, exist_ok=True)
    if getattr(args, "repeat", None) is not None and args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    with workdir(args.keep, prefix) as where:
        asyncio.run(main(args, where))
    return 0
