#!/usr/bin/env python3
"""Where the allocations per heartbeat are made: two DHAT profiles of the bridge (a short and
a long run of `bench/alloc-per-heartbeat.sh`), compared site by site, divided by the
heartbeats the long run had more.

    dhat-sites.py SHORT/dhat.out LONG/dhat.out HEARTBEATS_SHORT HEARTBEATS_LONG [DEPTH]

A site is the first DEPTH frames (3 by default) of an allocation's stack that are not the
allocator's or the standard library's (`Vec::push`, `String::clone`, `fmt`, ...), so a
`to_string` is charged to the code that called it. Prints the sites with at least 0.05
allocations per heartbeat, most first: allocations, bytes, site.
"""
import json
import re
import sys
from collections import defaultdict

# Frames of the allocator and the standard library (`Vec::push`, `String::clone`, `fmt`, ...).
PLUMBING = re.compile(r"^malloc |^calloc |^realloc |\(library/|\(in /usr/|^UnknownInlinedFun|^\?\?\?")


def sites(path, depth):
    profile = json.load(open(path))
    frames = profile["ftbl"]
    total = defaultdict(lambda: [0, 0])
    for point in profile["pps"]:
        stack = [frames[i].split(": ", 1)[-1] for i in point["fs"]]
        ours = [f for f in stack if not PLUMBING.search(f)][:depth]
        key = " <- ".join(f[:110] for f in ours) or stack[0][:110]
        total[key][0] += point["tbk"]
        total[key][1] += point["tb"]
    return total


def main():
    short_path, long_path, hb_short, hb_long = sys.argv[1:5]
    depth = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    extra = float(hb_long) - float(hb_short)
    short, long_ = sites(short_path, depth), sites(long_path, depth)
    rows = []
    for key in set(short) | set(long_):
        s, l = short.get(key, [0, 0]), long_.get(key, [0, 0])
        rows.append(((l[0] - s[0]) / extra, (l[1] - s[1]) / extra, key))
    rows.sort(reverse=True)
    print(f"{sum(r[0] for r in rows):.1f} allocations, {sum(r[1] for r in rows):.0f} bytes per heartbeat, by site:")
    for blocks, size, key in rows:
        if blocks < 0.05:
            break
        print(f"{blocks:6.2f} {size:8.0f}  {key}")


if __name__ == "__main__":
    main()
