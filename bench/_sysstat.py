"""CPU and network accounting from /proc, to tell quiet runs from noisy ones.

``Snapshot`` takes /proc/stat totals, every process's CPU time and the TCP
listen-queue overflow counter. ``compare(before, after, ours)`` gives:

- ``cpu_busy_pct``: busy share of all CPUs (100 = every vCPU busy);
- ``iowait_pct``; ``steal_pct`` (time the hypervisor gave to other guests,
  counted as busy);
- ``foreign_cpu_pct``: CPU used by user-space processes outside our process
  trees, in % of all CPUs (the same scale as cpu_busy_pct). Kernel threads
  are excluded; processes that started and ended between the two snapshots
  are not seen;
- ``listen_overflows``: TcpExt ListenOverflows during the run;
- per named process (gateway, ...): its CPU (utime+stime, all threads, plus
  reaped children) in % of one CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
PF_KTHREAD = 0x00200000


@dataclass
class Proc:
    pid: int
    ppid: int
    kernel: bool
    cpu: float  # seconds, utime+stime of the process itself (all threads)
    child_cpu: float  # seconds, cutime+cstime: reaped children


def _read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2 :].split()
    # fields after "comm": state(0) ppid(1) ... flags(6) ... utime(11) stime(12) cutime(13) cstime(14)
    ppid = int(rest[1])
    flags = int(rest[6])
    cpu = (int(rest[11]) + int(rest[12])) / CLK_TCK
    child = (int(rest[13]) + int(rest[14])) / CLK_TCK
    return Proc(pid, ppid, bool(flags & PF_KTHREAD) or ppid == 2 or pid == 2, cpu, child)


def _cpu_totals() -> tuple[float, float, float, float]:
    """(busy, iowait, steal, total) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return float(busy), float(iowait), float(steal), float(busy + idle + iowait)


def _listen_overflows() -> int:
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


@dataclass
class Snapshot:
    busy: float = 0.0
    iowait: float = 0.0
    steal: float = 0.0
    total: float = 0.0
    procs: dict[int, Proc] = field(default_factory=dict)
    overflows: int = 0

    @classmethod
    def take(cls) -> Snapshot:
        procs = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                proc = _read_proc(int(name))
                if proc is not None:
                    procs[proc.pid] = proc
        busy, iowait, steal, total = _cpu_totals()
        return cls(busy, iowait, steal, total, procs, _listen_overflows())


def descendants(procs: dict[int, Proc], roots: set[int]) -> set[int]:
    """`roots` and every process below them."""
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found: set[int] = set()
    todo = [pid for pid in roots if pid in procs]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def compare(
    before: Snapshot, after: Snapshot, roots: set[int], named: dict[str, int] | None = None
) -> dict[str, float]:
    """The usage between two snapshots; `roots` are the tops of our process trees."""
    total = max(after.total - before.total, 1.0)
    ours = descendants(before.procs, roots) | descendants(after.procs, roots)
    foreign = 0.0
    for pid, proc in after.procs.items():
        if proc.kernel or pid in ours:
            continue
        old = before.procs.get(pid)
        foreign += proc.cpu - (old.cpu if old is not None else 0.0)
    wall_cpu_seconds = total / os.sysconf("SC_CLK_TCK")  # summed over CPUs
    result = {
        "cpu_busy_pct": round(100.0 * (after.busy - before.busy) / total, 1),
        "iowait_pct": round(100.0 * (after.iowait - before.iowait) / total, 1),
        "steal_pct": round(100.0 * (after.steal - before.steal) / total, 1),
        "foreign_cpu_pct": round(100.0 * max(foreign, 0.0) / wall_cpu_seconds, 1),
        "listen_overflows": after.overflows - before.overflows,
    }
    for name, pid in (named or {}).items():
        old, new = before.procs.get(pid), after.procs.get(pid)
        if new is None:
            continue
        used = new.cpu + new.child_cpu - ((old.cpu + old.child_cpu) if old is not None else 0.0)
        # in % of one CPU (100 = one core saturated)
        result[f"{name}_cpu_pct_1core"] = round(100.0 * used / (wall_cpu_seconds / NCPU), 1)
    return result


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB (0 if gone)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def worker_pids(parent: int) -> list[int]:
    """The SMTP worker processes of a gateway (its children running gateway.smtp.workers)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"gateway.smtp.workers" in command:
            found.append(int(name))
    return sorted(found)


def gateway_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a gateway: its main process and its SMTP workers summed, in KiB.

    The summed VmHWM is an upper bound of the peak of the sum.
    """
    total = {"VmRSS": 0, "VmHWM": 0}
    for each in (pid, *worker_pids(pid)):
        for key, value in proc_memory(each).items():
            total[key] += value
    return total


def gateway_fds(pid: int) -> int:
    """Open files of a gateway's main process and its SMTP workers."""
    return sum(open_fds(each) for each in (pid, *worker_pids(pid)))
