//! edgepipe filter SDK for Rust (ABI v1, see filters/ABI.md).
//!
//! A filter author writes ONE function and hands it to one of the kind macros; the SDK
//! provides every ABI export (memory, `ep_input`, `ep_process`, config, per-series state
//! with snapshot/restore), exactly like `edgepipe.h` (C) and `edgepipe.zig` (Zig):
//!
//! ```ignore
//! #![no_std]
//! use edgepipe_filter::Record;
//! edgepipe_filter::filter!(|r: &Record| r.value >= 0.0);
//! ```
//!
//! Kinds (declare the same kind in the stage's YAML):
//!
//! | macro | function |
//! |---|---|
//! | `filter!(f)` | `fn(&Record) -> bool` keep or drop |
//! | `map!(f)` | `fn(&mut Record)` change value/flags in place |
//! | `filter_map!(f)` | `fn(&mut Record) -> bool` change in place, keep or drop |
//! | `expand!(f)` | `fn(&Record, &mut Out)`, `out.emit(..)` any number |
//! | `aggregate!(f, flush = g)` | like `expand!`, plus `g: fn(&mut Out)` on flush |
//!
//! Options, before the function (in this order, both optional):
//!
//! * `init = |cfg| -> Result<Params, i32> { .. },` runs once with the stage's config;
//!   `Err(code)` refuses the module at load time.  The function (and `flush`) then gets
//!   `&Params` as its first argument.
//! * `state = S,` per-series state snapshotted by the host (`S: Copy + Default`, plain
//!   numbers: the snapshot is its bytes).  The function gets `&mut S` (the state of the
//!   record's series) before the record; `flush` gets `&mut [S]` (indexed by series id).
//!
//! ```ignore
//! #[derive(Clone, Copy, Default)]
//! struct Last { value: f64, has: u32 }
//! struct P { band: f64 }
//! edgepipe_filter::filter!(
//!     init = |cfg| -> Result<P, i32> { Ok(P { band: cfg.f64("band", 0.5) }) },
//!     state = Last,
//!     |p: &P, s: &mut Last, r: &Record| { .. }
//! );
//! ```
//!
//! Helpers: [`config`] (the stage config, any time after init), [`Config::f64`] /
//! `i64` / `bool` / `str` / `f64_list` with keys `"min"` or `("range.", metric)`,
//! [`series_metric`] / [`series_device`], [`series_derive`], [`SeriesCache`]
//! (non-persistent per-series scratch), [`log`].  A panic traps (`unreachable`); the
//! host then applies the stage's `on_error`.
//!
//! Config declaration (checked by the host before `init`; filters/ABI.md "Config
//! declaration"): one [`config_decl!`] at the crate root, a key per line as
//! `"NAME": TYPE [, FIELD = VALUE]* , "description";` with TYPE one of `bool`, `int`,
//! `number`, `string`, `number_list`, `string_list` and FIELD one of `default`,
//! `minimum`, `maximum`, `exclusive_minimum`, `exclusive_maximum`, `enum` (`"a|b|c"`),
//! `min_items`, `max_items`, `nullable`; a NAME ending in `.*` is one key per suffix:
//!
//! ```ignore
//! edgepipe_filter::config_decl! {
//!     "band": number, default = 0.5, minimum = 0, "smallest reported change";
//!     "band.*": number, minimum = 0, "per-metric band";
//! }
//! ```
//!
//! Build: `edgepipe filter build my_filter.rs` (Debian: `apt-get install rustc
//! libstd-rust-dev-wasm32`), or a cargo `cdylib` crate depending on this one, built with
//! `--target wasm32-unknown-unknown`.
#![no_std]

use core::cell::UnsafeCell;
use core::mem::size_of;

/// The ABI version this SDK implements (`ep_abi_version`).
pub const ABI_VERSION: i32 = 1;

pub const FLAG_ANOMALY: u32 = 1 << 0;
pub const FLAG_SPIKE: u32 = 1 << 1;
pub const FLAG_AGGREGATE: u32 = 1 << 2;
pub const FLAG_CALIBRATED: u32 = 1 << 3;

/// Guest error codes (`ep_process` returns `-code`, the host reports `guest_error_<code>`).
pub const ERR_NOMEM: i32 = 1;
pub const ERR_STATE: i32 = 2;
pub const ERR_USER: i32 = 100;

pub const LOG_DEBUG: u32 = 0;
pub const LOG_INFO: u32 = 1;
pub const LOG_WARN: u32 = 2;
pub const LOG_ERROR: u32 = 3;

/// One reading: 24 bytes, little-endian, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Record {
    /// ms since the Unix epoch
    pub ts: i64,
    pub value: f64,
    /// host-assigned series id
    pub series: u32,
    pub flags: u32,
}

const _: () = assert!(size_of::<Record>() == 24);

// ---- host imports ------------------------------------------------------------------

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "edgepipe")]
extern "C" {
    #[link_name = "series_name"]
    fn host_series_name(series: u32, kind: u32, buf: *mut u8, len: u32) -> i32;
    #[link_name = "series_derive"]
    fn host_series_derive(series: u32, suffix: *const u8, len: u32) -> u32;
    #[link_name = "log"]
    fn host_log(level: u32, msg: *const u8, len: u32);
}

// Off wasm (e.g. `cargo test` of an author's pure functions) there is no host.
#[cfg(not(target_arch = "wasm32"))]
unsafe fn host_series_name(_: u32, _: u32, _: *mut u8, _: u32) -> i32 {
    -1
}
#[cfg(not(target_arch = "wasm32"))]
unsafe fn host_series_derive(series: u32, _: *const u8, _: u32) -> u32 {
    series
}
#[cfg(not(target_arch = "wasm32"))]
unsafe fn host_log(_: u32, _: *const u8, _: u32) {}

/// Log a message through the host (rate-limited, truncated to 1 KiB).
pub fn log(level: u32, msg: &str) {
    unsafe { host_log(level, msg.as_ptr(), msg.len() as u32) }
}

fn series_name(series: u32, kind: u32, buf: &mut [u8]) -> Option<&str> {
    let n = unsafe { host_series_name(series, kind, buf.as_mut_ptr(), buf.len() as u32) };
    if n < 0 {
        return None;
    }
    let mut m = (n as usize).min(buf.len());
    // a truncated name may end inside a UTF-8 sequence
    loop {
        if let Ok(s) = core::str::from_utf8(&buf[..m]) {
            return Some(s);
        }
        m -= 1;
    }
}

/// The metric name of `series` (truncated to `buf`), `None` for an unknown id.
pub fn series_metric(series: u32, buf: &mut [u8]) -> Option<&str> {
    series_name(series, 1, buf)
}

/// The device name of `series` (truncated to `buf`), `None` for an unknown id.
pub fn series_device(series: u32, buf: &mut [u8]) -> Option<&str> {
    series_name(series, 0, buf)
}

/// The series with the same device/tags whose metric is `series`'s + `suffix`
/// (created on demand), e.g. `series_derive(r.series, "_mean")`.
pub fn series_derive(series: u32, suffix: &str) -> u32 {
    unsafe { host_series_derive(series, suffix.as_ptr(), suffix.len() as u32) }
}

// ---- memory: a bump allocator over linear memory; buffers only ever grow ---------------

/// Single-threaded global (wasm32 filters have no threads).
#[doc(hidden)]
pub struct Global<T>(UnsafeCell<T>);
unsafe impl<T> Sync for Global<T> {}
impl<T> Global<T> {
    pub const fn new(v: T) -> Self {
        Global(UnsafeCell::new(v))
    }
    #[inline(always)]
    pub fn ptr(&self) -> *mut T {
        self.0.get()
    }
}

#[cfg(target_arch = "wasm32")]
static BRK: Global<usize> = Global::new(0);

#[cfg(target_arch = "wasm32")]
fn sbrk(n: usize) -> usize {
    extern "C" {
        static __heap_base: u8;
    }
    unsafe {
        let brk = &mut *BRK.ptr();
        if *brk == 0 {
            *brk = (&__heap_base as *const u8 as usize + 15) & !15;
        }
        let start = *brk;
        let end = match start.checked_add(n).and_then(|e| e.checked_add(15)) {
            Some(e) => e & !15,
            None => return 0,
        };
        let have = core::arch::wasm32::memory_size(0) * 65536;
        if end > have {
            let pages = (end - have + 65535) / 65536;
            if core::arch::wasm32::memory_grow(0, pages) == usize::MAX {
                return 0;
            }
        }
        *brk = end;
        start
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn sbrk(_: usize) -> usize {
    0
}

#[doc(hidden)]
#[derive(Clone, Copy)]
pub struct Buf {
    p: usize,
    cap: usize,
}

impl Buf {
    pub const fn new() -> Self {
        Buf { p: 0, cap: 0 }
    }
    /// room for `bytes`, keeping the first `keep` bytes; 0 on failure
    fn reserve(&mut self, bytes: usize, keep: usize) -> usize {
        if bytes <= self.cap {
            return self.p;
        }
        let mut cap = if self.cap == 0 { 4096 } else { self.cap };
        while cap < bytes {
            if cap > 0x7fff_ffff {
                return 0;
            }
            cap *= 2;
        }
        let p = sbrk(cap);
        if p == 0 {
            return 0;
        }
        if keep > 0 && self.p != 0 {
            unsafe { core::ptr::copy_nonoverlapping(self.p as *const u8, p as *mut u8, keep) };
        }
        self.p = p;
        self.cap = cap;
        p
    }
}

// ---- config: "key=value\n" lines (the stage's YAML mapping flattened by the host) ------

/// A config key: `"min"`, or a prefix and a name, `("range.", metric)`.
pub trait Key {
    /// the value of the line `key=value` in `cfg`, if any
    fn find<'a>(&self, cfg: &'a [u8]) -> Option<&'a [u8]>;
}

fn find_parts<'a>(cfg: &'a [u8], a: &[u8], b: &[u8]) -> Option<&'a [u8]> {
    let klen = a.len() + b.len();
    for line in cfg.split(|&c| c == b'\n') {
        if line.len() > klen
            && line[klen] == b'='
            && &line[..a.len()] == a
            && &line[a.len()..klen] == b
        {
            return Some(&line[klen + 1..]);
        }
    }
    None
}

impl Key for &str {
    fn find<'a>(&self, cfg: &'a [u8]) -> Option<&'a [u8]> {
        find_parts(cfg, self.as_bytes(), b"")
    }
}

impl Key for (&str, &str) {
    fn find<'a>(&self, cfg: &'a [u8]) -> Option<&'a [u8]> {
        find_parts(cfg, self.0.as_bytes(), self.1.as_bytes())
    }
}

/// The stage's `config:` (see ABI.md, "Config text").
#[derive(Clone, Copy)]
pub struct Config<'a> {
    text: &'a [u8],
}

impl<'a> Config<'a> {
    /// A config from its `key=value\n` text.
    pub fn new(text: &'a [u8]) -> Self {
        Config { text }
    }
    /// The raw text of `key`'s value, `None` if absent.
    pub fn get<K: Key>(&self, key: K) -> Option<&'a str> {
        key.find(self.text).and_then(|v| core::str::from_utf8(v).ok())
    }
    /// `key` as a number, `dflt` if absent or not a number.
    pub fn f64<K: Key>(&self, key: K, dflt: f64) -> f64 {
        self.get(key).and_then(|v| parse_f64(v.as_bytes())).unwrap_or(dflt)
    }
    /// `key` as an integer (a number truncated toward zero), `dflt` if absent.
    pub fn i64<K: Key>(&self, key: K, dflt: i64) -> i64 {
        self.f64(key, dflt as f64) as i64
    }
    /// `true` / `false` / `1` / `0`, `dflt` if absent or anything else.
    pub fn bool<K: Key>(&self, key: K, dflt: bool) -> bool {
        match self.get(key) {
            Some("true") | Some("1") => true,
            Some("false") | Some("0") => false,
            _ => dflt,
        }
    }
    /// `key`'s value as text (`None` if absent); the same as [`Config::get`].
    pub fn str<K: Key>(&self, key: K) -> Option<&'a str> {
        self.get(key)
    }
    /// A comma-separated list of numbers (`"0,50"`) into `out`; how many were parsed
    /// (stops at the first that is not a number), `None` if absent.
    pub fn f64_list<K: Key>(&self, key: K, out: &mut [f64]) -> Option<usize> {
        let v = self.get(key)?;
        let mut n = 0;
        for item in v.as_bytes().split(|&c| c == b',') {
            if n == out.len() {
                break;
            }
            match parse_f64(item) {
                Some(x) => out[n] = x,
                None => break,
            }
            n += 1;
        }
        Some(n)
    }
}

static POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// A decimal number, as the C SDK's `ep_parse_f64` parses it (exactly rounded for up to
/// 15 significant digits and |exponent| <= 22; `inf`; surrounding blanks allowed).
pub fn parse_f64(s: &[u8]) -> Option<f64> {
    let mut i = 0;
    let mut len = s.len();
    while i < len && (s[i] == b' ' || s[i] == b'\t') {
        i += 1;
    }
    while len > i && matches!(s[len - 1], b' ' | b'\t' | b'\r') {
        len -= 1;
    }
    let mut neg = false;
    if i < len && (s[i] == b'-' || s[i] == b'+') {
        neg = s[i] == b'-';
        i += 1;
    }
    if len - i == 3 && s[i..len].eq_ignore_ascii_case(b"inf") {
        return Some(if neg { f64::NEG_INFINITY } else { f64::INFINITY });
    }
    let (mut mant, mut exp10, mut any) = (0u64, 0i32, false);
    while i < len && s[i].is_ascii_digit() {
        if mant < 100_000_000_000_000_000 {
            mant = mant * 10 + (s[i] - b'0') as u64;
        } else {
            exp10 += 1;
        }
        i += 1;
        any = true;
    }
    if i < len && s[i] == b'.' {
        i += 1;
        while i < len && s[i].is_ascii_digit() {
            if mant < 100_000_000_000_000_000 {
                mant = mant * 10 + (s[i] - b'0') as u64;
                exp10 -= 1;
            }
            i += 1;
            any = true;
        }
    }
    if !any {
        return None;
    }
    if i < len && (s[i] == b'e' || s[i] == b'E') {
        i += 1;
        let (mut eneg, mut e, mut edig) = (false, 0i32, false);
        if i < len && (s[i] == b'-' || s[i] == b'+') {
            eneg = s[i] == b'-';
            i += 1;
        }
        while i < len && s[i].is_ascii_digit() {
            if e < 10000 {
                e = e * 10 + (s[i] - b'0') as i32;
            }
            i += 1;
            edig = true;
        }
        if !edig {
            return None;
        }
        exp10 += if eneg { -e } else { e };
    }
    if i != len {
        return None;
    }
    let mut v = mant as f64;
    while exp10 > 22 {
        v *= 1e22;
        exp10 -= 22;
    }
    while exp10 < -22 {
        v /= 1e22;
        exp10 += 22;
    }
    v = if exp10 >= 0 { v * POW10[exp10 as usize] } else { v / POW10[(-exp10) as usize] };
    Some(if neg { -v } else { v })
}

static CFG: Global<(Buf, usize)> = Global::new((Buf::new(), 0));

/// The stage's config (empty before `ep_init`).
pub fn config() -> Config<'static> {
    unsafe {
        let (buf, len) = *CFG.ptr();
        if len == 0 {
            return Config { text: b"" };
        }
        Config { text: core::slice::from_raw_parts(buf.p as *const u8, len) }
    }
}

// ---- per-series scratch ----------------------------------------------------------------

/// Non-persistent per-series values (e.g. config looked up by metric name), indexed by
/// the dense series ids:
///
/// ```ignore
/// static BAND: SeriesCache<f64> = SeriesCache::new();
/// let band = BAND.get_or_insert_with(r.series, |sid| ...).unwrap_or(dflt);
/// ```
pub struct SeriesCache<T: Copy> {
    inner: Global<(Buf, usize)>,
    _t: core::marker::PhantomData<T>,
}

unsafe impl<T: Copy> Sync for SeriesCache<T> {}

impl<T: Copy + 'static> SeriesCache<T> {
    pub const fn new() -> Self {
        SeriesCache { inner: Global::new((Buf::new(), 0)), _t: core::marker::PhantomData }
    }
    /// The value for `series`, computed by `f` on first use; `None` if out of memory.
    pub fn get_or_insert_with(&self, series: u32, f: impl FnOnce(u32) -> T) -> Option<T> {
        let sid = series as usize;
        unsafe {
            let (buf, count) = *self.inner.ptr();
            let slots = buf.p as *mut Option<T>;
            if sid < count {
                if let Some(v) = *slots.add(sid) {
                    return Some(v);
                }
            }
            let v = f(series); // may use this cache itself: no borrow is held
            let (buf, count) = &mut *self.inner.ptr();
            let slots = table_slot::<Option<T>>(buf, count, 0, sid, None)?;
            *slots = Some(v);
            Some(v)
        }
    }
}

/// A slot of a table of `T` starting at `off` bytes into `buf` with `*count` slots in use;
/// new slots get `fill`.
unsafe fn table_slot<T: Copy + 'static>(
    buf: &mut Buf,
    count: &mut usize,
    off: usize,
    sid: usize,
    fill: T,
) -> Option<&'static mut T> {
    let size = size_of::<T>();
    if sid >= *count {
        if sid >= 0x7fff_ffff / size.max(1) {
            return None;
        }
        let used = if *count == 0 && buf.p == 0 { 0 } else { off + *count * size };
        if buf.reserve(off + (sid + 1) * size, used) == 0 {
            return None;
        }
        let slots = (buf.p + off) as *mut T;
        for i in *count..=sid {
            slots.add(i).write(fill);
        }
        *count = sid + 1;
    }
    Some(&mut *((buf.p + off) as *mut T).add(sid))
}

// ---- the runtime behind the macros (not part of the API) --------------------------------

#[doc(hidden)]
pub mod __rt {
    use super::*;

    pub use super::Global;

    /// `text` as a byte array (a `#[link_section]` static needs an array, not a slice)
    pub const fn text_bytes<const N: usize>(text: &str) -> [u8; N] {
        let b = text.as_bytes();
        let mut out = [0u8; N];
        let mut i = 0;
        while i < N {
            out[i] = b[i];
            i += 1;
        }
        out
    }

    static IN: Global<Buf> = Global::new(Buf::new());
    static SCRATCH: Global<Buf> = Global::new(Buf::new());
    static OUT: Global<Out> = Global::new(Out { buf: Buf::new(), n: 0, failed: false });
    static STATE: Global<(Buf, usize)> = Global::new((Buf::new(), 0));

    const STATE_MAGIC: u32 = 0x3153_5045; // "EPS1"
    const HDR: usize = 16;

    #[inline(always)]
    fn result(ptr: usize, n: usize) -> i64 {
        (((ptr as u64) << 32) | n as u64) as i64
    }

    pub fn input(n: u32) -> u32 {
        if n as usize > 0x7fff_ffff / size_of::<Record>() {
            return 0;
        }
        unsafe { (*IN.ptr()).reserve(n as usize * size_of::<Record>(), 0) as u32 }
    }

    pub fn alloc(len: u32) -> u32 {
        unsafe { (*SCRATCH.ptr()).reserve((len as usize).max(1), 0) as u32 }
    }

    /// copy the config text; 0 or -ERR_NOMEM
    pub fn load_config(ptr: u32, len: u32) -> i32 {
        unsafe {
            let cfg = &mut *CFG.ptr();
            if len > 0 {
                if cfg.0.reserve(len as usize, 0) == 0 {
                    return -ERR_NOMEM;
                }
                core::ptr::copy_nonoverlapping(ptr as *const u8, cfg.0.p as *mut u8, len as usize);
            }
            cfg.1 = len as usize;
        }
        0
    }

    pub fn init<P>(ptr: u32, len: u32, params: &Global<Option<P>>, f: fn(Config<'static>) -> Result<P, i32>) -> i32 {
        let rc = load_config(ptr, len);
        if rc != 0 {
            return rc;
        }
        match f(config()) {
            Ok(p) => {
                unsafe { *params.ptr() = Some(p) };
                0
            }
            Err(0) => -ERR_USER,
            Err(code) => code,
        }
    }

    #[inline(always)]
    pub fn params<P>(g: &'static Global<Option<P>>) -> Option<&'static P> {
        unsafe { (*g.ptr()).as_ref() }
    }

    /// the state of `sid` (a `S::default()` on first use); `None` if out of memory
    #[inline(always)]
    pub fn state<S: Copy + Default + 'static>(sid: u32) -> Option<&'static mut S> {
        if size_of::<S>() == 0 {
            return Some(unsafe { &mut *core::ptr::NonNull::<S>::dangling().as_ptr() });
        }
        unsafe {
            let (buf, count) = &mut *STATE.ptr();
            if (sid as usize) < *count {
                return Some(&mut *((buf.p + HDR) as *mut S).add(sid as usize));
            }
            let s = table_slot::<S>(buf, count, HDR, sid as usize, S::default())?;
            let h = buf.p as *mut u32;
            *h = STATE_MAGIC;
            *h.add(1) = size_of::<S>() as u32;
            *h.add(2) = *count as u32;
            *h.add(3) = 0;
            Some(s)
        }
    }

    pub fn states<S: Copy + Default + 'static>() -> &'static mut [S] {
        unsafe {
            let (buf, count) = *STATE.ptr();
            if size_of::<S>() == 0 || count == 0 {
                return &mut [];
            }
            core::slice::from_raw_parts_mut((buf.p + HDR) as *mut S, count)
        }
    }

    pub fn snapshot<S>() -> i64 {
        unsafe {
            let (buf, count) = *STATE.ptr();
            if count == 0 {
                return 0;
            }
            result(buf.p, HDR + count * size_of::<S>())
        }
    }

    pub fn restore<S: Copy + Default + 'static>(ptr: u32, len: u32) -> i32 {
        if len == 0 {
            return 0;
        }
        let size = size_of::<S>();
        let len = len as usize;
        unsafe {
            let h = ptr as *const u32;
            if len < HDR || h.read_unaligned() != STATE_MAGIC || h.add(1).read_unaligned() as usize != size {
                return -ERR_STATE;
            }
            let n = h.add(2).read_unaligned() as usize;
            if n.checked_mul(size).and_then(|b| b.checked_add(HDR)) != Some(len) {
                return -ERR_STATE;
            }
            let (buf, count) = &mut *STATE.ptr();
            *count = 0;
            if n > 0 && state::<S>((n - 1) as u32).is_none() {
                return -ERR_NOMEM;
            }
            core::ptr::copy_nonoverlapping(ptr as *const u8, buf.p as *mut u8, len);
        }
        0
    }

    #[inline(always)]
    fn records(n: u32) -> &'static mut [Record] {
        unsafe {
            let p = (*IN.ptr()).p;
            if n == 0 || p == 0 {
                return &mut [];
            }
            core::slice::from_raw_parts_mut(p as *mut Record, n as usize)
        }
    }

    #[inline(always)]
    pub fn run_filter<S: Copy + Default + 'static>(n: u32, mut f: impl FnMut(&mut S, &mut Record) -> bool) -> i64 {
        let recs = records(n);
        let mut k = 0;
        for i in 0..recs.len() {
            let mut r = recs[i];
            let s = match state::<S>(r.series) {
                Some(s) => s,
                None => return -(ERR_NOMEM as i64),
            };
            if f(s, &mut r) {
                recs[k] = r;
                k += 1;
            }
        }
        result(recs.as_ptr() as usize, k)
    }

    #[inline(always)]
    pub fn run_map<S: Copy + Default + 'static>(n: u32, mut f: impl FnMut(&mut S, &mut Record)) -> i64 {
        let recs = records(n);
        for r in recs.iter_mut() {
            let s = match state::<S>(r.series) {
                Some(s) => s,
                None => return -(ERR_NOMEM as i64),
            };
            f(s, r);
        }
        result(recs.as_ptr() as usize, recs.len())
    }

    #[inline(always)]
    pub fn run_expand<S: Copy + Default + 'static>(n: u32, mut f: impl FnMut(&mut S, &Record, &mut Out)) -> i64 {
        let recs = records(n);
        let out = unsafe { &mut *OUT.ptr() };
        out.n = 0;
        out.failed = false;
        for r in recs.iter() {
            let s = match state::<S>(r.series) {
                Some(s) => s,
                None => return -(ERR_NOMEM as i64),
            };
            f(s, r, out);
            if out.failed {
                break;
            }
        }
        out.finish()
    }

    pub fn run_flush(f: impl FnOnce(&mut Out)) -> i64 {
        let out = unsafe { &mut *OUT.ptr() };
        out.n = 0;
        out.failed = false;
        f(out);
        out.finish()
    }

    impl Out {
        fn finish(&self) -> i64 {
            if self.failed {
                return -(ERR_NOMEM as i64);
            }
            result(self.buf.p, self.n)
        }
    }

    pub fn nomem() -> i64 {
        -(ERR_NOMEM as i64)
    }

    #[cfg(all(target_arch = "wasm32", not(test)))]
    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        core::arch::wasm32::unreachable()
    }
}

/// Output of `expand!` / `aggregate!`.
pub struct Out {
    buf: Buf,
    n: usize,
    failed: bool,
}

impl Out {
    /// Append a record (a failed allocation fails the batch with `ERR_NOMEM`).
    pub fn emit(&mut self, ts: i64, value: f64, series: u32, flags: u32) {
        self.push(Record { ts, value, series, flags });
    }
    /// Append a copy of `r`.
    pub fn push(&mut self, r: Record) {
        let rs = size_of::<Record>();
        if self.failed || self.buf.reserve((self.n + 1) * rs, self.n * rs) == 0 {
            self.failed = true;
            return;
        }
        unsafe { (self.buf.p as *mut Record).add(self.n).write(r) };
        self.n += 1;
    }
    /// Records emitted so far in this call.
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

// ---- config declaration -----------------------------------------------------------------

/// Declare the config the filter accepts: JSON lines in the custom section
/// `edgepipe.config` (see the crate documentation for the syntax).
#[macro_export]
macro_rules! config_decl {
    ($($name:literal : $ty:ident $(, $field:ident = $val:literal)* , $desc:literal);* $(;)?) => {
        const __EP_CONFIG_TEXT: &str = concat!(
            "{\"edgepipe.config\":1}\n",
            $(
                "{\"name\":\"", $name, "\",\"type\":\"", stringify!($ty), "\"",
                $(",\"", stringify!($field), "\":", stringify!($val),)*
                ",\"description\":\"", $desc, "\"}\n",
            )*
        );
        #[link_section = "edgepipe.config"]
        #[used]
        static __EP_CONFIG_DECL: [u8; __EP_CONFIG_TEXT.len()] =
            $crate::__rt::text_bytes(__EP_CONFIG_TEXT);
    };
}

// ---- the kind macros --------------------------------------------------------------------

/// `filter!([init = |cfg| -> Result<P, i32> {..},] [state = S,] f)` with
/// `f: fn([&P,] [&mut S,] &Record) -> bool`: keep (true) or drop the record.
#[macro_export]
macro_rules! filter {
    ($($t:tt)*) => { $crate::__ep_opts!(filter; []; []; $($t)*); };
}

/// `map!([init = ..,] [state = S,] f)` with `f: fn([&P,] [&mut S,] &mut Record)`.
#[macro_export]
macro_rules! map {
    ($($t:tt)*) => { $crate::__ep_opts!(map; []; []; $($t)*); };
}

/// `filter_map!([init = ..,] [state = S,] f)` with
/// `f: fn([&P,] [&mut S,] &mut Record) -> bool`.
#[macro_export]
macro_rules! filter_map {
    ($($t:tt)*) => { $crate::__ep_opts!(filter_map; []; []; $($t)*); };
}

/// `expand!([init = ..,] [state = S,] f)` with `f: fn([&P,] [&mut S,] &Record, &mut Out)`.
#[macro_export]
macro_rules! expand {
    ($($t:tt)*) => { $crate::__ep_opts!(expand; []; []; $($t)*); };
}

/// `aggregate!([init = ..,] [state = S,] f, flush = g)`: `f` as in `expand!`,
/// `g: fn([&P,] [&mut [S],] &mut Out)` runs at shutdown and before a chain swap.
#[macro_export]
macro_rules! aggregate {
    ($($t:tt)*) => { $crate::__ep_opts!(aggregate; []; []; $($t)*); };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __ep_opts {
    ($k:ident; []; []; init = |$c:ident $(: $ct:ty)?| -> Result<$P:ty, i32> $b:block, $($rest:tt)*) => {
        $crate::__ep_opts!($k; [$P; $c; $b]; []; $($rest)*);
    };
    ($k:ident; $i:tt; []; state = $S:ty, $($rest:tt)*) => {
        $crate::__ep_opts!($k; $i; [$S]; $($rest)*);
    };
    ($k:ident; $i:tt; $s:tt; $f:expr, flush = $g:expr $(,)?) => {
        $crate::__ep_common!($i; $s);
        $crate::__ep_process!($k; $i; $s; $f);
        $crate::__ep_flush!($i; $s; $g);
    };
    ($k:ident; $i:tt; $s:tt; $f:expr $(,)?) => {
        $crate::__ep_common!($i; $s);
        $crate::__ep_process!($k; $i; $s; $f);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __ep_common {
    ($i:tt; $s:tt) => {
        #[no_mangle]
        pub extern "C" fn ep_abi_version() -> i32 {
            $crate::ABI_VERSION
        }
        #[no_mangle]
        pub extern "C" fn ep_input(n: u32) -> u32 {
            $crate::__rt::input(n)
        }
        #[no_mangle]
        pub extern "C" fn ep_alloc(len: u32) -> u32 {
            $crate::__rt::alloc(len)
        }
        $crate::__ep_init!($i);
        $crate::__ep_state!($s);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __ep_init {
    ([]) => {
        #[no_mangle]
        pub extern "C" fn ep_init(ptr: u32, len: u32) -> i32 {
            $crate::__rt::load_config(ptr, len)
        }
    };
    ([$P:ty; $c:ident; $b:block]) => {
        static __EP_PARAMS: $crate::__rt::Global<Option<$P>> = $crate::__rt::Global::new(None);
        #[no_mangle]
        pub extern "C" fn ep_init(ptr: u32, len: u32) -> i32 {
            fn user($c: $crate::Config<'static>) -> Result<$P, i32> $b
            $crate::__rt::init(ptr, len, &__EP_PARAMS, user)
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __ep_state {
    ([]) => {};
    ([$S:ty]) => {
        #[no_mangle]
        pub extern "C" fn ep_snapshot() -> i64 {
            $crate::__rt::snapshot::<$S>()
        }
        #[no_mangle]
        pub extern "C" fn ep_restore(ptr: u32, len: u32) -> i32 {
            $crate::__rt::restore::<$S>(ptr, len)
        }
    };
}

/// `let p = <params>;` (`&P`, or a batch failure if init did not run)
#[doc(hidden)]
#[macro_export]
macro_rules! __ep_params {
    ([]) => {
        ()
    };
    ([$P:ty; $c:ident; $b:block]) => {
        match $crate::__rt::params(&__EP_PARAMS) {
            Some(p) => p,
            None => return $crate::__rt::nomem(),
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __ep_state_ty {
    ([]) => { () };
    ([$S:ty]) => { $S };
}

/// the user's function as a fn pointer of the kind's signature, then the call
#[doc(hidden)]
#[macro_export]
macro_rules! __ep_process {
    (filter; $i:tt; $s:tt; $f:expr) => {
        $crate::__ep_process!(@run run_filter; $i; $s; $f; (r: &$crate::Record) -> bool; (r: &mut $crate::Record) -> bool);
    };
    (filter_map; $i:tt; $s:tt; $f:expr) => {
        $crate::__ep_process!(@run run_filter; $i; $s; $f; (r: &mut $crate::Record) -> bool; (r: &mut $crate::Record) -> bool);
    };
    (map; $i:tt; $s:tt; $f:expr) => {
        $crate::__ep_process!(@run run_map; $i; $s; $f; (r: &mut $crate::Record) -> (); (r: &mut $crate::Record) -> ());
    };
    (expand; $i:tt; $s:tt; $f:expr) => {
        $crate::__ep_process!(@run run_expand; $i; $s; $f; (r: &$crate::Record, o: &mut $crate::Out) -> (); (r: &$crate::Record, o: &mut $crate::Out) -> ());
    };
    (aggregate; $i:tt; $s:tt; $f:expr) => {
        $crate::__ep_process!(expand; $i; $s; $f);
    };
    (@run $run:ident; [$($i:tt)*]; $s:tt; $f:expr; ($($a:ident: $at:ty),*) -> $ret:ty; ($($b:ident: $bt:ty),*) -> $bret:ty) => {
        #[no_mangle]
        pub extern "C" fn ep_process(n: u32) -> i64 {
            let p = $crate::__ep_params!([$($i)*]);
            $crate::__ep_call!(p; [$($i)*]; $s; $f; ($($a: $at),*) -> $ret; user);
            $crate::__rt::$run::<$crate::__ep_state_ty!($s)>(n, |_s, $($b: $bt),*| -> $bret { user(p, _s, $($b),*) })
        }
    };
}

/// `let user = |p, s, args| ...` calling the author's function with the arguments it takes
#[doc(hidden)]
#[macro_export]
macro_rules! __ep_call {
    ($p:ident; []; []; $f:expr; ($($a:ident: $at:ty),*) -> $ret:ty; $user:ident) => {
        let uf: fn($($at),*) -> $ret = $f;
        let $user = |_: (), _: &mut (), $($a: $at),*| -> $ret { uf($($a),*) };
    };
    ($p:ident; [$P:ty; $c:ident; $b:block]; []; $f:expr; ($($a:ident: $at:ty),*) -> $ret:ty; $user:ident) => {
        let uf: fn(&$P, $($at),*) -> $ret = $f;
        let $user = |p: &$P, _: &mut (), $($a: $at),*| -> $ret { uf(p, $($a),*) };
    };
    ($p:ident; []; [$S:ty]; $f:expr; ($($a:ident: $at:ty),*) -> $ret:ty; $user:ident) => {
        let uf: fn(&mut $S, $($at),*) -> $ret = $f;
        let $user = |_: (), s: &mut $S, $($a: $at),*| -> $ret { uf(s, $($a),*) };
    };
    ($p:ident; [$P:ty; $c:ident; $b:block]; [$S:ty]; $f:expr; ($($a:ident: $at:ty),*) -> $ret:ty; $user:ident) => {
        let uf: fn(&$P, &mut $S, $($at),*) -> $ret = $f;
        let $user = |p: &$P, s: &mut $S, $($a: $at),*| -> $ret { uf(p, s, $($a),*) };
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __ep_flush {
    ([]; []; $g:expr) => {
        #[no_mangle]
        pub extern "C" fn ep_flush() -> i64 {
            let g: fn(&mut $crate::Out) = $g;
            $crate::__rt::run_flush(|o| g(o))
        }
    };
    ([$P:ty; $c:ident; $b:block]; []; $g:expr) => {
        #[no_mangle]
        pub extern "C" fn ep_flush() -> i64 {
            let p = $crate::__ep_params!([$P; $c; $b]);
            let g: fn(&$P, &mut $crate::Out) = $g;
            $crate::__rt::run_flush(|o| g(p, o))
        }
    };
    ([]; [$S:ty]; $g:expr) => {
        #[no_mangle]
        pub extern "C" fn ep_flush() -> i64 {
            let g: fn(&mut [$S], &mut $crate::Out) = $g;
            $crate::__rt::run_flush(|o| g($crate::__rt::states::<$S>(), o))
        }
    };
    ([$P:ty; $c:ident; $b:block]; [$S:ty]; $g:expr) => {
        #[no_mangle]
        pub extern "C" fn ep_flush() -> i64 {
            let p = $crate::__ep_params!([$P; $c; $b]);
            let g: fn(&$P, &mut [$S], &mut $crate::Out) = $g;
            $crate::__rt::run_flush(|o| g(p, $crate::__rt::states::<$S>(), o))
        }
    };
}
