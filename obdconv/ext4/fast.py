"""The optional C fast path (`obdconv.ext4._fastapply`, built by cffi at install; see _build_fast.py).

`FAST` is the loaded module (with `.ffi` and `.lib`), or None when it was not built: the engine
then uses its ctypes path, which gives the same bytes, only slower. Set the environment variable
OBDCONV_EXT4_NO_FAST=1 to force the ctypes path (tests compare the two).
"""

from __future__ import annotations

import logging
from types import ModuleType

from obdconv.native import load_extension

log = logging.getLogger(__name__)


def _load() -> ModuleType | None:
    return load_extension("obdconv.ext4._fastapply", "OBDCONV_EXT4_NO_FAST", log,
                          "using the slower ctypes path. Reinstall with gcc and libext2fs-dev present to build it.")


FAST: ModuleType | None = _load()
