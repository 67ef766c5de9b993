/* deadband: report by exception.  A reading passes when it differs from the last
 * reported value of its series by at least `band`, or when `max_silence_s` has passed
 * since the last report (a heartbeat; 0 = never).
 * config: band (default 0.5), band.METRIC, max_silence_s (default 0)
 * kind: filter; stateful (last reported value per series)
 */
#include "edgepipe.h"

EP_CONFIG(
    EP_NUMBER("band", 0.5, EP_AT_LEAST(0), "smallest change that is reported")
    EP_NUMBER("band.*", null, EP_AT_LEAST(0), "per-metric band")
    EP_NUMBER("max_silence_s", 0, EP_AT_LEAST(0),
              "report anyway after this many seconds without a report (0: never)"));

typedef struct {
    double last;
    int64_t last_ts;
    uint32_t has, pad;
} db_state;
EP_STATE(db_state)

typedef struct {
    double band;
    uint32_t ready;
} db_cfg;

static double dflt_band;
static int64_t silence_ms;

EP_INIT {
    dflt_band = ep_config_f64("band", 0.5);
    silence_ms = (int64_t)(ep_config_f64("max_silence_s", 0.0) * 1000.0);
    return 0;
}

static double band_of(uint32_t sid) {
    db_cfg *c = ep_series_cache(db_cfg, sid);
    if (!c) return dflt_band;
    if (!c->ready) {
        char metric[128], key[160];
        ep_series_metric(sid, metric, sizeof metric);
        c->band = ep_config_f64(ep_config_key(key, sizeof key, "band.", metric), dflt_band);
        c->ready = 1;
    }
    return c->band;
}

EP_FILTER(deadband) {
    db_state *s = ep_state(rec->series);
    if (!s) return 1;
    double d = rec->value - s->last;
    if (d < 0) d = -d;
    int report = !s->has || d >= band_of(rec->series) ||
                 (silence_ms > 0 && rec->ts - s->last_ts >= silence_ms);
    if (report) {
        s->last = rec->value;
        s->last_ts = rec->ts;
        s->has = 1;
    }
    return report;
}
