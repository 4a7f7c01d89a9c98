"""The import breakdown of `bench.agent_startup`: which imports cost an agent process its
start-up time and memory.

The agent runs once more under an import probe (`IMPORT_PROBE`, run with `python -c`) that
measures every module load: the resident memory and time it adds itself (its imports
excluded, as `-X importtime` reports self time), the module whose code imported it, and the
nearest Chorus module on the stack. Printed per package, then the imports Chorus code makes,
heaviest first. Imported by `bench.agent_startup`; not a script of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.harness.tables import markdown_table

# The agent process again, with every module load measured: the resident memory and time it
# adds itself (its imports excluded, as in `-X importtime`), the module whose code imported
# it, and the nearest Chorus module on the stack. Written as JSON to $CHORUS_BENCH_IMPORTS at
# exit. `_load_unlocked` is CPython's private hook that every module load goes through.
IMPORT_PROBE = r"""
import _frozen_importlib as bootstrap, atexit, json, os, runpy, sys, time

def rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

def callers():
    # The module whose code ran the import, whether that code was a function, and the
    # nearest Chorus module; the import machinery and this probe are skipped.
    frame, importer, in_function, ours = sys._getframe(2), None, False, None
    while frame is not None and ours is None:
        spec = frame.f_globals.get("__spec__")
        name = getattr(spec, "name", None) or frame.f_globals.get("__name__", "")
        if frame.f_code not in PROBE and not name.startswith(("importlib", "_frozen_importlib")):
            if importer is None:
                importer, in_function = name, frame.f_code.co_name != "<module>"
            if name.split(".")[0] in ("chorus", "services"):
                ours = name
        frame = frame.f_back
    return importer, in_function, ours

load, stack, modules = bootstrap._load_unlocked, [], []

def measured_load(spec):
    importer, lazy, ours = callers()
    entry = {"name": spec.name, "importer": importer, "origin": ours, "lazy": lazy}
    modules.append(entry)
    stack.append([0, 0.0])
    kb, started = rss(), time.perf_counter()
    try:
        return load(spec)
    finally:
        child_kb, child_s = stack.pop()
        total_kb, total_s = rss() - kb, time.perf_counter() - started
        if stack:
            stack[-1][0] += total_kb
            stack[-1][1] += total_s
        entry.update(
            self_kb=total_kb - child_kb, total_kb=total_kb,
            self_ms=(total_s - child_s) * 1000, total_ms=total_s * 1000,
        )

PROBE = {callers.__code__, measured_load.__code__}

def dump(baseline=rss()):
    with open(os.environ["CHORUS_BENCH_IMPORTS"], "w") as out:
        json.dump({"baseline_kb": baseline, "exit_kb": rss(), "modules": modules}, out)

bootstrap._load_unlocked = measured_load
atexit.register(dump)
sys.argv = ["chorus", *sys.argv[1:]]
runpy.run_module("chorus", run_name="__main__", alter_sys=True)
"""


def mib(kb: float) -> float:
    return kb / 1024


@dataclass
class ModuleLoad:
    """One module load in the agent process, as the import probe saw it."""

    name: str
    importer: str | None  # the module whose code ran the import
    origin: str | None  # the nearest Chorus module on the stack
    lazy: bool  # imported by a function at run time, not by a module body
    self_kb: int
    total_kb: int
    self_ms: float
    total_ms: float


@dataclass
class ImportProfile:
    baseline_kb: int
    exit_kb: int
    modules: list[ModuleLoad]


def is_ours(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in ("chorus", "services")


def read_profile(path: Path) -> ImportProfile:
    raw = json.loads(path.read_text())
    loads = [ModuleLoad(**entry) for entry in raw["modules"]]
    return ImportProfile(raw["baseline_kb"], raw["exit_kb"], loads)


def imported_by(load: ModuleLoad) -> str:
    lazy = " (lazy)" if load.lazy else ""
    if load.origin is None or load.origin == load.importer:
        return f"`{load.importer}`{lazy}"
    return f"`{load.origin}` via `{load.importer}`{lazy}"


def package_table(profile: ImportProfile, top: int) -> str:
    # Third-party and standard library by package; Chorus module by module.
    packages: dict[str, list[ModuleLoad]] = {}
    for load in profile.modules:
        key = load.name if is_ours(load.name) else load.name.split(".")[0]
        packages.setdefault(key, []).append(load)

    def kb(loads: list[ModuleLoad]) -> int:
        return sum(load.self_kb for load in loads)

    ranked = sorted(packages.items(), key=lambda item: -kb(item[1]))[:top]
    rows = [
        [
            f"`{name}`",
            str(len(loads)),
            f"{sum(load.self_ms for load in loads):.1f}",
            f"{mib(kb(loads)):.1f}",
            imported_by(loads[0]),  # loads are in start order: the first brought it in
        ]
        for name, loads in ranked
    ]
    header = ["package", "modules", "import ms", "RSS MiB", "first imported by"]
    return markdown_table(header, rows)


def chorus_import_table(profile: ImportProfile, top: int) -> str:
    """The imports Chorus code makes itself, heaviest first: what a lazy import would save."""
    direct = [load for load in profile.modules if is_ours(load.importer) or load.lazy]
    ranked = sorted(direct, key=lambda load: -load.total_kb)[:top]
    rows = [
        [
            f"`{load.importer}`",
            f"`{load.name}`" + (" (lazy)" if load.lazy else ""),
            f"{load.total_ms:.1f}",
            f"{mib(load.total_kb):.1f}",
        ]
        for load in ranked
    ]
    header = ["importer", "imports", "ms with its imports", "RSS MiB with its imports"]
    return markdown_table(header, rows)


def breakdown(label: str, profile: ImportProfile, top: int) -> str:
    """The import breakdown of one agent case, as Markdown."""
    total_kb = sum(load.self_kb for load in profile.modules)
    total_ms = sum(load.self_ms for load in profile.modules)
    return "\n".join(
        [
            f"**{label}**: the interpreter starts at {mib(profile.baseline_kb):.1f} MiB; "
            f"{len(profile.modules)} module loads add {mib(total_kb):.1f} MiB and take "
            f"{total_ms:.0f} ms; VmRSS at exit {mib(profile.exit_kb):.1f} MiB.",
            "",
            "Packages by resident memory (each module counted alone, without its imports):",
            "",
            package_table(profile, top),
            "",
            "Imports made by Chorus code (and at run time), with everything they pull in:",
            "",
            chorus_import_table(profile, top),
        ]
    )
