"""Bytes objects whose memory C code fills in place (the ZFile reader decodes into them, the gzip
index builder inflates into them), handed to Python code without a copy; flat byte views of buffers."""

from __future__ import annotations

import ctypes

# PyBytes_FromStringAndSize(NULL, n) gives a bytes object with *uninitialised* contents that its
# creator must fill before anyone else sees it (or sees the part of it they are given: the gzip index
# builder hands out each stretch it filled as a view while it fills the rest): the C-API idiom every
# codec uses to return bytes without an extra copy. Readers decode straight into such an object (through cffi) instead of into
# a bytearray that `bytes()` would then copy once more; at 4 KiB LZ4 blocks that copy alone cost
# ~15 % of the read time.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def uninitialised_bytes(n: int) -> bytes:
    return _new_bytes(None, n) if n > 1 else bytes(n)  # 0/1-byte bytes may be shared singletons


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """`data` as a flat view of unsigned bytes: the view itself when it already is one (what the
    tar scanner passes), else a cast (no copy either way)."""
    if isinstance(data, memoryview) and data.format == "B" and data.ndim == 1:
        return data
    return memoryview(data).cast("B")
