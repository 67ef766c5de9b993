/* calibrate: linear calibration and unit conversion.
 *
 *   value' = convert(value * scale + offset)
 * config:
 *   scale / offset                  defaults for every metric (1 and 0)
 *   scale.METRIC / offset.METRIC    per metric
 *   unit.METRIC: c_to_f | f_to_c | c_to_k | k_to_c | pa_to_hpa | hpa_to_pa | ppm_to_ppb | ppb_to_ppm
 * Sets the CALIBRATED flag on every record it touches.  kind: map
 */
#include "edgepipe.h"

EP_CONFIG(
    EP_NUMBER("scale", 1, EP_ANY, "factor applied to every metric")
    EP_NUMBER("offset", 0, EP_ANY, "added to every metric after scaling")
    EP_NUMBER("scale.*", null, EP_ANY, "per-metric factor")
    EP_NUMBER("offset.*", null, EP_ANY, "per-metric offset")
    EP_ENUM("unit.*", "", "c_to_f|f_to_c|c_to_k|k_to_c|pa_to_hpa|hpa_to_pa|ppm_to_ppb|ppb_to_ppm",
            "per-metric unit conversion after calibration"));

typedef struct {
    double scale, offset, mul, add;
    uint32_t ready, touch;
} cal_t;

static double dflt_scale, dflt_offset;

EP_INIT {
    dflt_scale = ep_config_f64("scale", 1.0);
    dflt_offset = ep_config_f64("offset", 0.0);
    return 0;
}

static int streq(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

static void conversion(const char *unit, double *mul, double *add) {
    *mul = 1.0;
    *add = 0.0;
    if (streq(unit, "c_to_f")) *mul = 1.8, *add = 32.0;
    else if (streq(unit, "f_to_c")) *mul = 1.0 / 1.8, *add = -32.0 / 1.8;
    else if (streq(unit, "c_to_k")) *add = 273.15;
    else if (streq(unit, "k_to_c")) *add = -273.15;
    else if (streq(unit, "pa_to_hpa")) *mul = 0.01;
    else if (streq(unit, "hpa_to_pa")) *mul = 100.0;
    else if (streq(unit, "ppm_to_ppb")) *mul = 1000.0;
    else if (streq(unit, "ppb_to_ppm")) *mul = 0.001;
}

static const cal_t *cal_of(uint32_t sid) {
    cal_t *c = ep_series_cache(cal_t, sid);
    if (!c) return 0;
    if (!c->ready) {
        char metric[128], key[160], unit[32];
        ep_series_metric(sid, metric, sizeof metric);
        c->scale = ep_config_f64(ep_config_key(key, sizeof key, "scale.", metric), dflt_scale);
        c->offset = ep_config_f64(ep_config_key(key, sizeof key, "offset.", metric), dflt_offset);
        unit[0] = 0;
        ep_config_str(ep_config_key(key, sizeof key, "unit.", metric), unit, sizeof unit);
        conversion(unit, &c->mul, &c->add);
        c->ready = 1;
    }
    return c;
}

EP_MAP(calibrate) {
    const cal_t *c = cal_of(rec->series);
    if (!c) return;
    double v = rec->value * c->scale + c->offset;
    rec->value = v * c->mul + c->add;
    rec->flags |= EP_FLAG_CALIBRATED;
}
