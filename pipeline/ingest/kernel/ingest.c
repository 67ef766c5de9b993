/* The ingest kernel: a batch's message identities and its common JSON readings in one call.
 *
 * Host-owned (pipeline/ingest/_kernel.py loads it; rebuild with
 * `python pipeline/ingest/kernel/build.py`, `--check` verifies ingest.wasm is current).
 *
 * run(h): h points at a struct batch (below).  For every message i: ids[16*i..] is the
 * keyed BLAKE2b-128 of "topic\0payload" (RFC 7693, bit-identical to hashlib.blake2b(
 * digest_size=16, key=...)); status[i] is 1 if the payload is the common simple JSON shape
 * (what pipeline/ingest/_codecs.py simple_json turns into one reading) and its record was
 * written, else 0 (the host decodes it in Python).  Records (ts ms i64, value f64, series
 * u32, flags u32) are written one after another, in message order.  Returns their number.
 *
 * The kernel accepts a strict subset of what simple_json accepts and says 0 for the rest:
 * ASCII only, no escapes, no nested values, no NaN/Infinity, no duplicate "value" or
 * timestamp key, numbers of at most 40 bytes, floats only where one IEEE operation gives
 * the correctly rounded result (Clinger's fast path: mantissa <= 2^53, |exp10| <= 22).
 */
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

__attribute__((no_builtin)) void *memcpy(void *restrict d, const void *restrict s, size_t n) {
    u8 *o = d;
    const u8 *i = s;
    while (n--) *o++ = *i++;
    return d;
}

__attribute__((no_builtin)) void *memset(void *d, int c, size_t n) {
    u8 *o = d;
    while (n--) *o++ = (u8)c;
    return d;
}

struct batch {
    u32 n;           /* messages */
    u32 keylen;      /* identity key bytes (0..64) */
    u32 max_payload; /* a longer payload is not decoded here */
    u32 nfields;     /* timestamp field names */
    u32 blob;        /* "topic\0" payload "topic\0" payload ... */
    u32 lens;        /* u32[2n]: length of each "topic\0" and each payload */
    u32 codes;       /* i64[n]: series id << 8 | timestamp field index, or -1 */
    u32 arrivals;    /* i64[n]: arrival time, ms */
    u32 fields;      /* u32[2*nfields] (offset, length) of each name */
    u32 key;         /* the identity key */
    u32 ids;         /* out: 16 bytes per message */
    u32 status;      /* out: 1 byte per message */
    u32 records;     /* out: 24 bytes per record */
};

extern u8 __heap_base;

/* Where the host may put a batch: above the stack and data. */
__attribute__((export_name("heap_base"))) u32 heap_base(void) { return (u32)(uintptr_t)&__heap_base; }

/* ---- BLAKE2b (RFC 7693), 16-byte digest, keyed ---- */

static const u64 IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
    0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
    0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const u8 SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline u64 rotr(u64 x, int n) { return (x >> n) | (x << (64 - n)); }

static inline u64 load64(const u8 *p) {
    u64 v;
    __builtin_memcpy(&v, p, 8); /* wasm is little-endian, unaligned loads allowed */
    return v;
}

#define G(a, b, c, d, x, y)          \
    do {                             \
        v[a] = v[a] + v[b] + (x);    \
        v[d] = rotr(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];          \
        v[b] = rotr(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y);    \
        v[d] = rotr(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];          \
        v[b] = rotr(v[b] ^ v[c], 63); \
    } while (0)

static void compress(u64 h[8], const u8 *block, u64 t, int last) {
    u64 v[16], m[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= t; /* the counter's high word stays 0: no message reaches 2^64 bytes */
    if (last) v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const u8 *s = SIGMA[r];
        G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* The state after the key block (the same for every message of the batch); *t its
 * counter.  Messages are never empty (at least the "\0"), so the key block is never the
 * last one. */
static void keyed_state(u64 h[8], u64 *t, const u8 *key, u32 keylen) {
    for (int i = 0; i < 8; i++) h[i] = IV[i];
    h[0] ^= 0x01010000ULL ^ ((u64)keylen << 8) ^ 16;
    *t = 0;
    if (keylen) {
        u8 block[128];
        for (u32 i = 0; i < 128; i++) block[i] = i < keylen ? key[i] : 0;
        *t = 128;
        compress(h, block, 128, 0);
    }
}

/* The digest of the message made of the two parts a and b, from state h0. */
static void digest(const u64 h0[8], u64 t, const u8 *a, u32 alen, const u8 *b, u32 blen,
                   u8 *out) {
    u64 h[8];
    u8 block[128];
    for (int i = 0; i < 8; i++) h[i] = h0[i];
    u32 fill = 0; /* bytes in block */
    const u8 *p = a;
    u32 left = alen;
    int part = 0;
    for (;;) {
        while (left) {
            if (fill == 128) { /* a full block with more data after it: not the last */
                t += 128;
                compress(h, block, t, 0);
                fill = 0;
            }
            if (fill == 0 && left > 128) { /* straight from the input */
                t += 128;
                compress(h, p, t, 0);
                p += 128;
                left -= 128;
                continue;
            }
            u32 k = 128 - fill < left ? 128 - fill : left;
            for (u32 i = 0; i < k; i++) block[fill + i] = p[i];
            fill += k;
            p += k;
            left -= k;
        }
        if (part) break;
        part = 1;
        p = b;
        left = blen;
    }
    for (u32 i = fill; i < 128; i++) block[i] = 0;
    t += fill;
    compress(h, block, t, 1);
    __builtin_memcpy(out, h, 16);
}

/* ---- the simple JSON payload ---- */

static const double POW10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                 1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

static inline int is_ws(u8 c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
static inline int is_digit(u8 c) { return c >= '0' && c <= '9'; }

enum { NUM_BAD = 0, NUM_INT = 1, NUM_FLOAT = 2, NUM_INEXACT = 3 };

/* A JSON number at *pp (Python's json grammar: -?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?),
 * followed by whitespace, ',' or '}'.  NUM_FLOAT with *out when the fast path gives its
 * correctly rounded value, NUM_INEXACT when it is a float it cannot; NUM_BAD: not one
 * this kernel takes. */
static int number(const u8 **pp, const u8 *e, double *out) {
    const u8 *p = *pp, *start = p;
    int neg = 0, isfloat = 0, sig = 0, frac = 0;
    u64 m = 0;
    if (*p == '-') {
        neg = 1;
        p++;
    }
    if (p >= e || !is_digit(*p)) return NUM_BAD;
    if (*p == '0') {
        p++;
    } else {
        while (p < e && is_digit(*p)) {
            if (sig < 19) m = m * 10 + (u64)(*p - '0');
            sig++;
            p++;
        }
    }
    if (p < e && *p == '.') {
        p++;
        if (p >= e || !is_digit(*p)) return NUM_BAD;
        isfloat = 1;
        while (p < e && is_digit(*p)) {
            if (m == 0 && *p == '0') { /* a leading zero of the mantissa */
                frac++;
            } else {
                if (sig < 19) {
                    m = m * 10 + (u64)(*p - '0');
                    frac++;
                }
                sig++;
            }
            p++;
        }
    }
    int ex = 0;
    if (p < e && (*p == 'e' || *p == 'E')) {
        int eneg = 0, nd = 0;
        p++;
        isfloat = 1;
        if (p < e && (*p == '+' || *p == '-')) eneg = *p++ == '-';
        if (p >= e || !is_digit(*p)) return NUM_BAD;
        while (p < e && is_digit(*p)) {
            if (nd < 6) ex = ex * 10 + (*p - '0');
            nd++;
            p++;
        }
        if (nd > 5) ex = 100000;
        if (eneg) ex = -ex;
    }
    if (p - start > 40) return NUM_BAD; /* long numbers: Python's limits are its own */
    if (p >= e || !(is_ws(*p) || *p == ',' || *p == '}')) return NUM_BAD;
    *pp = p;
    if (!isfloat) return NUM_INT;
    if (sig > 19) return NUM_INEXACT;
    double d;
    int e10 = ex - frac;
    if (m == 0) {
        d = 0.0;
    } else if (m <= (1ULL << 53) && e10 >= -22 && e10 <= 22) {
        d = (double)m;
        d = e10 >= 0 ? d * POW10[e10] : d / POW10[-e10];
    } else {
        return NUM_INEXACT;
    }
    *out = neg ? -d : d;
    return NUM_FLOAT;
}

static inline int same(const u8 *a, const u8 *b, u32 n) {
    for (u32 i = 0; i < n; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

#define TS_MIN 946684800000LL
#define TS_MAX 4102444800000LL
#define AHEAD_MS 86400000LL

/* 1 and the reading if payload [p, e) is the simple shape with timestamp field tf. */
static int simple(const u8 *p, const u8 *e, const u8 *tf, u32 tflen, i64 arrival, i64 *ts_out,
                  double *value_out) {
    int have_v = 0, have_t = 0;
    double v = 0, t = 0;
    if (p >= e || *p != '{') return 0;
    p++;
    while (p < e && is_ws(*p)) p++;
    if (p >= e || *p == '}') return 0; /* {} has no value */
    for (;;) {
        if (p >= e || *p != '"') return 0;
        const u8 *k = ++p;
        while (p < e && *p != '"') {
            if (*p == '\\' || *p < 0x20 || *p >= 0x80) return 0;
            p++;
        }
        if (p >= e) return 0;
        u32 klen = (u32)(p - k);
        p++;
        while (p < e && is_ws(*p)) p++;
        if (p >= e || *p != ':') return 0;
        p++;
        while (p < e && is_ws(*p)) p++;
        if (p >= e) return 0;
        int is_v = klen == 5 && same(k, (const u8 *)"value", 5);
        int is_t = klen == tflen && same(k, tf, tflen);
        if ((klen == 6 && (same(k, (const u8 *)"device", 6) || same(k, (const u8 *)"metric", 6))) ||
            (klen == 4 && same(k, (const u8 *)"tags", 4)))
            return 0;
        u8 c = *p;
        if (c == '-' || is_digit(c)) {
            double d = 0;
            int kind = number(&p, e, &d);
            if (kind == NUM_BAD) return 0;
            if (is_v || is_t) {
                if (kind != NUM_FLOAT) return 0;
                if (is_v) {
                    if (have_v) return 0;
                    have_v = 1;
                    v = d;
                }
                if (is_t) {
                    if (have_t) return 0;
                    have_t = 1;
                    t = d;
                }
            }
        } else if (is_v || is_t) {
            return 0;
        } else if (c == '"') {
            p++;
            while (p < e && *p != '"') {
                if (*p == '\\' || *p < 0x20 || *p >= 0x80) return 0;
                p++;
            }
            if (p >= e) return 0;
            p++;
        } else if (e - p >= 4 && (same(p, (const u8 *)"true", 4) || same(p, (const u8 *)"null", 4))) {
            p += 4;
        } else if (e - p >= 5 && same(p, (const u8 *)"false", 5)) {
            p += 5;
        } else {
            return 0;
        }
        while (p < e && is_ws(*p)) p++;
        if (p >= e) return 0;
        if (*p == '}') break;
        if (*p != ',') return 0;
        p++;
        while (p < e && is_ws(*p)) p++;
    }
    p++;
    while (p < e && is_ws(*p)) p++;
    if (p != e || !have_v || !have_t) return 0;
    if (!(v >= -1e250 && v <= 1e250 && t > 1e8 && t < 1e11)) return 0;
    double r = __builtin_rint(t * 1000.0); /* round half to even, like Python's round() */
    i64 ts = (i64)r;
    if (ts < TS_MIN || ts >= TS_MAX || ts - AHEAD_MS > arrival) return 0;
    *ts_out = ts;
    *value_out = v;
    return 1;
}

__attribute__((export_name("run"))) u32 run(struct batch *b) {
    u64 h0[8], t0;
    keyed_state(h0, &t0, (const u8 *)(uintptr_t)b->key, b->keylen);
    const u8 *p = (const u8 *)(uintptr_t)b->blob;
    const u32 *lens = (const u32 *)(uintptr_t)b->lens;
    const i64 *codes = (const i64 *)(uintptr_t)b->codes;
    const i64 *arrivals = (const i64 *)(uintptr_t)b->arrivals;
    const u32 *fields = (const u32 *)(uintptr_t)b->fields;
    u8 *ids = (u8 *)(uintptr_t)b->ids;
    u8 *status = (u8 *)(uintptr_t)b->status;
    u8 *rec = (u8 *)(uintptr_t)b->records;
    u32 made = 0;
    for (u32 i = 0; i < b->n; i++) {
        u32 tlen = lens[2 * i], plen = lens[2 * i + 1];
        const u8 *payload = p + tlen;
        digest(h0, t0, p, tlen, payload, plen, ids + 16 * i);
        i64 code = codes[i];
        i64 ts;
        double value;
        status[i] = 0;
        if (code >= 0 && plen <= b->max_payload && (u32)(code & 0xff) < b->nfields) {
            u32 f = (u32)(code & 0xff);
            const u8 *tf = (const u8 *)(uintptr_t)fields[2 * f];
            if (simple(payload, payload + plen, tf, fields[2 * f + 1], arrivals[i], &ts, &value)) {
                u32 sid = (u32)(code >> 8), flags = 0;
                __builtin_memcpy(rec, &ts, 8);
                __builtin_memcpy(rec + 8, &value, 8);
                __builtin_memcpy(rec + 16, &sid, 4);
                __builtin_memcpy(rec + 20, &flags, 4);
                rec += 24;
                made++;
                status[i] = 1;
            }
        }
        p = payload + plen;
    }
    return made;
}

/* ---- the redelivery filter: a Bloom filter over 16-byte identities ----
 *
 * Its own instance of this module (pipeline/ingest/_kernel.py BloomBits): 2^log2 bits
 * (bloom_size; at most 2^BLOOM_LOG2, 1 MiB) from heap_base() on, then the identities of a
 * call (at `keys`, given by the host, past the largest size: pages of the bits beyond the
 * size set are never touched, so never resident).  The four probes of an identity are the
 * low log2 bits of its four little-endian 32-bit words (identities are keyed BLAKE2b
 * output, uniformly distributed). */
#define BLOOM_LOG2 23
static u32 bloom_mask = (1u << BLOOM_LOG2) - 1;

/* Use the low log2 bits of each word (log2 <= BLOOM_LOG2); call before any bloom_add. */
__attribute__((export_name("bloom_size"))) void bloom_size(u32 log2) {
    if (log2 > BLOOM_LOG2) log2 = BLOOM_LOG2;
    bloom_mask = (1u << log2) - 1;
}

static inline u8 *bloom_bits(void) { return (u8 *)(((uintptr_t)&__heap_base + 7) & ~(uintptr_t)7); }

static inline u32 word(const u8 *k, int j) {
    u32 w;
    __builtin_memcpy(&w, k + 4 * j, 4);
    return w & bloom_mask;
}

/* Set the bits of the n identities at keys. */
__attribute__((export_name("bloom_add"))) void bloom_add(const u8 *keys, u32 n) {
    u8 *bits = bloom_bits();
    for (u32 i = 0; i < n; i++, keys += 16) {
        for (int j = 0; j < 4; j++) {
            u32 b = word(keys, j);
            bits[b >> 3] |= (u8)(1u << (b & 7));
        }
    }
}

/* out[i] = 1 if the i-th identity may be in the filter (all four bits set), else 0;
 * returns how many may be. */
__attribute__((export_name("bloom_test"))) u32 bloom_test(const u8 *keys, u32 n, u8 *out) {
    const u8 *bits = bloom_bits();
    u32 hits = 0;
    for (u32 i = 0; i < n; i++, keys += 16) {
        u8 in = 1;
        for (int j = 0; j < 4 && in; j++) {
            u32 b = word(keys, j);
            in = (bits[b >> 3] >> (b & 7)) & 1;
        }
        out[i] = in;
        hits += in;
    }
    return hits;
}
