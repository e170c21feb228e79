"""cffi (API mode) build of `obdconv.oci._tarscanfast`, the C fast path of the tar scanner.

Built at `pip install` by setuptools (`cffi_modules` in setup.py); needs only gcc and the libc
headers. Without the built module `obdconv.oci.tarscan` parses every header in Python (same
results, slower). Build by hand: `python obdconv/oci/_build_tarscan.py` (puts the .so next to it).
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
#define OBD_STOP_DONE 0
#define OBD_STOP_PYTHON 1
#define OBD_STOP_FULL 2
#define OBD_STOP_DATA 3
struct obd_tar_rec {
    int64_t mode, uid, gid, mtime_ns, size, devmajor, devminor, tar_offset, data_offset;
    int64_t content_pos;
    uint32_t path_off, path_len, link_off, link_len;
    int32_t type;
    int32_t tail_pad;
};
struct obd_tar_cursor {
    uint64_t pos;
    int64_t base;
    int64_t data_pos;
    uint64_t arena_used;
    int32_t stop;
};
long obd_tar_scan(const unsigned char *buf, uint64_t len, struct obd_tar_cursor *cur, struct obd_tar_rec *recs,
                  long max_recs, unsigned char *arena, uint64_t arena_cap);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "obdconv.oci._tarscanfast",
    (HERE / "_tarscan_fast_impl.c").read_text(),
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    from obdconv.native import build_in_place  # the hand build runs with obdconv installed (pip -e)

    print(f"built {build_in_place(ffibuilder, HERE, '_tarscanfast')}")
