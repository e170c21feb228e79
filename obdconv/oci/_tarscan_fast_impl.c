/* C fast path of obdconv.oci.tarscan: parses the ordinary tar members of one chunk in one call.
 *
 * It handles only the common, well-formed case: a ustar/GNU header with octal numbers and a valid
 * checksum, optionally preceded by ONE PAX 'x'/'X' header whose records are path, linkpath, size,
 * uid, gid, mtime (plain decimal) or keys the scanner ignores. Whenever a member group (the PAX
 * header plus its entry) is anything else -- an error, a zero block, GNU long names, xattrs,
 * sparse files, whiteouts, aufs metadata, sockets, the root, base-256 or odd numbers, a group
 * not wholly inside the chunk -- it stops at the START of that group with OBD_STOP_PYTHON and the
 * Python scanner handles the group (its results and error messages are the reference). So this
 * code never decides anything the Python code could decide differently; it only skips its cost.
 *
 * Semantics mirror tarscan.py line by line (parse_number, _verify_checksum, clean_path,
 * parse_pax_records, parse_pax_time, _on_header); see that module's doc for the tar rules.
 */

#include <stdint.h>
#include <string.h>

#define OBD_TAR_BLOCK 512
#define OBD_TAR_ALIGN 4096
#define OBD_TAR_MAX_META (64 << 20)

#define OBD_STOP_DONE 0   /* the whole buffer was consumed; the scanner is at a header boundary */
#define OBD_STOP_PYTHON 1 /* Python must handle the header at `pos` (see above) */
#define OBD_STOP_FULL 2   /* record or arena space ran out at `pos`: call again */
#define OBD_STOP_DATA 3   /* the last record's content (or padding) runs past the buffer; `pos` is its start */

struct obd_tar_rec {
    int64_t mode, uid, gid, mtime_ns, size, devmajor, devminor, tar_offset, data_offset;
    int64_t content_pos; /* a regular file's content in the buffer; -1: none, or not all here (OBD_STOP_DATA) */
    uint32_t path_off, path_len, link_off, link_len; /* in the arena */
    int32_t type;  /* EntryType value: 'f' 'd' 'l' 'h' 'c' 'b' 'p' */
    int32_t tail_pad; /* tar block padding after a regular file's content */
};

struct obd_tar_cursor {
    uint64_t pos;       /* in: first header position in the buffer; out: where Python continues */
    int64_t base;       /* tar offset of buffer[0] */
    int64_t data_pos;   /* in/out: the end of the data area */
    uint64_t arena_used; /* out */
    int32_t stop;       /* out: OBD_STOP_* */
};

/* parse_number, octal case only: up to the first NUL, spaces stripped from both ends, digits 0-7.
 * Empty -> 0. Returns 0 (let Python decide) for anything else, e.g. base-256, an 8 or 9, junk. */
static int parse_octal(const unsigned char *f, size_t n, int64_t *out)
{
    size_t end = 0, a = 0;
    int64_t v = 0;
    while (end < n && f[end])
        end++;
    while (a < end && f[a] == ' ')
        a++;
    while (end > a && f[end - 1] == ' ')
        end--;
    if (end - a > 20)
        return 0;
    for (size_t i = a; i < end; i++) {
        unsigned d = (unsigned)f[i] - '0';
        if (d > 7)
            return 0;
        v = v * 8 + d;
    }
    *out = v;
    return 1;
}

/* _verify_checksum: the stored value equals the unsigned or the signed byte sum, the field itself
 * counted as spaces. A stored field Python's int(text, 8) might read differently -> 0 (Python). */
static int checksum_ok(const unsigned char *b)
{
    const unsigned char *f = b + 148;
    size_t end = 0, a = 0;
    int64_t stored = 0, usum = 256, ssum = 256;
    while (end < 8 && f[end])
        end++;
    while (a < end && f[a] == ' ')
        a++;
    while (end > a && f[end - 1] == ' ')
        end--;
    if (a == end) {
        stored = -1;
    } else {
        for (size_t i = a; i < end; i++) {
            unsigned d = (unsigned)f[i] - '0';
            if (d > 7)
                return 0;
            stored = stored * 8 + d;
        }
    }
    for (int i = 0; i < OBD_TAR_BLOCK; i++) {
        if (i == 148) {
            i = 155;
            continue;
        }
        usum += b[i];
        ssum += (signed char)b[i];
    }
    return stored == usum || stored == ssum;
}

/* clean_path: writes the cleaned path to `out` (room for n bytes); -1 if it escapes the root. */
static long clean_path(const unsigned char *name, size_t n, unsigned char *out)
{
    size_t len = 0, i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n && name[j] != '/')
            j++;
        size_t plen = j - i;
        if (plen == 0 || (plen == 1 && name[i] == '.')) {
            /* skipped */
        } else if (plen == 2 && name[i] == '.' && name[i + 1] == '.') {
            if (len == 0)
                return -1;
            size_t k = len;
            while (k > 0 && out[k - 1] != '/')
                k--;
            len = k > 0 ? k - 1 : 0;
        } else {
            if (len)
                out[len++] = '/';
            memcpy(out + len, name + i, plen);
            len += plen;
        }
        i = j + 1;
    }
    return (long)len;
}

/* A PAX integer Python's int() reads: only plain decimal digits here (else Python decides). */
static int pax_decimal(const unsigned char *v, size_t n, int64_t *out)
{
    int64_t x = 0;
    if (n == 0 || n > 18)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned d = (unsigned)v[i] - '0';
        if (d > 9)
            return 0;
        x = x * 10 + d;
    }
    *out = x;
    return 1;
}

static int is_py_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c;
}

/* parse_pax_time: "[-]SECONDS[.FRACTION]" (ASCII whitespace stripped) -> nanoseconds. */
static int pax_time(const unsigned char *v, size_t n, int64_t *out)
{
    size_t a = 0, end = n, i;
    int negative = 0;
    int64_t whole = 0, frac = 0;
    while (a < end && is_py_space(v[a]))
        a++;
    while (end > a && is_py_space(v[end - 1]))
        end--;
    if (a < end && v[a] == '-') {
        negative = 1;
        a++;
    }
    i = a;
    while (i < end && v[i] != '.')
        i++;
    if (i == a || i - a > 10)
        return 0;
    for (size_t k = a; k < i; k++) {
        unsigned d = (unsigned)v[k] - '0';
        if (d > 9)
            return 0;
        whole = whole * 10 + d;
    }
    if (whole > 9000000000LL)
        return 0;
    if (i < end) { /* a fraction: all of it must be digits; its first 9 count */
        size_t digits = 0;
        for (size_t k = i + 1; k < end; k++) {
            unsigned d = (unsigned)v[k] - '0';
            if (d > 9)
                return 0;
            if (digits < 9) {
                frac = frac * 10 + d;
                digits++;
            }
        }
        for (; digits < 9; digits++)
            frac *= 10;
    }
    *out = negative ? -(whole * 1000000000LL + frac) : whole * 1000000000LL + frac;
    return 1;
}

struct pax_overrides {
    const unsigned char *name, *link;
    size_t name_len, link_len;
    int has_name, has_link, has_size, has_uid, has_gid, has_mtime;
    int64_t size, uid, gid, mtime_ns;
};

static int starts_with(const unsigned char *s, size_t n, const char *prefix)
{
    size_t p = strlen(prefix);
    return n >= p && memcmp(s, prefix, p) == 0;
}

static int key_is(const unsigned char *k, size_t n, const char *name)
{
    return n == strlen(name) && memcmp(k, name, n) == 0;
}

/* parse_pax_records + _apply_pax for the keys handled here; 0 -> Python handles the group. */
static int parse_pax(const unsigned char *body, size_t end, struct pax_overrides *po)
{
    size_t pos = 0;
    while (pos < end) {
        if (body[pos] == 0)
            break;
        size_t limit = end < pos + 24 ? end : pos + 24, space = pos;
        while (space < limit && body[space] != ' ')
            space++;
        if (space >= limit)
            return 0;
        int64_t length;
        if (!pax_decimal(body + pos, space - pos, &length))
            return 0;
        size_t record_end = pos + (size_t)length;
        if ((size_t)length <= space - pos + 1 || record_end > end || body[record_end - 1] != '\n')
            return 0;
        const unsigned char *key = body + space + 1, *stop = body + record_end - 1;
        const unsigned char *eq = memchr(key, '=', (size_t)(stop - key));
        if (eq == NULL)
            return 0;
        size_t klen = (size_t)(eq - key);
        const unsigned char *value = eq + 1;
        size_t vlen = (size_t)(stop - value);
        if (key_is(key, klen, "path")) {
            po->name = value;
            po->name_len = vlen;
            po->has_name = 1;
        } else if (key_is(key, klen, "linkpath")) {
            po->link = value;
            po->link_len = vlen;
            po->has_link = 1;
        } else if (key_is(key, klen, "size")) {
            if (!pax_decimal(value, vlen, &po->size))
                return 0;
            po->has_size = 1;
        } else if (key_is(key, klen, "uid")) {
            if (!pax_decimal(value, vlen, &po->uid))
                return 0;
            po->has_uid = 1;
        } else if (key_is(key, klen, "gid")) {
            if (!pax_decimal(value, vlen, &po->gid))
                return 0;
            po->has_gid = 1;
        } else if (key_is(key, klen, "mtime")) {
            if (!pax_time(value, vlen, &po->mtime_ns))
                return 0;
            po->has_mtime = 1;
        } else if (starts_with(key, klen, "SCHILY.xattr.") || starts_with(key, klen, "GNU.sparse.")) {
            return 0;
        }
        pos = record_end;
    }
    return 1;
}

static int all_zero(const unsigned char *b)
{
    static const unsigned char zero[OBD_TAR_BLOCK];
    return memcmp(b, zero, OBD_TAR_BLOCK) == 0;
}

/* Parses member groups from cur->pos on. Returns the number of records written. */
long obd_tar_scan(const unsigned char *buf, uint64_t len, struct obd_tar_cursor *cur, struct obd_tar_rec *recs,
                  long max_recs, unsigned char *arena, uint64_t arena_cap)
{
    uint64_t pos = cur->pos;
    int64_t data_pos = cur->data_pos;
    uint64_t used = 0;
    long nrec = 0;
    int stop = OBD_STOP_DONE;

    while (pos < len) {
        uint64_t group = pos;
        struct pax_overrides po;
        memset(&po, 0, sizeof po);
        if (len - pos < OBD_TAR_BLOCK) {
            stop = OBD_STOP_PYTHON;
            break;
        }
        const unsigned char *h = buf + pos;
        if (h[156] == 'x' || h[156] == 'X') {
            int64_t msize;
            if (all_zero(h) || !checksum_ok(h) || !parse_octal(h + 124, 12, &msize) || msize > OBD_TAR_MAX_META) {
                stop = OBD_STOP_PYTHON;
                break;
            }
            uint64_t mpadded = ((uint64_t)msize + OBD_TAR_BLOCK - 1) & ~(uint64_t)(OBD_TAR_BLOCK - 1);
            if (len - pos < OBD_TAR_BLOCK + mpadded + OBD_TAR_BLOCK
                || !parse_pax(h + OBD_TAR_BLOCK, (size_t)msize, &po)) {
                stop = OBD_STOP_PYTHON;
                break;
            }
            pos += OBD_TAR_BLOCK + mpadded;
            h = buf + pos;
        }
        if (nrec >= max_recs) {
            pos = group;
            stop = OBD_STOP_FULL;
            break;
        }
        /* The entry header. */
        int64_t size, mode_field, uid, gid, mtime;
        unsigned char tf = h[156];
        if (all_zero(h) || !checksum_ok(h) || !parse_octal(h + 124, 12, &size)) {
            pos = group;
            stop = OBD_STOP_PYTHON;
            break;
        }
        const unsigned char *name = h, *prefix = NULL;
        size_t name_len = 0, prefix_len = 0;
        if (po.has_name) {
            name = po.name;
            name_len = po.name_len;
        } else {
            while (name_len < 100 && h[name_len])
                name_len++;
            if (memcmp(h + 257, "ustar\0", 6) == 0) {
                while (prefix_len < 155 && h[345 + prefix_len])
                    prefix_len++;
                if (prefix_len)
                    prefix = h + 345;
            }
        }
        if (po.has_size)
            size = po.size;
        int regular = tf == '0' || tf == 0 || tf == '7';
        int type;
        switch (tf) {
        case '5': type = 'd'; break;
        case '2': type = 'l'; break;
        case '1': type = 'h'; break;
        case '3': type = 'c'; break;
        case '4': type = 'b'; break;
        case '6': type = 'p'; break;
        default: type = regular ? 'f' : 0;
        }
        unsigned char last = name_len ? name[name_len - 1] : (prefix_len ? '/' : 0);
        if (tf == 0 && last == '/') { /* an AREGTYPE name ending in "/" is a directory */
            regular = 0;
            type = 'd';
        }
        if (type == 0 || !parse_octal(h + 100, 8, &mode_field)
            || (regular && (mode_field & 0170000) == 0140000) /* a socket: Python skips it with a warning */
            || !parse_octal(h + 108, 8, &uid) || !parse_octal(h + 116, 8, &gid)
            || !parse_octal(h + 136, 12, &mtime) || mtime > 9000000000LL) {
            pos = group;
            stop = OBD_STOP_PYTHON;
            break;
        }
        /* The link target (raw; cleaned for hard links). */
        const unsigned char *link = NULL;
        size_t link_len = 0;
        if (type == 'l' || type == 'h') {
            if (po.has_link) {
                link = po.link;
                link_len = po.link_len;
            } else {
                link = h + 157;
                while (link_len < 100 && link[link_len])
                    link_len++;
            }
        }
        size_t full_len = prefix_len ? prefix_len + 1 + name_len : name_len;
        if (arena_cap - used < full_len * 2 + link_len) {
            pos = group;
            stop = (nrec || used) ? OBD_STOP_FULL : OBD_STOP_PYTHON;
            break;
        }
        /* Join prefix/name in the arena's free space, then clean it right after. */
        unsigned char *raw = arena + used + full_len + link_len;
        if (prefix_len) {
            memcpy(raw, prefix, prefix_len);
            raw[prefix_len] = '/';
            memcpy(raw + prefix_len + 1, name, name_len);
        } else {
            memcpy(raw, name, name_len);
        }
        unsigned char *path = arena + used;
        long path_len = clean_path(raw, full_len, path);
        if (path_len <= 0) { /* escapes, or the root itself */
            pos = group;
            stop = OBD_STOP_PYTHON;
            break;
        }
        size_t base = (size_t)path_len;
        while (base > 0 && path[base - 1] != '/')
            base--;
        if (starts_with(path + base, (size_t)path_len - base, ".wh.")
            || starts_with(path, (size_t)path_len, ".wh..wh.")) { /* whiteouts and aufs metadata */
            pos = group;
            stop = OBD_STOP_PYTHON;
            break;
        }
        struct obd_tar_rec *r = &recs[nrec];
        r->path_off = (uint32_t)used;
        r->path_len = (uint32_t)path_len;
        r->link_off = (uint32_t)(used + (size_t)path_len);
        r->link_len = 0;
        if (type == 'h') {
            long target_len = clean_path(link, link_len, arena + r->link_off);
            if (target_len <= 0) { /* escapes, or a hard link to the root */
                pos = group;
                stop = OBD_STOP_PYTHON;
                break;
            }
            r->link_len = (uint32_t)target_len;
        } else if (type == 'l') {
            memcpy(arena + r->link_off, link, link_len);
            r->link_len = (uint32_t)link_len;
        }
        r->devmajor = r->devminor = 0;
        if (type == 'c' || type == 'b') {
            if (!parse_octal(h + 329, 8, &r->devmajor) || !parse_octal(h + 337, 8, &r->devminor)) {
                pos = group;
                stop = OBD_STOP_PYTHON;
                break;
            }
        }
        r->type = type;
        r->mode = mode_field & 07777;
        r->uid = po.has_uid ? po.uid : uid;
        r->gid = po.has_gid ? po.gid : gid;
        r->mtime_ns = po.has_mtime ? po.mtime_ns : mtime * 1000000000LL;
        r->size = 0;
        r->tar_offset = -1;
        r->data_offset = -1;
        r->content_pos = -1;
        r->tail_pad = 0;
        used += (size_t)path_len + r->link_len;
        nrec++;
        pos += OBD_TAR_BLOCK;
        if (!regular)
            continue;
        uint64_t padded = ((uint64_t)size + OBD_TAR_BLOCK - 1) & ~(uint64_t)(OBD_TAR_BLOCK - 1);
        r->size = size;
        r->tar_offset = cur->base + (int64_t)pos;
        r->tail_pad = (int32_t)(padded - (uint64_t)size);
        if (size == 0)
            continue;
        r->data_offset = data_pos;
        if (len - pos < padded) {
            data_pos += size; /* Python streams the content and pads the area at its end */
            stop = OBD_STOP_DATA;
            break;
        }
        r->content_pos = (int64_t)pos;
        data_pos = (data_pos + size + OBD_TAR_ALIGN - 1) & ~(int64_t)(OBD_TAR_ALIGN - 1);
        pos += padded;
    }
    cur->pos = pos;
    cur->data_pos = data_pos;
    cur->arena_used = used;
    cur->stop = stop;
    return nrec;
}
