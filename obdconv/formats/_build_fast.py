"""cffi (API mode) build of `obdconv.formats._formatsfast`, the C fast paths of the byte formats:
ZFile block compression (LZ4 + CRC32C a batch per call) and the gzip index builder's inflate loop
(inflate to every deflate block boundary, a buffer per call).

Built at `pip install` by setuptools (`cffi_modules` in setup.py); needs gcc and the system liblz4
(Debian liblz4-1; no headers: the LZ4 functions are declared in the C source; inflate is called
through a pointer the caller passes, so zlib or zlib-ng, whichever the index builder uses). Without
the built module the same work runs in Python loops over the same library calls (same bytes,
slower, holding the GIL between calls). Build by hand: `python obdconv/formats/_build_fast.py`
(puts the .so next to it).
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

struct obd_zfields { int64_t next_in, avail_in, next_out, avail_out, data_type; };
struct obd_inflate_state { uint64_t pos, total_in, total_out, last_reported; int32_t rc; };
int64_t obd_inflate_blocks(void *inflate_fn, void *strm, const struct obd_zfields *f, uint8_t *out, uint64_t end,
                           struct obd_inflate_state *st, uint64_t *bounds, int64_t max_bounds);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "obdconv.formats._formatsfast",
    (HERE / "_fast_impl.c").read_text(),
    extra_compile_args=["-O2", "-Wall"],
    # The runtime library by its soname: Debian's liblz4-1 ships no unversioned liblz4.so.
    extra_link_args=["-l:liblz4.so.1"],
)

if __name__ == "__main__":
    from obdconv.native import build_in_place  # the hand build runs with obdconv installed (pip -e)

    print(f"built {build_in_place(ffibuilder, HERE, '_formatsfast')}")
