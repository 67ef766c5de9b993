/* spike: rate-of-change spike detection.  A reading whose change from the previous
 * reading of its series exceeds max_rate per second is flagged SPIKE (it is kept).
 * config: max_rate (per second, default 1.0), max_rate.METRIC
 * kind: map; stateful (previous reading per series)
 */
#include "edgepipe.h"

EP_CONFIG(
    EP_NUMBER("max_rate", 1.0, EP_AT_LEAST(0), "largest normal change per second")
    EP_NUMBER("max_rate.*", null, EP_AT_LEAST(0), "per-metric max_rate"));

typedef struct {
    double prev;
    int64_t prev_ts;
    uint32_t has, pad;
} spike_state;
EP_STATE(spike_state)

typedef struct {
    double max_rate;
    uint32_t ready;
} spike_cfg;

static double dflt_rate;

EP_INIT {
    dflt_rate = ep_config_f64("max_rate", 1.0);
    return 0;
}

static double rate_of(uint32_t sid) {
    spike_cfg *c = ep_series_cache(spike_cfg, sid);
    if (!c) return dflt_rate;
    if (!c->ready) {
        char metric[128], key[160];
        ep_series_metric(sid, metric, sizeof metric);
        c->max_rate = ep_config_f64(ep_config_key(key, sizeof key, "max_rate.", metric), dflt_rate);
        c->ready = 1;
    }
    return c->max_rate;
}

EP_MAP(spike) {
    spike_state *s = ep_state(rec->series);
    if (!s) return;
    if (s->has && rec->ts > s->prev_ts) {
        double d = rec->value - s->prev;
        if (d < 0) d = -d;
        double rate = d / ((double)(rec->ts - s->prev_ts) / 1000.0);
        if (rate > rate_of(rec->series)) rec->flags |= EP_FLAG_SPIKE;
    }
    s->prev = rec->value;
    s->prev_ts = rec->ts;
    s->has = 1;
}
