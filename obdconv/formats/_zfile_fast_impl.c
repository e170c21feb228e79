/* The C fast path of ZFile compression (obdconv.formats._zfilefast; see _build_zfilefast.py).
 *
 * One call compresses a whole batch of blocks with LZ4_compress_default (the system liblz4, the
 * same library and call as the Python path, so the same bytes) and writes each block's raw
 * CRC-32C (spec §0: reflected Castagnoli, register initialised to the seed, no inversion) after
 * it: the per-block work of the Python path without a Python step per block, and with the GIL
 * released for the whole batch (cffi releases it around every call), so a pool of threads can
 * compress batches side by side.
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
