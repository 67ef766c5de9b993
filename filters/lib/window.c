/* window: tumbling-window aggregates per series, driven by reading timestamps.
 *
 * Windows are [k*W, (k+1)*W) in reading time.  When a series' first reading of a later
 * window arrives, the finished window is emitted as derived series METRIC_mean,
 * METRIC_min, METRIC_max, METRIC_count (ts = window start, flag AGGREGATE).  Readings
 * older than the open window are ignored.  ep_flush emits every open window.
 * config: window_s (default 60), stats (default "mean,min,max,count"),
 *         passthrough (default false: also forward the raw readings)
 * kind: aggregate; stateful (the open window of every series)
 */
#include "edgepipe.h"

EP_CONFIG(
    EP_NUMBER("window_s", 60, EP_AT_LEAST(0.001), "window length in seconds")
    EP_ENUM_LIST("stats", "mean,min,max,count", "mean|min|max|count",
                 "aggregates emitted per window, as derived series METRIC_STAT")
    EP_BOOL("passthrough", false, "also forward the raw readings"));

typedef struct {
    int64_t start;
    double sum, min, max;
    uint32_t count, pad;
} win_state;
EP_STATE(win_state)

enum { S_MEAN = 1, S_MIN = 2, S_MAX = 4, S_COUNT = 8 };

typedef struct {
    uint32_t ids[4];
    uint32_t ready;
} derived_t;

static int64_t window_ms;
static uint32_t stats;
static int passthrough;

static int has_word(const char *list, uint32_t n, const char *word) {
    uint32_t w = ep_strlen(word), i = 0;
    while (i < n) {
        uint32_t j = i;
        while (j < n && list[j] != ',') j++;
        uint32_t a = i, b = j;
        while (a < b && list[a] == ' ') a++;
        while (b > a && list[b - 1] == ' ') b--;
        if (b - a == w) {
            uint32_t k = 0;
            while (k < w && list[a + k] == word[k]) k++;
            if (k == w) return 1;
        }
        i = j + 1;
    }
    return 0;
}

EP_INIT {
    double w = ep_config_f64("window_s", 60.0);
    if (!(w >= 0.001)) return -1;
    window_ms = (int64_t)(w * 1000.0);
    const char *v;
    uint32_t n;
    if (ep_config_get("stats", &v, &n)) {
        stats = (has_word(v, n, "mean") ? S_MEAN : 0) | (has_word(v, n, "min") ? S_MIN : 0) |
                (has_word(v, n, "max") ? S_MAX : 0) | (has_word(v, n, "count") ? S_COUNT : 0);
        if (!stats) return -2;
    } else {
        stats = S_MEAN | S_MIN | S_MAX | S_COUNT;
    }
    passthrough = ep_config_bool("passthrough", 0);
    return 0;
}

static const derived_t *derived(uint32_t sid) {
    derived_t *d = ep_series_cache(derived_t, sid);
    if (d && !d->ready) {
        d->ids[0] = stats & S_MEAN ? ep_series_derive(sid, "_mean") : 0;
        d->ids[1] = stats & S_MIN ? ep_series_derive(sid, "_min") : 0;
        d->ids[2] = stats & S_MAX ? ep_series_derive(sid, "_max") : 0;
        d->ids[3] = stats & S_COUNT ? ep_series_derive(sid, "_count") : 0;
        d->ready = 1;
    }
    return d;
}

static void emit_window(uint32_t sid, win_state *s, ep_out *out) {
    const derived_t *d = derived(sid);
    if (!d) {
        out->failed = 1;
        return;
    }
    if (stats & S_MEAN) ep_emit(out, s->start, s->sum / s->count, d->ids[0], EP_FLAG_AGGREGATE);
    if (stats & S_MIN) ep_emit(out, s->start, s->min, d->ids[1], EP_FLAG_AGGREGATE);
    if (stats & S_MAX) ep_emit(out, s->start, s->max, d->ids[2], EP_FLAG_AGGREGATE);
    if (stats & S_COUNT) ep_emit(out, s->start, (double)s->count, d->ids[3], EP_FLAG_AGGREGATE);
    s->count = 0;
}

static int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

EP_AGGREGATE(aggregate) {
    if (passthrough) ep_emit_rec(out, rec);
    win_state *s = ep_state(rec->series);
    if (!s) {
        out->failed = 1;
        return;
    }
    int64_t start = floor_div(rec->ts, window_ms) * window_ms;
    if (s->count) {
        if (start < s->start) return; /* late reading: its window is gone */
        if (start > s->start) emit_window(rec->series, s, out);
    }
    if (!s->count) {
        s->start = start;
        s->sum = 0;
        s->min = rec->value;
        s->max = rec->value;
    }
    s->sum += rec->value;
    if (rec->value < s->min) s->min = rec->value;
    if (rec->value > s->max) s->max = rec->value;
    s->count++;
}

EP_FLUSH(flush_windows) {
    uint32_t n = ep_state_count();
    for (uint32_t sid = 0; sid < n; sid++) {
        win_state *s = ep_state(sid);
        if (s && s->count) emit_window(sid, s, out);
    }
}
