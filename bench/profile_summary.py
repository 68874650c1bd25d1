#!/usr/bin/env python3
"""Summarise a py-spy raw (collapsed stacks) profile: the hottest functions.

    py-spy record --format raw --nonblocking --rate 200 --pid PID -o prof.txt
    python bench/profile_summary.py prof.txt [--top 25] [--thread MainThread]

Prints, in % of all sampled (non-idle) time, the functions with the most *self*
time (the frame on top of the stack) and the most *inclusive* time (anywhere
on the stack, counted once per sample). relay_bench.py --profile DIR writes one
such file per gateway cell.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)', keeping the repo-relative part."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("/work/main/", "site-packages/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--thread", help="only stacks whose first frame contains this (e.g. a thread name)")
    args = parser.parse_args()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    with open(args.profile, errors="replace") as f:
        for raw in f:
            m = _LINE.match(raw.rstrip("\n"))
            if not m:
                continue
            frames = m.group(1).split(";")
            count = int(m.group(2))
            if args.thread and args.thread not in frames[0]:
                continue
            total += count
            if frames and frames[0].startswith(("thread", "process")):
                threads[frames[0]] += count
                frames = frames[1:]
            if not frames:
                continue
            self_time[short(frames[-1])] += count
            for name in {short(fr) for fr in frames}:
                inclusive[name] += count
    if not total:
        print("no samples")
        return
    print(f"{total} samples")
    if threads:
        print("\nby thread:")
        for name, count in threads.most_common(8):
            print(f"  {100.0 * count / total:5.1f}%  {name}")
    print("\nself time (top of stack):")
    for name, count in self_time.most_common(args.top):
        print(f"  {100.0 * count / total:5.1f}%  {name}")
    print("\ninclusive time:")
    for name, count in inclusive.most_common(args.top):
        print(f"  {100.0 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
