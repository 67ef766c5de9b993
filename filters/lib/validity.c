/* validity: drop missing-value sentinels, non-finite and physically impossible readings.
 *
 * config:
 *   sentinel: -200          value meaning "missing" (the UCI air-quality data uses -200)
 *   min / max               default range for every metric (default: unbounded)
 *   range: {METRIC: [lo, hi], ...}   per-metric range (inclusive), overrides min/max
 * kind: filter
 */
#include "edgepipe.h"

EP_CONFIG(
    EP_NUMBER_OR_EMPTY("sentinel", -200, EP_ANY,
                       "value meaning missing, dropped (empty: no sentinel)")
    EP_NUMBER("min", null, EP_ANY, "lowest valid value of every metric (default: unbounded)")
    EP_NUMBER("max", null, EP_ANY, "highest valid value of every metric (default: unbounded)")
    EP_NUMBER_LIST("range.*", EP_ITEMS(2), EP_ANY,
                   "per-metric valid range [lo, hi] (inclusive), overrides min/max"));

typedef struct {
    double lo, hi;
    uint32_t ready;
} range_t;

static double sentinel, dflt_lo, dflt_hi;
static int has_sentinel;

EP_INIT {
    const char *v;
    uint32_t n;
    has_sentinel = ep_config_get("sentinel", &v, &n) ? n > 0 : 1;
    sentinel = ep_config_f64("sentinel", -200.0);
    dflt_lo = ep_config_f64("min", -__builtin_inf());
    dflt_hi = ep_config_f64("max", __builtin_inf());
    return 0;
}

static const range_t *range_of(uint32_t sid) {
    range_t *r = ep_series_cache(range_t, sid);
    if (!r) return 0;
    if (!r->ready) {
        char metric[128], key[160];
        double lim[2];
        r->lo = dflt_lo;
        r->hi = dflt_hi;
        ep_series_metric(sid, metric, sizeof metric);
        if (ep_config_f64_list(ep_config_key(key, sizeof key, "range.", metric), lim, 2) == 2) {
            r->lo = lim[0];
            r->hi = lim[1];
        }
        r->ready = 1;
    }
    return r;
}

EP_FILTER(valid) {
    double v = rec->value;
    if (v != v || v == __builtin_inf() || v == -__builtin_inf()) return 0;
    if (has_sentinel && v == sentinel) return 0;
    const range_t *r = range_of(rec->series);
    if (!r) return 0;
    return v >= r->lo && v <= r->hi;
}
