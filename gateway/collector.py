"""Python's cyclic garbage collector, set for a long-running server process.

With the defaults (a young collection every 700 new container objects, a full
one whenever the survivors grew by a quarter) a gateway spends much of its
time in the collector: every SMTP session makes hundreds of short-lived
objects (protocol, Deferreds, filter outcomes, DNS questions), and the caches
that outlive sessions (DNS answers, per-client counts) make full collections
walk an ever larger heap. Measured with perf on an SMTP worker serving the
pre-DATA filter chain: 16 % of its CPU in ``gc_collect_main`` and the
``visit_*`` functions (docs/benchmarks.rst).

`settle()` is called once start-up is over: what exists then (modules, the
configuration, list files, compiled rules) is moved out of the collector's
sight (`gc.freeze`), and collections run less often. Reference counting still
frees almost everything at once; only reference cycles wait for a collection,
and `YOUNG` objects more between collections is a few MB at most.
"""

from __future__ import annotations

import gc

YOUNG = 20_000  # container objects allocated (net) between young collections; Python's default: 700
OLDER = 20  # young collections between collections of the middle generation, and of those between full ones


def settle() -> None:
    """Freeze what start-up made and space out the collections."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, OLDER, OLDER)
