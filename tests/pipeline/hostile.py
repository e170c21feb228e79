"""A working directory full of modules named like the ones obdconv imports, each leaving a marker
file when imported: no obdconv process may import any of them (obdconv/interpreter.py)."""

from __future__ import annotations

from pathlib import Path

# Modules the CLI, the runner's pool, the fleet's workers and Flower import, and Flower's config file.
MODULES = ["json", "concurrent", "zstandard", "isal", "peewee", "multiprocessing", "tasks", "workers",
           "flowerconfig"]
PACKAGES = ["obdconv"]


def make_hostile_directory(directory: Path, markers: Path, *, packages: bool = True) -> Path:
    """Fill `directory` with the modules; each one writes `markers/<module>-<pid>` holding the
    importing process's command line. `packages=False` leaves out the `obdconv/` package (which
    `python -m obdconv` from that directory runs by Python's own rules)."""
    directory.mkdir(parents=True, exist_ok=True)
    markers.mkdir(parents=True, exist_ok=True)
    body = ("import os, sys\n"
            "with open(os.path.join({markers!r}, {name!r} + '-' + str(os.getpid())), 'w') as f:\n"
            "    f.write(' '.join(sys.argv))\n")
    for name in MODULES:
        (directory / f"{name}.py").write_text(body.format(markers=str(markers), name=name))
    if packages:
        for name in PACKAGES:
            (directory / name).mkdir(exist_ok=True)
            (directory / name / "__init__.py").write_text(body.format(markers=str(markers), name=name))
    return directory


def imported(markers: Path) -> dict[str, str]:
    """marker file name -> command line of the process that imported a planted module."""
    return {p.name: p.read_text() for p in markers.iterdir()}
