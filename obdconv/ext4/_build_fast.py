"""cffi (API mode) build of `obdconv.ext4._fastapply`, the C fast path of the metadata pass.

Built at `pip install` by setuptools (`cffi_modules` in setup.py); needs gcc and the libext2fs
headers (Debian: libext2fs-dev). Without the built module the engine uses its ctypes path
(same bytes, slower). Build by hand: `python obdconv/ext4/_build_fast.py` (puts the .so next to it).
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
#define OBD_NEED_LINK 1
struct obd_dir_tail {
    uint64_t pblk;
    uint32_t off;
    uint32_t valid;
    unsigned char block[4096];
};
struct obd_result {
    uint32_t ino;
    int32_t nextents;
    uint64_t ext[12];
    const char *call;
    long rc;
};
void obd_capture_start(void);
void obd_capture_set_blksize(int blksize);
void obd_capture_stop(void);
long obd_capture_take(const uint64_t **out);
long obd_dir_add(uintptr_t fs, uint32_t dir, const char *name, int name_len, uint32_t ino, int ftype,
                 struct obd_dir_tail *tail, struct obd_result *res);
uint32_t obd_create_file(uintptr_t fs, uint32_t parent, uint32_t perm, uint32_t uid, uint32_t gid, uint64_t size,
                         int64_t mtime_ns, const char *name, int name_len, struct obd_dir_tail *tail,
                         struct obd_result *res);
long obd_finish_dir(uintptr_t fs, uint32_t ino, uint32_t mode, uint32_t uid, uint32_t gid, int64_t mtime_ns,
                    struct obd_result *res);
long obd_mkdir(uintptr_t fs, uint32_t parent, const char *name, int name_len, uint32_t mode, uint32_t uid,
               uint32_t gid, int64_t mtime_ns, struct obd_dir_tail *tail, struct obd_result *res);
long obd_set_times(uintptr_t fs, uint32_t ino, int64_t mtime_ns, struct obd_result *res);
long obd_iterate_dir(uintptr_t fs, uint32_t dir, const unsigned char **out, size_t *len);
void obd_alloc_hint_reset(void);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "obdconv.ext4._fastapply",
    (HERE / "_fastapply_impl.c").read_text(),
    libraries=["ext2fs", "com_err"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    from obdconv.native import build_in_place  # the hand build runs with obdconv installed (pip -e)

    print(f"built {build_in_place(ffibuilder, HERE, '_fastapply')}")
