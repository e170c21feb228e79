/*
 * C fast path of the ext4 metadata pass (compiled by cffi in API mode into _fastapply, see _build_fast.py).
 *
 * Why C: per regular file the ctypes path spends most of its time in Python (argument
 * conversion, struct packing, one Python callback per block libext2fs writes). This file does
 * the same libext2fs calls, with the same arguments and in the same order, as the Python code
 * it replaces, so the image (and every captured segment) is byte-identical:
 *   - write capture: layer.py/capture.py `WriteCapture` callbacks -> obd_capture_*;
 *   - dirs.py `DirIndex.add` / `_find_tail` / `_append` -> obd_dir_add;
 *   - layer.py `LayerApply.create_file` (plain files, no xattrs) -> obd_create_file;
 *   - layer.py `LayerApply.mkdir` -> obd_mkdir (+ obd_finish_dir), the directory-times pass -> obd_set_times.
 * Two places make different (cheaper) libext2fs calls with provably the same outcome: new_inode()
 * (starts ext2fs_new_inode's scan past full groups) and the fallocate goal (alloc_hint).
 * Any change to those Python functions must be mirrored here (tests/ext4/test_fast.py compares
 * both paths' output byte for byte).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <ext2fs/ext2fs.h>
#include <ext2fs/ext3_extents.h>

#define OBD_BLOCK_SIZE 4096
#define OBD_INODE_SIZE 256             /* mkfs -I 256 */
#define OBD_EXTRA_ISIZE (0xA0 - 128)   /* the extra fields we fill in (layer.py) */
#define OBD_EXT_INIT_MAX_LEN (1 << 15) /* ee_len above this: uninitialised extent */
#define OBD_CSUM_TAIL_TYPE 0xDE        /* file_type of a dir block's checksum tail */
#define OBD_NS 1000000000LL
/* ext4's time range: the same as MIN_SECONDS/MAX_SECONDS in obdconv/faithful.py */
#define OBD_MIN_SECONDS (-(1LL << 31))
#define OBD_MAX_SECONDS ((1LL << 34) - (1LL << 31) - 1)

/* Return code of obd_dir_add/obd_create_file: the directory has no appendable tail (htree,
 * inline data, checksum tail, unexpected layout): the caller links with ext2fs_link. */
#define OBD_NEED_LINK 1

/* test_io.c exports this one, but ext2_io.h does not declare it. */
extern void (*test_io_cb_write_byte)(unsigned long block, int count, errcode_t err);

struct obd_dir_tail {
    uint64_t pblk;  /* the directory's last block */
    uint32_t off;   /* offset of that block's last entry */
    uint32_t valid; /* 0: not known (find it before appending) */
    unsigned char block[OBD_BLOCK_SIZE]; /* its bytes: only we change that block */
};

struct obd_result {
    uint32_t ino;
    int32_t nextents;  /* leaf extents of a depth-0 tree in ext, or -1: read them via libext2fs */
    uint64_t ext[12];  /* up to 4 x (lblk, pblk, length) */
    const char *call;  /* the call that failed, when the return code is an errcode */
    long rc;           /* obd_create_file's outcome: 0, OBD_NEED_LINK or an errcode */
};

/* ---------------- write capture (test_io callbacks; one capture per process) ---------------- */

static uint64_t *cap_blocks;
static size_t cap_len, cap_size;
static int cap_blksize = 1024;
static int cap_nomem;

static void cap_add_range(uint64_t first, uint64_t last)
{
    for (uint64_t b = first; b <= last; b++) {
        if (cap_len && cap_blocks[cap_len - 1] == b)
            continue; /* the common rewrite of the same block: no need to store it twice */
        if (cap_len == cap_size) {
            size_t n = cap_size ? cap_size * 2 : 65536;
            uint64_t *p = realloc(cap_blocks, n * sizeof(*p));
            if (!p) {
                cap_nomem = 1;
                return;
            }
            cap_blocks = p;
            cap_size = n;
        }
        cap_blocks[cap_len++] = b;
    }
}

/* (start byte, length) -> the 4 KiB blocks it touches (as capture.py's on_write). */
static void cap_add_bytes(uint64_t start, uint64_t nbytes)
{
    uint64_t first = start / OBD_BLOCK_SIZE;
    if (nbytes == 0) {
        if (start % OBD_BLOCK_SIZE)
            cap_add_range(first, first);
        return;
    }
    cap_add_range(first, (start + nbytes - 1) / OBD_BLOCK_SIZE);
}

static void cap_write(uint64_t block, int count, errcode_t err)
{
    if (err)
        return;
    /* count < 0 means -count bytes; else blocks of the channel's current block size */
    uint64_t nbytes = count < 0 ? (uint64_t)(-(int64_t)count) : (uint64_t)count * (uint64_t)cap_blksize;
    cap_add_bytes(block * (uint64_t)cap_blksize, nbytes);
}

static void cb_write_blk64(unsigned long long block, int count, errcode_t err) { cap_write(block, count, err); }
static void cb_write_blk(unsigned long block, int count, errcode_t err) { cap_write(block, count, err); }

static void cb_write_byte(unsigned long offset, int count, errcode_t err)
{
    if (err || count <= 0)
        return;
    cap_add_bytes(offset, (uint64_t)count);
}

static void cb_set_blksize(int blksize, errcode_t err)
{
    if (!err)
        cap_blksize = blksize;
}

void obd_capture_start(void)
{
    cap_len = 0;
    cap_nomem = 0;
    cap_blksize = 1024; /* a new channel starts at 1 KiB */
    test_io_backing_manager = unix_io_manager;
    test_io_cb_write_blk64 = cb_write_blk64;
    test_io_cb_write_blk = cb_write_blk;
    test_io_cb_write_byte = cb_write_byte;
    test_io_cb_set_blksize = cb_set_blksize;
}

/* The capture goes on over a channel opened before obd_capture_start (the builder keeps the
 * filesystem open between layers): its block size is no longer the 1 KiB of a new channel.
 * (test_io copies the callback pointers at open; these static functions stay valid.) */
void obd_capture_set_blksize(int blksize)
{
    cap_blksize = blksize;
}

void obd_capture_stop(void)
{
    test_io_cb_write_blk64 = NULL;
    test_io_cb_write_blk = NULL;
    test_io_cb_write_byte = NULL;
    test_io_cb_set_blksize = NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The captured block numbers, sorted and unique; -1 if memory ran out while capturing. */
long obd_capture_take(const uint64_t **out)
{
    if (cap_nomem)
        return -1;
    if (cap_len)
        qsort(cap_blocks, cap_len, sizeof(*cap_blocks), cmp_u64);
    size_t n = 0;
    for (size_t i = 0; i < cap_len; i++)
        if (!n || cap_blocks[n - 1] != cap_blocks[i])
            cap_blocks[n++] = cap_blocks[i];
    cap_len = n;
    *out = cap_blocks;
    return (long)n;
}

/* ---------------- directory appends (dirs.py DirIndex) ---------------- */

static inline unsigned dirent_size(unsigned name_len) { return (8 + name_len + 3) & ~3u; }
static inline uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline void put16(unsigned char *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static inline void put32(unsigned char *p, uint32_t v) { p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24; }

#define FAIL(name) do { res->call = (name); return rc; } while (0)

/* DirIndex._find_tail: 0 and tail->valid = 1, or 0 and valid = 0 (no appendable tail), or an errcode. */
static long find_tail(ext2_filsys fs, ext2_ino_t dir, struct obd_dir_tail *tail, struct obd_result *res)
{
    union { struct ext2_inode_large inode; unsigned char raw[OBD_INODE_SIZE]; } u;
    errcode_t rc;
    tail->valid = 0;
    rc = ext2fs_read_inode_full(fs, dir, (struct ext2_inode *)&u.inode, OBD_INODE_SIZE);
    if (rc)
        FAIL("ext2fs_read_inode_full");
    if (u.inode.i_flags & (EXT2_INDEX_FL | EXT4_INLINE_DATA_FL))
        return 0;
    uint64_t size = u.inode.i_size | (uint64_t)u.inode.i_size_high << 32;
    if (size < OBD_BLOCK_SIZE)
        return 0;
    blk64_t pblk = 0;
    rc = ext2fs_bmap2(fs, dir, (struct ext2_inode *)&u.inode, NULL, 0, size / OBD_BLOCK_SIZE - 1, NULL, &pblk);
    if (rc)
        FAIL("ext2fs_bmap2");
    if (!pblk)
        return 0;
    rc = ext2fs_read_dir_block4(fs, pblk, tail->block, 0, dir);
    if (rc)
        FAIL("ext2fs_read_dir_block4");
    unsigned off = 0;
    for (;;) {
        unsigned rec_len = get16(tail->block + off + 4);
        if (rec_len < 8 || off + rec_len > OBD_BLOCK_SIZE)
            return 0; /* unexpected layout: ext2fs_link */
        if (off + rec_len == OBD_BLOCK_SIZE)
            break;
        off += rec_len;
    }
    const unsigned char *last = tail->block + off;
    if (!get32(last) && off && get16(last + 4) == 12 && last[6] == 0 && last[7] == OBD_CSUM_TAIL_TYPE)
        return 0; /* a metadata_csum parent's checksum tail: ext2fs_link maintains it */
    tail->pblk = pblk;
    tail->off = off;
    tail->valid = 1;
    return 0;
}

/* DirIndex._append: 0 appended, -1 the block is full, or an errcode. */
static long append(ext2_filsys fs, ext2_ino_t dir, struct obd_dir_tail *tail, const char *name,
                   unsigned name_len, ext2_ino_t ino, int ftype, struct obd_result *res)
{
    unsigned char *block = tail->block;
    unsigned off = tail->off;
    uint32_t last_ino = get32(block + off);
    unsigned rec_len = get16(block + off + 4), last_name_len = block[off + 6], last_type = block[off + 7];
    unsigned used = last_ino ? dirent_size(last_name_len) : 0;
    unsigned need = dirent_size(name_len);
    unsigned new_off = off;
    errcode_t rc;
    if (rec_len - used < need || rec_len < used)
        return -1;
    if (used) {
        put16(block + off + 4, used);
        block[off + 6] = last_name_len;
        block[off + 7] = last_type;
        new_off = off + used;
    }
    put32(block + new_off, ino);
    put16(block + new_off + 4, rec_len - used);
    block[new_off + 6] = name_len;
    block[new_off + 7] = ftype;
    memset(block + new_off + 8, 0, need - 8);
    memcpy(block + new_off + 8, name, name_len);
    rc = ext2fs_write_dir_block4(fs, tail->pblk, block, 0, dir);
    if (rc)
        FAIL("ext2fs_write_dir_block4");
    tail->off = new_off;
    return 0;
}

static long dir_add(ext2_filsys fs, ext2_ino_t dir, const char *name, int name_len, ext2_ino_t ino, int ftype,
                    struct obd_dir_tail *tail, struct obd_result *res)
{
    long rc;
    if (!tail->valid) {
        rc = find_tail(fs, dir, tail, res);
        if (rc)
            return rc;
        if (!tail->valid)
            return OBD_NEED_LINK;
    }
    rc = append(fs, dir, tail, name, name_len, ino, ftype, res);
    if (rc >= 0)
        return rc;
    rc = ext2fs_expand_dir(fs, dir);
    if (rc)
        FAIL("ext2fs_expand_dir");
    rc = find_tail(fs, dir, tail, res);
    if (rc)
        return rc;
    if (tail->valid) {
        rc = append(fs, dir, tail, name, name_len, ino, ftype, res);
        if (rc >= 0)
            return rc;
    }
    res->call = "directory append";
    return EXT2_ET_DIR_NO_SPACE;
}

long obd_dir_add(uintptr_t fs, uint32_t dir, const char *name, int name_len, uint32_t ino, int ftype,
                 struct obd_dir_tail *tail, struct obd_result *res)
{
    return dir_add((ext2_filsys)fs, dir, name, name_len, ino, ftype, tail, res);
}

/* ---------------- regular files (layer.py LayerApply.create_file) ---------------- */

/* fields.encode_time: (low 32 bits, extra word), clamped to ext4's range like the kernel. */
static void encode_time(int64_t ns, uint32_t *lo, uint32_t *extra)
{
    int64_t sec = ns / OBD_NS, nsec = ns % OBD_NS;
    if (nsec < 0) { /* floor division, as Python's divmod */
        nsec += OBD_NS;
        sec -= 1;
    }
    if (sec < OBD_MIN_SECONDS) {
        sec = OBD_MIN_SECONDS;
        nsec = 0;
    } else if (sec > OBD_MAX_SECONDS) {
        sec = OBD_MAX_SECONDS;
        nsec = OBD_NS - 1;
    }
    *lo = (uint32_t)sec;
    int64_t epoch = (sec - (int64_t)(int32_t)*lo) / (1LL << 32); /* exact: a multiple of 2^32 */
    *extra = (uint32_t)(nsec << 2) | (uint32_t)(epoch & 3);
}

static long create_file(ext2_filsys fs, uint32_t parent, uint32_t mode, uint32_t uid, uint32_t gid, uint64_t size,
                        int64_t mtime_ns, const char *name, int name_len, struct obd_dir_tail *tail,
                        struct obd_result *res);

/*
 * ext2fs_new_inode(fs, dir, mode, NULL, ino), same result and side effects, without its
 * O(inodes) cost: it scans the inode bitmap from the start of dir's group, group after group
 * (cyclically), so once the groups there are full every call re-scans all of them (~800 words
 * per file at 50k files). A group whose free-inode count is 0 has no clear bit (counts and
 * bitmap move together in ext2fs_inode_alloc_stats2, and a checked filesystem agrees), so the
 * scan passes over it unchanged; we start it at the LAST full group before the first group with
 * a free inode instead. Not at that group itself: each group's scan range ends one inode into the
 * next group (libext2fs 1.47 alloc.c), so a fresh group's first inode is taken without
 * check_inode_uninit, which leaves its BLOCK_UNINIT flag set; starting one group earlier keeps
 * that exactly. (The ctypes path calls ext2fs_new_inode itself; tests compare both.)
 */
static errcode_t new_inode(ext2_filsys fs, ext2_ino_t dir, int mode, ext2_ino_t *ino)
{
    uint32_t ipg = fs->super->s_inodes_per_group;
    dgrp_t count = fs->group_desc_count;
    if (dir > 0 && ipg && count && (dir - 1) / ipg < count) {
        dgrp_t first = (dir - 1) / ipg, g = first, last_full = first;
        while (ext2fs_bg_free_inodes_count(fs, g) == 0) {
            last_full = g;
            g = g + 1 == count ? 0 : g + 1;
            if (g == first)
                break; /* all full: ext2fs_new_inode fails as usual */
        }
        if (last_full != first && g != first)
            dir = last_full * ipg + 1;
    }
    return ext2fs_new_inode(fs, dir, mode, NULL, ino);
}

/* layer.py _root_extents: the leaf extents of a depth-0 tree, or -1 (deeper, or uninitialised). */
static int root_extents(const struct ext2_inode_large *inode, uint64_t *ext)
{
    const unsigned char *raw = (const unsigned char *)inode->i_block;
    if (get16(raw) != EXT3_EXT_MAGIC || get16(raw + 6) != 0)
        return -1;
    unsigned entries = get16(raw + 2);
    if (entries > 4)
        return -1;
    for (unsigned k = 0; k < entries; k++) {
        const unsigned char *leaf = raw + 12 + 12 * k;
        unsigned length = get16(leaf + 4);
        if (length > OBD_EXT_INIT_MAX_LEN)
            return -1;
        ext[3 * k] = get32(leaf);
        ext[3 * k + 1] = (uint64_t)get16(leaf + 6) << 32 | get32(leaf + 8);
        ext[3 * k + 2] = length;
    }
    return (int)entries;
}

/*
 * Where ext2fs_fallocate's search for a free block may start. Given goal ~0, it takes
 * ext2fs_find_inode_goal (for a new inode: the first block of its flex group) and scans the
 * block bitmap from there for the first free block: past every block allocated so far in that
 * flex group, so O(blocks) per file (~6 % of the pass on a 70k-file layer, growing with it).
 * We pass a later start instead: `next`, with every block in [key, next) known to be in use
 * (the scan would pass over them: same first free block, same allocation). Blocks only get
 * allocated between files on the fast path; whoever frees blocks (LayerApply.drop, xattr
 * changes) calls obd_alloc_hint_reset, as does every new pass.
 */
static struct {
    ext2_filsys fs;
    blk64_t key;  /* the inode goal this applies to */
    blk64_t next; /* [key, next) are all in use */
} alloc_hint;

void obd_alloc_hint_reset(void)
{
    alloc_hint.fs = NULL;
}

static blk64_t falloc_goal(ext2_filsys fs, ext2_ino_t ino, struct ext2_inode_large *inode, blk64_t *key)
{
    *key = ext2fs_find_inode_goal(fs, ino, (struct ext2_inode *)inode, 0);
    if (alloc_hint.fs == fs && alloc_hint.key == *key && alloc_hint.next > *key)
        return alloc_hint.next;
    return *key;
}

/* After a fallocate from `key`: its first extent starts at the first free block the scan found,
 * and is in use now. Anything else (a deeper tree, a search that wrapped around) leaves the old
 * hint, which still holds: blocks were only allocated. */
static void falloc_done(ext2_filsys fs, blk64_t key, int nextents, const uint64_t *ext)
{
    if (nextents < 1 || ext[0] != 0 || ext[1] < key)
        return;
    alloc_hint.fs = fs;
    alloc_hint.key = key;
    alloc_hint.next = ext[1] + ext[2];
}

/*
 * A new regular file without xattrs: new_inode, alloc_stats, the inode with i_size set and an
 * empty extent root, fallocate(FORCE_INIT) of its blocks, write_inode_full, then the directory
 * entry. `perm` is the permission bits (S_IFREG is added here).
 * Returns the new inode number (> 0) when done; else 0 and res->rc is OBD_NEED_LINK (the file
 * exists, res->ino; the caller links it) or an errcode (res->call names the call).
 * (The inode comes back as the return value because reading it from res costs the Python
 * caller an attribute lookup per file.)
 */
uint32_t obd_create_file(uintptr_t fsp, uint32_t parent, uint32_t perm, uint32_t uid, uint32_t gid, uint64_t size,
                         int64_t mtime_ns, const char *name, int name_len, struct obd_dir_tail *tail,
                         struct obd_result *res)
{
    res->rc = create_file((ext2_filsys)fsp, parent, LINUX_S_IFREG | perm, uid, gid, size, mtime_ns, name, name_len,
                          tail, res);
    return res->rc ? 0 : res->ino;
}

static long create_file(ext2_filsys fs, uint32_t parent, uint32_t mode, uint32_t uid, uint32_t gid, uint64_t size,
                        int64_t mtime_ns, const char *name, int name_len, struct obd_dir_tail *tail,
                        struct obd_result *res)
{
    union { struct ext2_inode_large inode; unsigned char raw[OBD_INODE_SIZE]; } u;
    struct ext2_inode_large *inode = &u.inode;
    ext2_ino_t ino;
    uint32_t t_lo, t_extra;
    errcode_t rc;

    rc = new_inode(fs, parent, mode, &ino);
    if (rc)
        FAIL("ext2fs_new_inode");
    res->ino = ino;
    ext2fs_inode_alloc_stats2(fs, ino, 1, 0);
    encode_time(mtime_ns, &t_lo, &t_extra);
    memset(&u, 0, sizeof(u)); /* no in-inode xattrs of an earlier inode */
    inode->i_mode = mode;
    inode->i_uid = uid & 0xFFFF;
    inode->osd2.linux2.l_i_uid_high = uid >> 16;
    inode->i_gid = gid & 0xFFFF;
    inode->osd2.linux2.l_i_gid_high = gid >> 16;
    inode->i_size = size & 0xFFFFFFFF; /* set before fallocate: blocks past EOF would be uninit */
    inode->i_size_high = size >> 32;
    inode->i_atime = inode->i_ctime = inode->i_mtime = inode->i_crtime = t_lo;
    inode->i_atime_extra = inode->i_ctime_extra = inode->i_mtime_extra = inode->i_crtime_extra = t_extra;
    inode->i_links_count = 1;
    inode->i_flags = EXT4_EXTENTS_FL;
    inode->i_extra_isize = OBD_EXTRA_ISIZE;
    struct ext3_extent_header *eh = (struct ext3_extent_header *)inode->i_block;
    eh->eh_magic = ext2fs_cpu_to_le16(EXT3_EXT_MAGIC); /* empty root: 0 entries, room for 4, depth 0 */
    eh->eh_max = ext2fs_cpu_to_le16(4);
    uint64_t nblocks = (size + OBD_BLOCK_SIZE - 1) / OBD_BLOCK_SIZE;
    blk64_t key = 0;
    if (nblocks) {
        /* fallocate updates our buffer and writes its first 128 bytes; the full write follows */
        blk64_t goal = falloc_goal(fs, ino, inode, &key);
        rc = ext2fs_fallocate(fs, EXT2_FALLOCATE_FORCE_INIT, ino, (struct ext2_inode *)inode, goal, 0, nblocks);
        if (rc) {
            alloc_hint.fs = NULL;
            FAIL("ext2fs_fallocate");
        }
    }
    rc = ext2fs_write_inode_full(fs, ino, (struct ext2_inode *)inode, OBD_INODE_SIZE);
    if (rc)
        FAIL("ext2fs_write_inode_full");
    res->nextents = root_extents(inode, res->ext);
    if (nblocks)
        falloc_done(fs, key, res->nextents, res->ext);
    return dir_add(fs, parent, name, name_len, ino, EXT2_FT_REG_FILE, tail, res);
}

/* ---------------- directories (layer.py LayerApply.mkdir and the directory-times pass) ---------------- */

static void set_owner_times(struct ext2_inode_large *inode, uint32_t uid, uint32_t gid, int64_t mtime_ns)
{
    uint32_t t_lo, t_extra;
    encode_time(mtime_ns, &t_lo, &t_extra);
    inode->i_uid = uid & 0xFFFF;
    inode->osd2.linux2.l_i_uid_high = uid >> 16;
    inode->i_gid = gid & 0xFFFF;
    inode->osd2.linux2.l_i_gid_high = gid >> 16;
    inode->i_atime = inode->i_ctime = inode->i_mtime = inode->i_crtime = t_lo;
    inode->i_atime_extra = inode->i_ctime_extra = inode->i_mtime_extra = inode->i_crtime_extra = t_extra;
}

/* The new directory's own inode: its mode, owner and times (the tail of LayerApply.mkdir). */
long obd_finish_dir(uintptr_t fsp, uint32_t ino, uint32_t mode, uint32_t uid, uint32_t gid, int64_t mtime_ns,
                    struct obd_result *res)
{
    ext2_filsys fs = (ext2_filsys)fsp;
    union { struct ext2_inode_large inode; unsigned char raw[OBD_INODE_SIZE]; } u;
    errcode_t rc = ext2fs_read_inode_full(fs, ino, (struct ext2_inode *)&u.inode, OBD_INODE_SIZE);
    if (rc)
        FAIL("ext2fs_read_inode_full");
    u.inode.i_mode = LINUX_S_IFDIR | mode;
    u.inode.i_extra_isize = OBD_EXTRA_ISIZE;
    set_owner_times(&u.inode, uid, gid, mtime_ns);
    rc = ext2fs_write_inode_full(fs, ino, (struct ext2_inode *)&u.inode, OBD_INODE_SIZE);
    if (rc)
        FAIL("ext2fs_write_inode_full");
    return 0;
}

/*
 * LayerApply.mkdir: new_inode, ext2fs_mkdir(name=NULL), the parent's link count kept at 1 when
 * ext2fs_mkdir's increment passed EXT4_LINK_MAX or turned dir_nlink's 1 into 2, the entry in
 * the parent, then obd_finish_dir. Returns 0, OBD_NEED_LINK (res->ino made; the caller links it
 * and calls obd_finish_dir), or an errcode.
 */
long obd_mkdir(uintptr_t fsp, uint32_t parent, const char *name, int name_len, uint32_t mode, uint32_t uid,
               uint32_t gid, int64_t mtime_ns, struct obd_dir_tail *tail, struct obd_result *res)
{
    ext2_filsys fs = (ext2_filsys)fsp;
    union { struct ext2_inode_large inode; unsigned char raw[OBD_INODE_SIZE]; } u;
    ext2_ino_t ino;
    errcode_t rc = new_inode(fs, parent, LINUX_S_IFDIR | 0755, &ino);
    if (rc)
        FAIL("ext2fs_new_inode");
    res->ino = ino;
    rc = ext2fs_mkdir(fs, parent, ino, NULL);
    if (rc)
        FAIL("ext2fs_mkdir");
    rc = ext2fs_read_inode_full(fs, parent, (struct ext2_inode *)&u.inode, OBD_INODE_SIZE);
    if (rc)
        FAIL("ext2fs_read_inode_full");
    if (u.inode.i_links_count > 65000 || u.inode.i_links_count < 3) {
        u.inode.i_links_count = 1;
        rc = ext2fs_write_inode_full(fs, parent, (struct ext2_inode *)&u.inode, OBD_INODE_SIZE);
        if (rc)
            FAIL("ext2fs_write_inode_full");
    }
    rc = dir_add(fs, parent, name, name_len, ino, EXT2_FT_DIR, tail, res);
    if (rc)
        return rc;
    return obd_finish_dir(fsp, ino, mode, uid, gid, mtime_ns, res);
}

/* The directory-times pass of LayerApply.finish: read, fields.set_times, write. */
long obd_set_times(uintptr_t fsp, uint32_t ino, int64_t mtime_ns, struct obd_result *res)
{
    ext2_filsys fs = (ext2_filsys)fsp;
    union { struct ext2_inode_large inode; unsigned char raw[OBD_INODE_SIZE]; } u;
    uint32_t t_lo, t_extra;
    errcode_t rc = ext2fs_read_inode_full(fs, ino, (struct ext2_inode *)&u.inode, OBD_INODE_SIZE);
    if (rc)
        FAIL("ext2fs_read_inode_full");
    encode_time(mtime_ns, &t_lo, &t_extra);
    u.inode.i_atime = u.inode.i_ctime = u.inode.i_mtime = u.inode.i_crtime = t_lo;
    u.inode.i_atime_extra = u.inode.i_ctime_extra = u.inode.i_mtime_extra = u.inode.i_crtime_extra = t_extra;
    rc = ext2fs_write_inode_full(fs, ino, (struct ext2_inode *)&u.inode, OBD_INODE_SIZE);
    if (rc)
        FAIL("ext2fs_write_inode_full");
    return 0;
}

/* ---------------- directory listing (libext2fs.py iterate_dir) ---------------- */

static unsigned char *list_buf;
static size_t list_len, list_size;
static int list_nomem;

static int list_entry(ext2_ino_t dir, int entry, struct ext2_dir_entry *dirent, int offset, int blocksize,
                      char *buf, void *priv)
{
    (void)dir; (void)entry; (void)offset; (void)blocksize; (void)buf; (void)priv;
    unsigned name_len = ext2fs_dirent_name_len(dirent);
    if (!dirent->inode)
        return 0;
    if ((name_len == 1 && dirent->name[0] == '.') || (name_len == 2 && dirent->name[0] == '.' && dirent->name[1] == '.'))
        return 0;
    if (list_len + 6 + name_len > list_size) {
        size_t n = list_size ? list_size * 2 : 65536;
        unsigned char *p = realloc(list_buf, n);
        if (!p) {
            list_nomem = 1;
            return DIRENT_ABORT;
        }
        list_buf = p;
        list_size = n;
    }
    unsigned char *r = list_buf + list_len;
    put32(r, dirent->inode);
    r[4] = ext2fs_dirent_file_type(dirent);
    r[5] = name_len;
    memcpy(r + 6, dirent->name, name_len);
    list_len += 6 + name_len;
    return 0;
}

/* Every live entry except "." and "..", in disk order, as records (u32 inode, u8 file type,
 * u8 name length, name) in a buffer valid until the next call. The same ext2fs_dir_iterate2 call. */
long obd_iterate_dir(uintptr_t fsp, uint32_t dir, const unsigned char **out, size_t *len)
{
    list_len = 0;
    list_nomem = 0;
    errcode_t rc = ext2fs_dir_iterate2((ext2_filsys)fsp, dir, 0, NULL, list_entry, NULL);
    if (!rc && list_nomem)
        rc = EXT2_ET_NO_MEMORY;
    *out = list_buf;
    *len = list_len;
    return rc;
}
