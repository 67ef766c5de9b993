/* zscore: anomaly flagging against an exponentially weighted rolling mean / variance.
 *
 *   z = |x - mean| / sqrt(var)        (computed before x is folded in)
 *   flag ANOMALY when count >= warmup and var > 0 and z > threshold
 *   diff = x - mean; incr = alpha * diff; mean += incr; var = (1 - alpha) * (var + diff * incr)
 * config: alpha (default 0.05), threshold (default 3.0), warmup (default 10)
 * kind: map; stateful
 */
#include "edgepipe.h"

EP_CONFIG(
    EP_NUMBER("alpha", 0.05, EP_ABOVE_AT_MOST(0, 1), "weight of the newest reading in mean and variance")
    EP_NUMBER("threshold", 3.0, EP_AT_LEAST(0), "flag readings more than this many deviations away")
    EP_INT("warmup", 10, EP_AT_LEAST(0), "readings per series before anything is flagged"));

typedef struct {
    double mean, var;
    uint32_t count, pad;
} z_state;
EP_STATE(z_state)

static double alpha, threshold;
static uint32_t warmup;

EP_INIT {
    alpha = ep_config_f64("alpha", 0.05);
    threshold = ep_config_f64("threshold", 3.0);
    warmup = (uint32_t)ep_config_i64("warmup", 10);
    return alpha > 0.0 && alpha <= 1.0 ? 0 : -1;
}

EP_MAP(zscore) {
    z_state *s = ep_state(rec->series);
    if (!s) return;
    double x = rec->value;
    if (s->count == 0) {
        s->mean = x;
        s->var = 0.0;
        s->count = 1;
        return;
    }
    double diff = x - s->mean;
    if (s->count >= warmup && s->var > 0.0) {
        double a = diff < 0 ? -diff : diff;
        if (a / __builtin_sqrt(s->var) > threshold) rec->flags |= EP_FLAG_ANOMALY;
    }
    double incr = alpha * diff;
    s->mean += incr;
    s->var = (1.0 - alpha) * (s->var + diff * incr);
    if (s->count < 0xffffffffu) s->count++;
}
