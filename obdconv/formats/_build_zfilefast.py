"""cffi (API mode) build of `obdconv.formats._zfilefast`, the C fast path of ZFile compression.

Built at `pip install` by setuptools (`cffi_modules` in setup.py); needs gcc and the system liblz4
(Debian liblz4-1; no headers: the two LZ4 functions are declared in the C source). Without the
built module `obdconv.formats.zfile` compresses with a Python loop over the same liblz4 calls
(same bytes, slower, and holding the GIL between blocks). Build by hand:
`python obdconv/formats/_build_zfilefast.py` (puts the .so next to it).
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
#define OBD_ERR_ROOM -1
#define OBD_ERR_CODEC -2
uint32_t obd_crc32c_raw(uint32_t seed, const uint8_t *p, uint64_t n, int force_soft);
int64_t obd_lz4_blocks(const uint8_t *src, uint64_t n, uint32_t block_size, uint32_t seed,
                       uint8_t *dst, uint64_t cap, uint32_t *lengths);
int LZ4_compressBound(int inputSize);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "obdconv.formats._zfilefast",
    (HERE / "_zfile_fast_impl.c").read_text(),
    extra_compile_args=["-O2", "-Wall"],
    # The runtime library by its soname: Debian's liblz4-1 ships no unversioned liblz4.so.
    extra_link_args=["-l:liblz4.so.1"],
)

if __name__ == "__main__":
    from obdconv.native import build_in_place  # the hand build runs with obdconv installed (pip -e)

    print(f"built {build_in_place(ffibuilder, HERE, '_zfilefast')}")
