"""obdconv's optional C extensions (cffi, API mode): loading them, and building one by hand.

Each extension has a pure-Python (or ctypes) path giving the same results, only slower, so a
missing extension is a warning, not an error, and an environment variable forces the slow path
(tests compare the two). `pip install` builds them (setup.py `cffi_modules`).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any


def load_extension(module: str, disable_env: str, log: logging.Logger, fallback: str) -> ModuleType | None:
    """The extension `module`, or None when `disable_env` is set or it was not built (logged on
    `log` as a warning that says what happens instead: `fallback`)."""
    if os.environ.get(disable_env):
        return None
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        log.warning("%s not built (%s); %s", module, exc, fallback)
        return None


def build_in_place(ffibuilder: Any, package_dir: Path, basename: str) -> Path:
    """Compile `ffibuilder` in a scratch directory (cffi writes its generated C and objects there)
    and install it in `package_dir` as `<basename>.abi3.so`: cffi's C code defines Py_LIMITED_API,
    so the module is abi3 whatever name compile() gives it, and this is the name `pip install -e .`
    gives it too. A version-specific name (`.cpython-311-...so`) would shadow, or be shadowed by,
    the one pip builds."""
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(ffibuilder.compile(tmpdir=tmp, verbose=False))
        target = package_dir / f"{basename}.abi3.so"
        shutil.copy2(built, target)
    return target
