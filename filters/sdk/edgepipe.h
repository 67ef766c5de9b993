/*
 * edgepipe filter SDK for C (ABI v1, see filters/ABI.md).
 *
 * A filter author includes this header and writes ONE function with one of the kind
 * macros; the SDK provides every ABI export (memory management, ep_input, ep_process,
 * config parsing, per-series state with snapshot/restore):
 *
 *     #include "edgepipe.h"
 *     static double lo;
 *     EP_INIT { lo = ep_config_f64("min", -1e300); return 0; }
 *     EP_FILTER(keep_positive) { return rec->value >= lo; }
 *
 * Kinds (declare the same kind in the stage's YAML):
 *     EP_FILTER(fn)      int fn(const ep_record *rec)        keep (1) or drop (0)
 *     EP_MAP(fn)         void fn(ep_record *rec)             change value/flags in place
 *     EP_FILTER_MAP(fn)  int fn(ep_record *rec)              change in place, keep or drop
 *     EP_EXPAND(fn)      void fn(const ep_record *rec, ep_out *out)   ep_emit() any number
 *     EP_AGGREGATE(fn)   like EP_EXPAND, plus EP_FLUSH(fn2) void fn2(ep_out *out)
 * Optional:
 *     EP_CONFIG(keys...)             the config the filter accepts (see below)
 *     EP_INIT { ...; return 0; }     runs once per instance after the config is loaded;
 *                                    any non-zero return refuses the module (code init)
 *     EP_STATE(type)                 per-series state, snapshotted by the host:
 *                                    type *s = ep_state(rec->series);  (zeroed on first use)
 *
 *
 * Config declaration: the host checks a stage's `config:` against it before ep_init runs
 * (unknown keys, types, ranges; filters/ABI.md "Config declaration").  One EP_CONFIG per
 * filter, at file scope, keys one after another (no commas between them); a NAME ending
 * in ".*" is one key per suffix (per metric):
 *     EP_CONFIG(
 *         EP_NUMBER("window_s", 60, EP_ABOVE(0), "window length in seconds")
 *         EP_NUMBER("band.*", null, EP_AT_LEAST(0), "per-metric band")
 *         EP_BOOL("passthrough", false, "also forward the raw readings"));
 * Keys: EP_BOOL(name, dflt, desc)   EP_INT(name, dflt, range, desc)
 *       EP_NUMBER(name, dflt, range, desc)   EP_NUMBER_OR_EMPTY(name, dflt, range, desc)
 *       EP_STRING(name, dflt, desc)   EP_NUMBER_LIST(name, items, range, desc)
 *       EP_ENUM(name, dflt, "a|b|c", desc)   EP_ENUM_LIST(name, dflt, "a|b|c", desc)
 * dflt is a number, true/false or null (no default); for strings a literal ("" for none).
 * range is EP_ANY, EP_AT_LEAST(lo), EP_ABOVE(lo), EP_AT_MOST(hi), EP_BETWEEN(lo, hi) or
 * EP_ABOVE_AT_MOST(lo, hi); items is EP_ITEMS(n) (exactly n) or EP_ITEMS_ANY.  Numbers are
 * JSON numbers; names and descriptions plain text (no double quotes or backslashes).
 * `edgepipe filter build` checks the declaration, `edgepipe filter describe` prints it.
 *
 * Build:  python -m ziglang cc --target=wasm32-freestanding -nostdlib -O2 \
 *             -Wl,--no-entry -Wl,--export-dynamic -Wl,--strip-debug -Wl,-z,stack-size=65536 \
 *             -I filters/sdk my_filter.c -o my_filter.wasm
 * or simply `edgepipe filter build my_filter.c`.
 */
#ifndef EDGEPIPE_H
#define EDGEPIPE_H

#include <stddef.h>
#include <stdint.h>

#define EP_ABI_VERSION 1

#define EP_FLAG_ANOMALY (1u << 0)
#define EP_FLAG_SPIKE (1u << 1)
#define EP_FLAG_AGGREGATE (1u << 2)
#define EP_FLAG_CALIBRATED (1u << 3)

/* guest-reported error codes (ep_process returns -code) */
#define EP_ERR_NOMEM 1
#define EP_ERR_STATE 2
#define EP_ERR_USER 100

#define EP_LOG_DEBUG 0
#define EP_LOG_INFO 1
#define EP_LOG_WARN 2
#define EP_LOG_ERROR 3

typedef struct {
    int64_t ts;      /* ms since the Unix epoch */
    double value;
    uint32_t series; /* host-assigned series id */
    uint32_t flags;
} ep_record;

_Static_assert(sizeof(ep_record) == 24, "ep_record must be 24 bytes");

#define EP_EXPORT(name) __attribute__((export_name(#name), visibility("default")))
#define EP_IMPORT(name) __attribute__((import_module("edgepipe"), import_name(#name)))

/* ---- config declaration: JSON lines in the custom section "edgepipe.config" ---------- */
/* Written with assembler directives: clang's section attribute puts wasm32 data into a
   data segment, only `.section .custom_section.NAME` makes a custom section.
   EP__A(lit) emits the bytes of a string literal, EP__T(tok) the spelling of a token. */
#define EP__A(lit) ".ascii " #lit "\n"
#define EP__T(tok) ".ascii \"" #tok "\"\n"
#define EP__KEY(name, type, dflt, extra, desc)                                               \
    EP__A("{\"name\":\"") EP__A(name) EP__A("\",\"type\":\"") EP__A(type)                   \
    EP__A("\",\"default\":") dflt extra EP__A(",\"description\":\"") EP__A(desc) EP__A("\"}\n")
#define EP__STR(lit) EP__A("\"") EP__A(lit) EP__A("\"")
#define EP_ANY
#define EP_AT_LEAST(lo) EP__A(",\"minimum\":") EP__T(lo)
#define EP_ABOVE(lo) EP__A(",\"exclusive_minimum\":") EP__T(lo)
#define EP_AT_MOST(hi) EP__A(",\"maximum\":") EP__T(hi)
#define EP_BETWEEN(lo, hi) EP_AT_LEAST(lo) EP_AT_MOST(hi)
#define EP_ABOVE_AT_MOST(lo, hi) EP_ABOVE(lo) EP_AT_MOST(hi)
#define EP_ITEMS(n) EP__A(",\"min_items\":") EP__T(n) EP__A(",\"max_items\":") EP__T(n)
#define EP_ITEMS_ANY
#define EP_BOOL(name, dflt, desc) EP__KEY(name, "bool", EP__T(dflt), , desc)
#define EP_INT(name, dflt, range, desc) EP__KEY(name, "int", EP__T(dflt), range, desc)
#define EP_NUMBER(name, dflt, range, desc) EP__KEY(name, "number", EP__T(dflt), range, desc)
/* a number key that may also be given empty (`key:` with no value) */
#define EP_NUMBER_OR_EMPTY(name, dflt, range, desc)                                          \
    EP__KEY(name, "number", EP__T(dflt), range EP__A(",\"nullable\":true"), desc)
#define EP_STRING(name, dflt, desc) EP__KEY(name, "string", EP__STR(dflt), , desc)
#define EP_ENUM(name, dflt, values, desc)                                                    \
    EP__KEY(name, "string", EP__STR(dflt), EP__A(",\"enum\":") EP__STR(values), desc)
#define EP_ENUM_LIST(name, dflt, values, desc)                                               \
    EP__KEY(name, "string_list", EP__STR(dflt), EP__A(",\"enum\":") EP__STR(values), desc)
#define EP_NUMBER_LIST(name, items, range, desc)                                             \
    EP__KEY(name, "number_list", EP__T(null), items range, desc)
#define EP_CONFIG(keys)                                                                      \
    __asm__(".section .custom_section.edgepipe.config,\"\",@\n"                             \
            EP__A("{\"edgepipe.config\":1}\n") keys ".text\n")

/* ---- host imports (module "edgepipe") ------------------------------------------- */
EP_IMPORT(series_name) int32_t ep__host_series_name(uint32_t series, uint32_t kind, void *buf,
                                                     uint32_t len);
EP_IMPORT(series_derive) uint32_t ep__host_series_derive(uint32_t series, const void *suffix,
                                                          uint32_t len);
EP_IMPORT(log) void ep__host_log(uint32_t level, const void *msg, uint32_t len);

/* ---- freestanding libc bits the compiler may call -------------------------------- */
__attribute__((weak)) void *memcpy(void *restrict d, const void *restrict s, size_t n) {
    unsigned char *dp = d;
    const unsigned char *sp = s;
    while (n--) *dp++ = *sp++;
    return d;
}
__attribute__((weak)) void *memmove(void *d, const void *s, size_t n) {
    unsigned char *dp = d;
    const unsigned char *sp = s;
    if (dp < sp) {
        while (n--) *dp++ = *sp++;
    } else {
        while (n--) dp[n] = sp[n];
    }
    return d;
}
__attribute__((weak)) void *memset(void *d, int c, size_t n) {
    unsigned char *dp = d;
    while (n--) *dp++ = (unsigned char)c;
    return d;
}

static inline uint32_t ep_strlen(const char *s) {
    uint32_t n = 0;
    while (s[n]) n++;
    return n;
}

/* ---- memory: a bump allocator over linear memory; buffers only ever grow --------- */
extern unsigned char __heap_base;
static uintptr_t ep__brk;

static void *ep_sbrk(uint32_t n) {
    if (!ep__brk) ep__brk = ((uintptr_t)&__heap_base + 15) & ~(uintptr_t)15;
    uintptr_t start = ep__brk;
    uintptr_t end = (start + n + 15) & ~(uintptr_t)15;
    if (end < start) return 0;
    uintptr_t have = (uintptr_t)__builtin_wasm_memory_size(0) * 65536u;
    if (end > have) {
        uintptr_t pages = (end - have + 65535u) / 65536u;
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) return 0;
    }
    ep__brk = end;
    return (void *)start;
}

typedef struct {
    unsigned char *p;
    uint32_t cap;
} ep__buf;

/* room for `bytes`; keeps the old contents if `keep` */
static void *ep__reserve(ep__buf *b, uint32_t bytes, uint32_t keep) {
    if (bytes <= b->cap) return b->p;
    uint32_t cap = b->cap ? b->cap : 4096;
    while (cap < bytes) {
        if (cap > 0x7fffffffu) return 0;
        cap *= 2;
    }
    unsigned char *p = ep_sbrk(cap);
    if (!p) return 0;
    if (keep && b->p) memcpy(p, b->p, keep);
    b->p = p;
    b->cap = cap;
    return p;
}

static ep__buf ep__in, ep__scratch, ep__cfgbuf;
static uint32_t ep__cfg_len;

static inline int64_t ep__result(const void *ptr, uint32_t n) {
    return (int64_t)(((uint64_t)(uintptr_t)ptr << 32) | (uint64_t)n);
}

/* ---- required and common exports ---------------------------------------------- */
EP_EXPORT(ep_abi_version) int32_t ep_abi_version(void) { return EP_ABI_VERSION; }

EP_EXPORT(ep_input) uint32_t ep_input(uint32_t n) {
    if (n > 0x7fffffffu / sizeof(ep_record)) return 0;
    return (uint32_t)(uintptr_t)ep__reserve(&ep__in, n * (uint32_t)sizeof(ep_record), 0);
}

EP_EXPORT(ep_alloc) uint32_t ep_alloc(uint32_t len) {
    return (uint32_t)(uintptr_t)ep__reserve(&ep__scratch, len ? len : 1, 0);
}

extern int ep_on_init(void) __attribute__((weak));
#define EP_INIT int ep_on_init(void)

EP_EXPORT(ep_init) int32_t ep_init(uint32_t cfg_ptr, uint32_t cfg_len) {
    if (cfg_len) {
        if (!ep__reserve(&ep__cfgbuf, cfg_len, 0)) return -EP_ERR_NOMEM;
        memcpy(ep__cfgbuf.p, (const void *)(uintptr_t)cfg_ptr, cfg_len);
    }
    ep__cfg_len = cfg_len;
    if (ep_on_init) return ep_on_init();
    return 0;
}

/* ---- logging and series names ------------------------------------------------- */
static inline void ep_log(uint32_t level, const char *msg) {
    ep__host_log(level, msg, ep_strlen(msg));
}

/* copy the device / metric name of `series` into buf (NUL-terminated, truncated);
   returns the full length, or -1 for an unknown id */
static int32_t ep__series_name(uint32_t series, uint32_t kind, char *buf, uint32_t cap) {
    if (!cap) return ep__host_series_name(series, kind, buf, 0);
    int32_t n = ep__host_series_name(series, kind, buf, cap - 1);
    if (n < 0) {
        buf[0] = 0;
        return n;
    }
    buf[(uint32_t)n < cap - 1 ? (uint32_t)n : cap - 1] = 0;
    return n;
}
static inline int32_t ep_series_device(uint32_t series, char *buf, uint32_t cap) {
    return ep__series_name(series, 0, buf, cap);
}
static inline int32_t ep_series_metric(uint32_t series, char *buf, uint32_t cap) {
    return ep__series_name(series, 1, buf, cap);
}
/* the series with the same device/tags and metric + suffix (created on demand) */
static inline uint32_t ep_series_derive(uint32_t series, const char *suffix) {
    return ep__host_series_derive(series, suffix, ep_strlen(suffix));
}

/* ---- numbers ------------------------------------------------------------------ */
static const double ep__pow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                   1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                   1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* parse a decimal number (exactly rounded for up to 15 significant digits and
   |exponent| <= 22, which covers any hand-written config value); returns 0 on error */
static int ep_parse_f64(const char *s, uint32_t len, double *out) {
    uint32_t i = 0;
    while (i < len && (s[i] == ' ' || s[i] == '\t')) i++;
    while (len > i && (s[len - 1] == ' ' || s[len - 1] == '\t' || s[len - 1] == '\r')) len--;
    int neg = 0;
    if (i < len && (s[i] == '-' || s[i] == '+')) neg = s[i++] == '-';
    if (len - i == 3 && (s[i] | 32) == 'i' && (s[i + 1] | 32) == 'n' && (s[i + 2] | 32) == 'f') {
        *out = neg ? -__builtin_inf() : __builtin_inf();
        return 1;
    }
    uint64_t mant = 0;
    int exp10 = 0, digits = 0, any = 0;
    for (; i < len && s[i] >= '0' && s[i] <= '9'; i++, any = 1) {
        if (mant < 100000000000000000ull) {
            mant = mant * 10 + (uint64_t)(s[i] - '0');
            if (mant) digits++;
        } else {
            exp10++;
        }
    }
    if (i < len && s[i] == '.') {
        for (i++; i < len && s[i] >= '0' && s[i] <= '9'; i++, any = 1) {
            if (mant < 100000000000000000ull) {
                mant = mant * 10 + (uint64_t)(s[i] - '0');
                exp10--;
            }
        }
    }
    if (!any) return 0;
    if (i < len && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        int eneg = 0, e = 0, edig = 0;
        if (i < len && (s[i] == '-' || s[i] == '+')) eneg = s[i++] == '-';
        for (; i < len && s[i] >= '0' && s[i] <= '9'; i++, edig = 1)
            if (e < 10000) e = e * 10 + (s[i] - '0');
        if (!edig) return 0;
        exp10 += eneg ? -e : e;
    }
    if (i != len) return 0;
    double v = (double)mant;
    while (exp10 > 22) {
        v *= 1e22;
        exp10 -= 22;
    }
    while (exp10 < -22) {
        v /= 1e22;
        exp10 += 22;
    }
    v = exp10 >= 0 ? v * ep__pow10[exp10] : v / ep__pow10[-exp10];
    *out = neg ? -v : v;
    (void)digits;
    return 1;
}

/* ---- config: "key=value\n" lines (YAML mapping flattened by the host) ----------- */
/* finds `key`; points val and len at its value; returns 1 if present */
static int ep_config_get(const char *key, const char **val, uint32_t *len) {
    const char *c = (const char *)ep__cfgbuf.p;
    uint32_t n = ep__cfg_len, klen = ep_strlen(key), i = 0;
    while (i < n) {
        uint32_t j = i;
        while (j < n && c[j] != '\n') j++;
        if (j - i > klen && c[i + klen] == '=') {
            uint32_t k = 0;
            while (k < klen && c[i + k] == key[k]) k++;
            if (k == klen) {
                *val = c + i + klen + 1;
                *len = j - (i + klen + 1);
                return 1;
            }
        }
        i = j + 1;
    }
    return 0;
}

static double ep_config_f64(const char *key, double dflt) {
    const char *v;
    uint32_t n;
    double out;
    if (ep_config_get(key, &v, &n) && ep_parse_f64(v, n, &out)) return out;
    return dflt;
}

static int64_t ep_config_i64(const char *key, int64_t dflt) {
    double d = ep_config_f64(key, (double)dflt);
    return (int64_t)d;
}

static int ep_config_bool(const char *key, int dflt) {
    const char *v;
    uint32_t n;
    if (!ep_config_get(key, &v, &n)) return dflt;
    if (n == 4 && v[0] == 't' && v[1] == 'r' && v[2] == 'u' && v[3] == 'e') return 1;
    if (n == 5 && v[0] == 'f' && v[1] == 'a' && v[2] == 'l' && v[3] == 's' && v[4] == 'e') return 0;
    if (n == 1) return v[0] == '1';
    return dflt;
}

/* copy a string value into buf (NUL-terminated); returns its length or -1 if absent */
static int32_t ep_config_str(const char *key, char *buf, uint32_t cap) {
    const char *v;
    uint32_t n;
    if (!ep_config_get(key, &v, &n)) return -1;
    if (cap) {
        uint32_t m = n < cap - 1 ? n : cap - 1;
        memcpy(buf, v, m);
        buf[m] = 0;
    }
    return (int32_t)n;
}

/* a comma-separated list of numbers ("0,50"); returns how many were parsed (-1 absent) */
static int ep_config_f64_list(const char *key, double *out, int max) {
    const char *v;
    uint32_t n;
    if (!ep_config_get(key, &v, &n)) return -1;
    int count = 0;
    uint32_t i = 0;
    while (i <= n && count < max) {
        uint32_t j = i;
        while (j < n && v[j] != ',') j++;
        if (!ep_parse_f64(v + i, j - i, &out[count])) return count;
        count++;
        i = j + 1;
    }
    return count;
}

/* key = prefix + name, e.g. ep_config_key(buf, sizeof buf, "range.", metric) */
static const char *ep_config_key(char *buf, uint32_t cap, const char *prefix, const char *name) {
    uint32_t k = 0;
    for (; *prefix && k + 1 < cap; prefix++) buf[k++] = *prefix;
    for (; *name && k + 1 < cap; name++) buf[k++] = *name;
    buf[k] = 0;
    return buf;
}

/* ---- per-series tables (dense series ids) --------------------------------------- */
/* A table is one contiguous blob: a 16-byte header followed by `count` slots of `size`
   bytes.  The state table's blob *is* the snapshot (no copy). */
typedef struct {
    uint32_t magic; /* "EPS1" */
    uint32_t size;  /* slot size */
    uint32_t count; /* slots in use (highest series id touched + 1) */
    uint32_t reserved;
} ep__table_hdr;

typedef struct {
    ep__buf buf;
} ep__table;

#define EP__STATE_MAGIC 0x31535045u /* "EPS1" little-endian */

static void *ep__table_slot(ep__table *t, uint32_t sid, uint32_t size) {
    ep__table_hdr *h = (ep__table_hdr *)t->buf.p;
    if (h && sid < h->count) return t->buf.p + sizeof(ep__table_hdr) + (uint64_t)sid * size;
    if (sid >= 0x7fffffffu / (size ? size : 1)) return 0;
    uint32_t used = h ? (uint32_t)sizeof(ep__table_hdr) + h->count * size : 0;
    uint32_t need = (uint32_t)sizeof(ep__table_hdr) + (sid + 1) * size;
    if (!ep__reserve(&t->buf, need, used)) return 0;
    h = (ep__table_hdr *)t->buf.p;
    if (!used) {
        h->magic = EP__STATE_MAGIC;
        h->size = size;
        h->count = 0;
        h->reserved = 0;
    }
    memset(t->buf.p + sizeof(ep__table_hdr) + (uint64_t)h->count * size, 0,
           (sid + 1 - h->count) * size);
    h->count = sid + 1;
    return t->buf.p + sizeof(ep__table_hdr) + (uint64_t)sid * size;
}

static ep__table ep__state_table, ep__cache_table;

/* non-persistent per-series scratch (e.g. config looked up by metric name) */
#define ep_series_cache(type, sid) ((type *)ep__table_slot(&ep__cache_table, (sid), sizeof(type)))

static int64_t ep__snapshot(void) {
    ep__table_hdr *h = (ep__table_hdr *)ep__state_table.buf.p;
    if (!h || !h->count) return 0;
    return ep__result(h, (uint32_t)sizeof(ep__table_hdr) + h->count * h->size);
}

static int32_t ep__restore(uint32_t size, uint32_t ptr, uint32_t len) {
    const ep__table_hdr *h = (const ep__table_hdr *)(uintptr_t)ptr;
    if (len == 0) return 0;
    if (len < sizeof(ep__table_hdr) || h->magic != EP__STATE_MAGIC || h->size != size)
        return -EP_ERR_STATE;
    if ((uint64_t)h->count * size + sizeof(ep__table_hdr) != len) return -EP_ERR_STATE;
    ep__table_hdr *cur = (ep__table_hdr *)ep__state_table.buf.p;
    if (cur) cur->count = 0;
    if (h->count && !ep__table_slot(&ep__state_table, h->count - 1, size)) return -EP_ERR_NOMEM;
    memcpy(ep__state_table.buf.p, h, len);
    return 0;
}

/* number of state slots (highest series id with state + 1), for ep_flush loops */
static inline uint32_t ep_state_count(void) {
    const ep__table_hdr *h = (const ep__table_hdr *)ep__state_table.buf.p;
    return h ? h->count : 0;
}

/* EP_STATE(type): per-series state the host snapshots (ep_snapshot / ep_restore) */
#define EP_STATE(type)                                                                       \
    static inline type *ep_state(uint32_t sid) {                                             \
        return (type *)ep__table_slot(&ep__state_table, sid, sizeof(type));                  \
    }                                                                                        \
    EP_EXPORT(ep_snapshot) int64_t ep_snapshot(void) { return ep__snapshot(); }             \
    EP_EXPORT(ep_restore) int32_t ep_restore(uint32_t ptr, uint32_t len) {                  \
        return ep__restore((uint32_t)sizeof(type), ptr, len);                                \
    }

/* ---- output for expand / aggregate ------------------------------------------- */
typedef struct {
    ep__buf buf;
    uint32_t n;
    int failed;
} ep_out;

static ep_out ep__out;

static inline void ep_emit(ep_out *out, int64_t ts, double value, uint32_t series,
                           uint32_t flags) {
    uint32_t need = (out->n + 1) * (uint32_t)sizeof(ep_record);
    if (need > out->buf.cap &&
        !ep__reserve(&out->buf, need, out->n * (uint32_t)sizeof(ep_record))) {
        out->failed = 1;
        return;
    }
    ep_record *r = (ep_record *)out->buf.p + out->n++;
    r->ts = ts;
    r->value = value;
    r->series = series;
    r->flags = flags;
}

static inline void ep_emit_rec(ep_out *out, const ep_record *rec) {
    ep_emit(out, rec->ts, rec->value, rec->series, rec->flags);
}

static inline int64_t ep__finish_out(ep_out *out) {
    if (out->failed) return -EP_ERR_NOMEM;
    return ep__result(out->buf.p, out->n);
}

/* ---- the kind macros -------------------------------------------------------- */
/* keep the records for which fn returns non-zero, in place (filter and filter_map) */
#define EP__KEEP_IF(fn, qual)                                                          \
    static int fn(qual ep_record *rec);                                                \
    EP_EXPORT(ep_process) int64_t ep_process(uint32_t n) {                            \
        ep_record *in = (ep_record *)ep__in.p;                                         \
        uint32_t k = 0;                                                                \
        for (uint32_t i = 0; i < n; i++)                                               \
            if (fn(&in[i])) {                                                          \
                if (k != i) in[k] = in[i];                                             \
                k++;                                                                   \
            }                                                                          \
        return ep__result(in, k);                                                      \
    }                                                                                  \
    static int fn(qual ep_record *rec)

#define EP_FILTER(fn) EP__KEEP_IF(fn, const)

#define EP_MAP(fn)                                                                     \
    static void fn(ep_record *rec);                                                    \
    EP_EXPORT(ep_process) int64_t ep_process(uint32_t n) {                            \
        ep_record *in = (ep_record *)ep__in.p;                                         \
        for (uint32_t i = 0; i < n; i++) fn(&in[i]);                                   \
        return ep__result(in, n);                                                      \
    }                                                                                  \
    static void fn(ep_record *rec)

#define EP_FILTER_MAP(fn) EP__KEEP_IF(fn, )

#define EP_EXPAND(fn)                                                                  \
    static void fn(const ep_record *rec, ep_out *out);                                 \
    EP_EXPORT(ep_process) int64_t ep_process(uint32_t n) {                            \
        const ep_record *in = (const ep_record *)ep__in.p;                             \
        ep__out.n = 0;                                                                 \
        ep__out.failed = 0;                                                            \
        for (uint32_t i = 0; i < n && !ep__out.failed; i++) fn(&in[i], &ep__out);      \
        return ep__finish_out(&ep__out);                                               \
    }                                                                                  \
    static void fn(const ep_record *rec, ep_out *out)

#define EP_AGGREGATE(fn) EP_EXPAND(fn)

#define EP_FLUSH(fn)                                                                   \
    static void fn(ep_out *out);                                                       \
    EP_EXPORT(ep_flush) int64_t ep_flush(void) {                                       \
        ep__out.n = 0;                                                                 \
        ep__out.failed = 0;                                                            \
        fn(&ep__out);                                                                  \
        return ep__finish_out(&ep__out);                                               \
    }                                                                                  \
    static void fn(ep_out *out)

#endif /* EDGEPIPE_H */
