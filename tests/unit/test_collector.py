"""gateway.collector: start-up objects frozen, collections spaced out."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway import collector


@pytest.fixture
def restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored")
def test_settle_freezes_what_exists_and_spaces_out_collections() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    collector.settle()
    assert gc.get_freeze_count() > 1000  # this process's modules and objects
    assert gc.get_threshold() == (collector.YOUNG, collector.OLDER, collector.OLDER)
    assert gc.isenabled()  # cycles are still collected
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1
