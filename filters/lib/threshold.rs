//! threshold: alarm flag with hysteresis (written in Rust with filters/sdk/rust).
//!
//! A series goes into alarm when a reading is above `high` or below `low`, and leaves it
//! only once a reading is back inside the band by `hysteresis` (low + h <= value <=
//! high - h), so a value hovering at the limit does not make the alarm flicker.  Every
//! reading taken while its series is in alarm gets the ANOMALY flag; NaN readings leave
//! the alarm as it is.
//! config:
//!   high / low                 defaults for every metric (default: unbounded)
//!   high.METRIC / low.METRIC   per metric
//!   hysteresis                 default 0; hysteresis.METRIC per metric
//! kind: map; stateful (the alarm state of each series)
#![no_std]

use edgepipe_filter::{config, series_metric, Record, SeriesCache, FLAG_ANOMALY};

edgepipe_filter::config_decl! {
    "high": number, "alarm above this value, every metric (default: none)";
    "low": number, "alarm below this value, every metric (default: none)";
    "high.*": number, "per-metric high";
    "low.*": number, "per-metric low";
    "hysteresis": number, default = 0, minimum = 0, "how far back inside the band a reading must be to clear the alarm";
    "hysteresis.*": number, minimum = 0, "per-metric hysteresis";
}

#[derive(Clone, Copy, Default)]
struct Alarm {
    on: u32,
}

struct Defaults {
    low: f64,
    high: f64,
    hysteresis: f64,
}

#[derive(Clone, Copy)]
struct Limits {
    low: f64,
    high: f64,
    hysteresis: f64,
}

static LIMITS: SeriesCache<Limits> = SeriesCache::new();

fn limits(d: &Defaults, sid: u32) -> Limits {
    let lookup = |sid| {
        let mut buf = [0u8; 128];
        let cfg = config();
        let metric = series_metric(sid, &mut buf).unwrap_or("");
        Limits {
            low: cfg.f64(("low.", metric), d.low),
            high: cfg.f64(("high.", metric), d.high),
            hysteresis: cfg.f64(("hysteresis.", metric), d.hysteresis),
        }
    };
    LIMITS.get_or_insert_with(sid, lookup).unwrap_or(Limits {
        low: d.low,
        high: d.high,
        hysteresis: d.hysteresis,
    })
}

edgepipe_filter::map!(
    init = |cfg| -> Result<Defaults, i32> {
        Ok(Defaults {
            low: cfg.f64("low", f64::NEG_INFINITY),
            high: cfg.f64("high", f64::INFINITY),
            hysteresis: cfg.f64("hysteresis", 0.0),
        })
    },
    state = Alarm,
    |d: &Defaults, alarm: &mut Alarm, r: &mut Record| {
        let v = r.value;
        if v == v {
            let l = limits(d, r.series);
            if alarm.on == 0 {
                if v > l.high || v < l.low {
                    alarm.on = 1;
                }
            } else if v >= l.low + l.hysteresis && v <= l.high - l.hysteresis {
                alarm.on = 0;
            }
        }
        if alarm.on != 0 {
            r.flags |= FLAG_ANOMALY;
        }
    }
);
