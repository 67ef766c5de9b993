//! dedup: drop a reading whose (series, ts) was already seen among the last 8
//! timestamps of its series (QoS 1 redelivery, retransmitting sensors).  Written in Zig
//! to exercise the Zig SDK.
//! config: none.  kind: filter; stateful (recent timestamps per series)
const ep = @import("edgepipe");

const depth = 8;

const State = extern struct {
    ts: [depth]i64,
    used: u32,
    next: u32,
};

fn fresh(rec: *const ep.Record) bool {
    const s = ep.state(State, rec.series) orelse return true;
    for (s.ts[0..s.used]) |t| {
        if (t == rec.ts) return false;
    }
    s.ts[s.next] = rec.ts;
    s.next = (s.next + 1) % depth;
    if (s.used < depth) s.used += 1;
    return true;
}

comptime {
    ep.filter(fresh, .{ .State = State });
    asm (ep.configDecl(&.{})); // takes no configuration
}
