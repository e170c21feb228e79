/* The C fast paths of the byte formats (obdconv.formats._formatsfast; see _build_fast.py).
 *
 * ZFile compression: one call compresses a whole batch of blocks with LZ4_compress_default (the
 * system liblz4, the same library and call as the Python path, so the same bytes) and writes each
 * block's raw CRC-32C (spec §0: reflected Castagnoli, register initialised to the seed, no
 * inversion) after it: the per-block work of the Python path without a Python step per block, and
 * with the GIL released for the whole batch (cffi releases it around every call), so a pool of
 * threads can compress batches side by side.
 *
 * gzip index: the builder's inflate loop (gzindex.GzipIndexBuilder.feed) over a whole output
 * buffer per call, through the inflate function of the caller's library (zlib or zlib-ng).
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

int LZ4_compress_default(const char *src, char *dst, int srcSize, int dstCapacity);
int LZ4_compressBound(int inputSize);

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the ZFile fast path assumes a little-endian host"
#endif

#define OBD_ERR_ROOM -1
#define OBD_ERR_CODEC -2

/* ---- CRC-32C ---------------------------------------------------------------------------- */

static uint32_t crc_table[8][256];
static int crc_ready;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
    crc_ready = 1;
}

/* Slicing-by-8: the portable path (CPUs without the CRC32 instruction). */
static uint32_t crc32c_soft(uint32_t crc, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc; /* little-endian hosts only: the build refuses others */
        crc = crc_table[7][v & 0xFF] ^ crc_table[6][(v >> 8) & 0xFF] ^ crc_table[5][(v >> 16) & 0xFF]
            ^ crc_table[4][(v >> 24) & 0xFF] ^ crc_table[3][(v >> 32) & 0xFF] ^ crc_table[2][(v >> 40) & 0xFF]
            ^ crc_table[1][(v >> 48) & 0xFF] ^ crc_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c;
    while (n--)
        crc = __builtin_ia32_crc32qi(crc, *p++);
    return crc;
}
static int have_hw(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    return cached;
}
#else
static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) { return crc32c_soft(crc, p, n); }
static int have_hw(void) { return 0; }
#endif

/* Raw CRC-32C of n bytes from seed; force_soft picks the portable path (tests compare both). */
uint32_t obd_crc32c_raw(uint32_t seed, const uint8_t *p, uint64_t n, int force_soft) {
    if (!force_soft && have_hw())
        return crc32c_hw(seed, p, n);
    if (!crc_ready)
        crc_init(); /* idempotent: a race only computes the same table twice */
    return crc32c_soft(seed, p, n);
}

/* ---- batch compression ------------------------------------------------------------------ */

/* Compress src[0..n) in blocks of block_size (the last may be short) into dst, each block followed
 * by its raw CRC-32C (seed `seed`, little-endian); lengths[i] = stored length of block i incl. its
 * CRC. Returns the bytes written, or OBD_ERR_ROOM when dst (cap bytes) might not hold the next
 * block's bound, OBD_ERR_CODEC if LZ4 fails. */
int64_t obd_lz4_blocks(const uint8_t *src, uint64_t n, uint32_t block_size, uint32_t seed,
                       uint8_t *dst, uint64_t cap, uint32_t *lengths) {
    int soft = !have_hw();
    if (soft && !crc_ready)
        crc_init();
    int bound = LZ4_compressBound((int)block_size);
    uint64_t pos = 0, i = 0;
    for (uint64_t off = 0; off < n; off += block_size, i++) {
        int len = n - off < block_size ? (int)(n - off) : (int)block_size;
        if (cap - pos < (uint64_t)bound + 4)
            return OBD_ERR_ROOM;
        int c = LZ4_compress_default((const char *)src + off, (char *)dst + pos, len, bound);
        if (c <= 0)
            return OBD_ERR_CODEC;
        uint32_t crc = soft ? crc32c_soft(seed, dst + pos, (size_t)c) : crc32c_hw(seed, dst + pos, (size_t)c);
        uint8_t *at = dst + pos + c;
        at[0] = (uint8_t)crc;
        at[1] = (uint8_t)(crc >> 8);
        at[2] = (uint8_t)(crc >> 16);
        at[3] = (uint8_t)(crc >> 24);
        lengths[i] = (uint32_t)c + 4;
        pos += (uint64_t)c + 4;
    }
    return (int64_t)pos;
}

/* ---- the gzip index builder's inflate loop ---------------------------------------------- */

#define OBD_Z_OK 0
#define OBD_Z_BUF_ERROR (-5)
#define OBD_Z_BLOCK 5

typedef int (*obd_inflate_t)(void *strm, int flush);

/* Byte offsets of the z_stream fields used here (z_stream and zng_stream differ in their types). */
struct obd_zfields { int64_t next_in, avail_in, next_out, avail_out, data_type; };
struct obd_inflate_state { uint64_t pos, total_in, total_out, last_reported; int32_t rc; };

#define FIELD(type, strm, off) (*(type *)((uint8_t *)(strm) + (off)))

/* gzindex.GzipIndexBuilder.feed's loop: inflate(Z_BLOCK) into out[pos..end) while there is input
 * and room, each call stopping at a deflate block boundary. After each call the counters advance;
 * a boundary that is not the last block's, at an output offset not reported yet, is recorded as
 * (bits, total_in, total_out, pos) in `bounds`. Stops, returning the boundaries recorded, when the
 * input is used up, the output reaches `end`, `max_bounds` were recorded, or inflate returned
 * anything but Z_OK / Z_BUF_ERROR (then st->rc says what). */
int64_t obd_inflate_blocks(void *inflate_fn, void *strm, const struct obd_zfields *f, uint8_t *out, uint64_t end,
                           struct obd_inflate_state *st, uint64_t *bounds, int64_t max_bounds) {
    obd_inflate_t inflate = (obd_inflate_t)inflate_fn;
    int64_t n = 0;
    uint32_t avail_in = FIELD(uint32_t, strm, f->avail_in);
    st->rc = OBD_Z_OK;
    while (avail_in && st->pos < end && n < max_bounds) {
        uint32_t room = (uint32_t)(end - st->pos);
        FIELD(uint8_t *, strm, f->next_out) = out + st->pos;
        FIELD(uint32_t, strm, f->avail_out) = room;
        int rc = inflate(strm, OBD_Z_BLOCK);
        uint32_t left = FIELD(uint32_t, strm, f->avail_in);
        st->total_in += avail_in - left;
        avail_in = left;
        uint64_t produced = room - FIELD(uint32_t, strm, f->avail_out);
        st->pos += produced;
        st->total_out += produced;
        st->rc = rc;
        if (rc != OBD_Z_OK && rc != OBD_Z_BUF_ERROR)
            return n; /* Z_STREAM_END or an error: the caller handles it */
        int dt = FIELD(int, strm, f->data_type);
        if ((dt & 0x80) && !(dt & 0x40) && st->total_out != st->last_reported) {
            st->last_reported = st->total_out;
            bounds[4 * n] = (uint64_t)(dt & 7);
            bounds[4 * n + 1] = st->total_in;
            bounds[4 * n + 2] = st->total_out;
            bounds[4 * n + 3] = st->pos;
            n++;
        }
    }
    return n;
}
