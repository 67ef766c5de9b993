/* ema: exponential moving average smoothing, per series.
 *   ema = value (first reading);  ema += alpha * (value - ema)
 * config: alpha (0 < alpha <= 1, default 0.2)
 * kind: map; stateful
 */
#include "edgepipe.h"

EP_CONFIG(EP_NUMBER("alpha", 0.2, EP_ABOVE_AT_MOST(0, 1),
                    "smoothing factor: weight of the newest reading"));

typedef struct {
    double ema;
    uint32_t has, pad;
} ema_state;
EP_STATE(ema_state)

static double alpha;

EP_INIT {
    alpha = ep_config_f64("alpha", 0.2);
    if (!(alpha > 0.0 && alpha <= 1.0)) {
        ep_log(EP_LOG_ERROR, "ema: alpha must be in (0, 1]");
        return -1;
    }
    return 0;
}

EP_MAP(smooth) {
    ema_state *s = ep_state(rec->series);
    if (!s) return;
    if (!s->has) {
        s->ema = rec->value;
        s->has = 1;
    } else {
        s->ema += alpha * (rec->value - s->ema);
    }
    rec->value = s->ema;
}
