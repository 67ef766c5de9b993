//! edgepipe filter SDK for Zig (ABI v1, see filters/ABI.md).
//!
//! A filter author writes one function and exports it with one of the kind helpers:
//!
//!     const ep = @import("edgepipe");
//!     fn keep(rec: *const ep.Record) bool { return rec.value > 0; }
//!     comptime { ep.filter(keep, .{}); }
//!
//! Options (second argument, all optional):
//!     .init = fn () i32          runs after the config is loaded (non-zero refuses)
//!     .State = T                 per-series state snapshotted by the host:
//!                                `const s = ep.state(T, rec.series) orelse ...` (zeroed)
//! Kinds: filter(fn(*const Record) bool), map(fn(*Record) void),
//!        filterMap(fn(*Record) bool), expand(fn(*const Record, *Out) void),
//!        aggregate(fn(*const Record, *Out) void, flush: fn(*Out) void).
//! Config declaration (checked by the host before init; filters/ABI.md "Config
//! declaration"), at container level, numbers and defaults written as JSON text:
//!     comptime {
//!         asm (ep.configDecl(&.{
//!             .{ .name = "window_s", .type = .number, .default = "60", .exclusive_minimum = "0",
//!                .description = "window length in seconds" },
//!             .{ .name = "range.*", .type = .number_list, .items = 2 },
//!         }));
//!     }
//! `&.{}` declares that the filter takes no configuration.
//! Build: edgepipe filter build my_filter.zig   (or see filters/build.py)

pub const abi_version: i32 = 1;

// ---- config declaration: JSON lines in the custom section "edgepipe.config" -----------
pub const KeyType = enum { bool, int, number, string, number_list, string_list };

/// One declared config key; number and default fields hold JSON text ("60", "true",
/// "\"mean\""), `enum_values` is "a|b|c", `items` an exact list length.
pub const Key = struct {
    name: []const u8,
    type: KeyType,
    default: ?[]const u8 = null,
    minimum: ?[]const u8 = null,
    maximum: ?[]const u8 = null,
    exclusive_minimum: ?[]const u8 = null,
    exclusive_maximum: ?[]const u8 = null,
    enum_values: ?[]const u8 = null,
    items: ?[]const u8 = null,
    nullable: bool = false,
    description: []const u8 = "",
};

fn jsonField(comptime name: []const u8, comptime value: ?[]const u8) []const u8 {
    return if (value) |v| ",\"" ++ name ++ "\":" ++ v else "";
}

fn asmEscape(comptime text: []const u8) []const u8 {
    comptime var escaped: []const u8 = "";
    inline for (text) |c| {
        escaped = escaped ++ switch (c) {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            else => &[_]u8{c},
        };
    }
    return escaped;
}

/// The assembly that places the declaration of `keys` in the module (use with `asm`
/// in a container-level `comptime` block, see the top of this file).
pub fn configDecl(comptime keys: []const Key) []const u8 {
    comptime {
        @setEvalBranchQuota(100_000);
        var json: []const u8 = "{\"edgepipe.config\":1}\n";
        for (keys) |k| {
            json = json ++ "{\"name\":\"" ++ k.name ++ "\",\"type\":\"" ++ @tagName(k.type) ++ "\"" ++
                jsonField("default", k.default) ++ jsonField("minimum", k.minimum) ++
                jsonField("maximum", k.maximum) ++
                jsonField("exclusive_minimum", k.exclusive_minimum) ++
                jsonField("exclusive_maximum", k.exclusive_maximum) ++
                (if (k.enum_values) |e| ",\"enum\":\"" ++ e ++ "\"" else "") ++
                jsonField("min_items", k.items) ++ jsonField("max_items", k.items) ++
                (if (k.nullable) ",\"nullable\":true" else "") ++
                ",\"description\":\"" ++ k.description ++ "\"}\n";
        }
        return ".section .custom_section.edgepipe.config,\"\",@\n.ascii \"" ++ asmEscape(json) ++
            "\"\n.text\n";
    }
}

pub const Record = extern struct {
    ts: i64,
    value: f64,
    series: u32,
    flags: u32,
};

comptime {
    if (@sizeOf(Record) != 24) @compileError("Record must be 24 bytes");
}

pub const flag_anomaly: u32 = 1 << 0;
pub const flag_spike: u32 = 1 << 1;
pub const flag_aggregate: u32 = 1 << 2;
pub const flag_calibrated: u32 = 1 << 3;

pub const err_nomem: i64 = 1;
pub const err_state: i64 = 2;

// ---- host imports -------------------------------------------------------------
extern "edgepipe" fn series_name(series: u32, kind: u32, buf: [*]u8, len: u32) i32;
extern "edgepipe" fn series_derive(series: u32, suffix: [*]const u8, len: u32) u32;
extern "edgepipe" fn log(level: u32, msg: [*]const u8, len: u32) void;

pub fn logMessage(level: u32, msg: []const u8) void {
    log(level, msg.ptr, @intCast(msg.len));
}

/// The metric name of `series` (truncated to buf), or null for an unknown id.
pub fn seriesMetric(series: u32, buf: []u8) ?[]u8 {
    const n = series_name(series, 1, buf.ptr, @intCast(buf.len));
    if (n < 0) return null;
    return buf[0..@min(@as(usize, @intCast(n)), buf.len)];
}

pub fn seriesDevice(series: u32, buf: []u8) ?[]u8 {
    const n = series_name(series, 0, buf.ptr, @intCast(buf.len));
    if (n < 0) return null;
    return buf[0..@min(@as(usize, @intCast(n)), buf.len)];
}

pub fn seriesDerive(series: u32, suffix: []const u8) u32 {
    return series_derive(series, suffix.ptr, @intCast(suffix.len));
}

// ---- memory: bump allocation over linear memory; buffers only grow ---------------
extern var __heap_base: u8;
var brk: usize = 0;

fn sbrk(n: usize) ?[*]u8 {
    if (brk == 0) brk = (@intFromPtr(&__heap_base) + 15) & ~@as(usize, 15);
    const start = brk;
    const end = (start + n + 15) & ~@as(usize, 15);
    const have = @wasmMemorySize(0) * 65536;
    if (end > have) {
        const pages = (end - have + 65535) / 65536;
        if (@wasmMemoryGrow(0, pages) < 0) return null;
    }
    brk = end;
    return @ptrFromInt(start);
}

const Buf = struct {
    p: ?[*]u8 = null,
    cap: usize = 0,

    fn reserve(self: *Buf, bytes: usize, keep: usize) ?[*]u8 {
        if (bytes <= self.cap) return self.p;
        var cap: usize = if (self.cap == 0) 4096 else self.cap;
        while (cap < bytes) cap *= 2;
        const p = sbrk(cap) orelse return null;
        if (keep > 0) @memcpy(p[0..keep], self.p.?[0..keep]);
        self.p = p;
        self.cap = cap;
        return p;
    }
};

var in_buf: Buf = .{};
var scratch: Buf = .{};
var cfg_buf: Buf = .{};
var cfg_len: usize = 0;

fn result(ptr: ?[*]const u8, n: u32) i64 {
    const p: u64 = if (ptr) |q| @intFromPtr(q) else 0;
    return @bitCast((p << 32) | n);
}

fn inputRecords(n: u32) []Record {
    if (n == 0) return &[_]Record{};
    const p: [*]Record = @ptrCast(@alignCast(in_buf.p.?));
    return p[0..n];
}

// ---- config ---------------------------------------------------------------------
/// The value of `key` in the "key=value" config lines, or null.
pub fn configGet(key: []const u8) ?[]const u8 {
    if (cfg_len == 0) return null;
    const text = cfg_buf.p.?[0..cfg_len];
    var i: usize = 0;
    while (i < text.len) {
        var j = i;
        while (j < text.len and text[j] != '\n') j += 1;
        const line = text[i..j];
        if (line.len > key.len and line[key.len] == '=' and eql(line[0..key.len], key))
            return line[key.len + 1 ..];
        i = j + 1;
    }
    return null;
}

fn eql(a: []const u8, b: []const u8) bool {
    if (a.len != b.len) return false;
    for (a, b) |x, y| if (x != y) return false;
    return true;
}

pub fn configF64(key: []const u8, default: f64) f64 {
    const v = configGet(key) orelse return default;
    return parseF64(v) orelse default;
}

pub fn configBool(key: []const u8, default: bool) bool {
    const v = configGet(key) orelse return default;
    if (eql(v, "true") or eql(v, "1")) return true;
    if (eql(v, "false") or eql(v, "0")) return false;
    return default;
}

const pow10 = [_]f64{ 1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22 };

/// Decimal text to f64; exact for up to 15 significant digits and |exponent| <= 22
/// (the same algorithm as the C SDK's ep_parse_f64).
pub fn parseF64(text: []const u8) ?f64 {
    var s = text;
    while (s.len > 0 and (s[0] == ' ' or s[0] == '\t')) s = s[1..];
    while (s.len > 0 and (s[s.len - 1] == ' ' or s[s.len - 1] == '\t' or s[s.len - 1] == '\r')) s = s[0 .. s.len - 1];
    var neg = false;
    var i: usize = 0;
    if (i < s.len and (s[i] == '-' or s[i] == '+')) {
        neg = s[i] == '-';
        i += 1;
    }
    var mant: u64 = 0;
    var exp10: i32 = 0;
    var any = false;
    while (i < s.len and s[i] >= '0' and s[i] <= '9') : (i += 1) {
        any = true;
        if (mant < 100000000000000000) mant = mant * 10 + (s[i] - '0') else exp10 += 1;
    }
    if (i < s.len and s[i] == '.') {
        i += 1;
        while (i < s.len and s[i] >= '0' and s[i] <= '9') : (i += 1) {
            any = true;
            if (mant < 100000000000000000) {
                mant = mant * 10 + (s[i] - '0');
                exp10 -= 1;
            }
        }
    }
    if (!any) return null;
    if (i < s.len and (s[i] == 'e' or s[i] == 'E')) {
        i += 1;
        var eneg = false;
        var e: i32 = 0;
        var edig = false;
        if (i < s.len and (s[i] == '-' or s[i] == '+')) {
            eneg = s[i] == '-';
            i += 1;
        }
        while (i < s.len and s[i] >= '0' and s[i] <= '9') : (i += 1) {
            edig = true;
            if (e < 10000) e = e * 10 + @as(i32, s[i] - '0');
        }
        if (!edig) return null;
        exp10 += if (eneg) -e else e;
    }
    if (i != s.len) return null;
    var v: f64 = @floatFromInt(mant);
    while (exp10 > 22) : (exp10 -= 22) v *= 1e22;
    while (exp10 < -22) : (exp10 += 22) v /= 1e22;
    v = if (exp10 >= 0) v * pow10[@intCast(exp10)] else v / pow10[@intCast(-exp10)];
    return if (neg) -v else v;
}

// ---- per-series state (same blob layout as the C SDK: "EPS1", size, count, 0, slots) --
const state_magic: u32 = 0x31535045;
const Header = extern struct { magic: u32, size: u32, count: u32, reserved: u32 };

var state_buf: Buf = .{};

fn header() ?*Header {
    const p = state_buf.p orelse return null;
    return @ptrCast(@alignCast(p));
}

/// The state slot of `sid` (zeroed on first use), or null when memory is exhausted.
pub fn state(comptime T: type, sid: u32) ?*T {
    const size: u32 = @sizeOf(T);
    if (header()) |h| {
        if (sid < h.count) return @ptrCast(@alignCast(state_buf.p.? + @sizeOf(Header) + @as(usize, sid) * size));
    }
    const used: usize = if (header()) |h| @sizeOf(Header) + @as(usize, h.count) * size else 0;
    const need: usize = @sizeOf(Header) + (@as(usize, sid) + 1) * size;
    _ = state_buf.reserve(need, used) orelse return null;
    const h = header().?;
    if (used == 0) h.* = .{ .magic = state_magic, .size = size, .count = 0, .reserved = 0 };
    const from = @sizeOf(Header) + @as(usize, h.count) * size;
    @memset(state_buf.p.?[from..need], 0);
    h.count = sid + 1;
    return @ptrCast(@alignCast(state_buf.p.? + @sizeOf(Header) + @as(usize, sid) * size));
}

pub fn stateCount() u32 {
    return if (header()) |h| h.count else 0;
}

fn snapshotImpl() callconv(.c) i64 {
    const h = header() orelse return 0;
    if (h.count == 0) return 0;
    return result(state_buf.p, @sizeOf(Header) + h.count * h.size);
}

fn restoreFor(comptime T: type) fn (u32, u32) callconv(.c) i32 {
    return struct {
        fn restore(ptr: u32, len: u32) callconv(.c) i32 {
            if (len == 0) return 0;
            if (len < @sizeOf(Header)) return -2;
            const src: [*]const u8 = @ptrFromInt(ptr);
            const h: *align(1) const Header = @ptrCast(src);
            if (h.magic != state_magic or h.size != @sizeOf(T)) return -2;
            if (@as(usize, h.count) * @sizeOf(T) + @sizeOf(Header) != len) return -2;
            if (header()) |cur| cur.count = 0;
            if (h.count > 0 and state(T, h.count - 1) == null) return -1;
            @memcpy(state_buf.p.?[0..len], src[0..len]);
            return 0;
        }
    }.restore;
}

// ---- output for expand / aggregate ---------------------------------------------
pub const Out = struct {
    buf: Buf = .{},
    n: u32 = 0,
    failed: bool = false,

    pub fn emit(self: *Out, rec: Record) void {
        const need = (@as(usize, self.n) + 1) * @sizeOf(Record);
        _ = self.buf.reserve(need, @as(usize, self.n) * @sizeOf(Record)) orelse {
            self.failed = true;
            return;
        };
        const p: [*]Record = @ptrCast(@alignCast(self.buf.p.?));
        p[self.n] = rec;
        self.n += 1;
    }

    fn finish(self: *Out) i64 {
        if (self.failed) return -err_nomem;
        return result(self.buf.p, self.n);
    }
};

var out: Out = .{};

// ---- the common exports ---------------------------------------------------------
fn abiVersion() callconv(.c) i32 {
    return abi_version;
}

fn epInput(n: u32) callconv(.c) u32 {
    if (n > 0x7fffffff / @sizeOf(Record)) return 0;
    const p = in_buf.reserve(@as(usize, n) * @sizeOf(Record), 0) orelse return 0;
    return @intCast(@intFromPtr(p));
}

fn epAlloc(len: u32) callconv(.c) u32 {
    const p = scratch.reserve(@max(len, 1), 0) orelse return 0;
    return @intCast(@intFromPtr(p));
}

fn initWith(comptime opts: anytype) fn (u32, u32) callconv(.c) i32 {
    return struct {
        fn init(ptr: u32, len: u32) callconv(.c) i32 {
            if (len > 0) {
                const p = cfg_buf.reserve(len, 0) orelse return -1;
                const src: [*]const u8 = @ptrFromInt(ptr);
                @memcpy(p[0..len], src[0..len]);
            }
            cfg_len = len;
            if (@hasField(@TypeOf(opts), "init")) return opts.init();
            return 0;
        }
    }.init;
}

fn exportCommon(comptime opts: anytype) void {
    @export(&abiVersion, .{ .name = "ep_abi_version" });
    @export(&epInput, .{ .name = "ep_input" });
    @export(&epAlloc, .{ .name = "ep_alloc" });
    @export(&initWith(opts), .{ .name = "ep_init" });
    if (@hasField(@TypeOf(opts), "State")) {
        @export(&snapshotImpl, .{ .name = "ep_snapshot" });
        @export(&restoreFor(opts.State), .{ .name = "ep_restore" });
    }
}

// ---- kinds ------------------------------------------------------------------------
pub fn filter(comptime f: fn (*const Record) bool, comptime opts: anytype) void {
    // a filter is a filter-map that never changes the record
    const W = struct {
        fn keep(r: *Record) bool {
            return f(r);
        }
    };
    filterMap(W.keep, opts);
}

pub fn filterMap(comptime f: fn (*Record) bool, comptime opts: anytype) void {
    const S = struct {
        fn process(n: u32) callconv(.c) i64 {
            const recs = inputRecords(n);
            var k: u32 = 0;
            for (recs, 0..) |*r, i| {
                if (f(r)) {
                    if (k != i) recs[k] = r.*;
                    k += 1;
                }
            }
            return result(in_buf.p, k);
        }
    };
    exportCommon(opts);
    @export(&S.process, .{ .name = "ep_process" });
}

pub fn map(comptime f: fn (*Record) void, comptime opts: anytype) void {
    const S = struct {
        fn process(n: u32) callconv(.c) i64 {
            for (inputRecords(n)) |*r| f(r);
            return result(in_buf.p, n);
        }
    };
    exportCommon(opts);
    @export(&S.process, .{ .name = "ep_process" });
}

pub fn expand(comptime f: fn (*const Record, *Out) void, comptime opts: anytype) void {
    const S = struct {
        fn process(n: u32) callconv(.c) i64 {
            out.n = 0;
            out.failed = false;
            for (inputRecords(n)) |*r| {
                if (out.failed) break;
                f(r, &out);
            }
            return out.finish();
        }
    };
    exportCommon(opts);
    @export(&S.process, .{ .name = "ep_process" });
}

pub fn aggregate(
    comptime f: fn (*const Record, *Out) void,
    comptime flushFn: fn (*Out) void,
    comptime opts: anytype,
) void {
    expand(f, opts);
    const S = struct {
        fn flush() callconv(.c) i64 {
            out.n = 0;
            out.failed = false;
            flushFn(&out);
            return out.finish();
        }
    };
    @export(&S.flush, .{ .name = "ep_flush" });
}
