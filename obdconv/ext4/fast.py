"""The optional C fast path (`obdconv.ext4._fastapply`, built by cffi at install; see _build_fast.py).

`FAST` is the loaded module (with `.ffi` and `.lib`), or None when it was not built: the engine
then uses its ctypes path, which gives the same bytes, only slower. Set the environment variable
OBDCONV_EXT4_NO_FAST=1 to force the ctypes path (tests compare the two).
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)


def _load() -> ModuleType | None:
    if os.environ.get("OBDCONV_EXT4_NO_FAST"):
        return None
    try:
        module = importlib.import_module("obdconv.ext4._fastapply")
    except ImportError as exc:
        log.warning("ext4 C fast path not built (%s); using the slower ctypes path. "
                    "Reinstall with gcc and libext2fs-dev present to build it.", exc)
        return None
    return module


FAST: ModuleType | None = _load()
