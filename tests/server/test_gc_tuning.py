"""The serving process's garbage-collector settings (server.serving)."""

from __future__ import annotations

import gc

from server import serving


def test_serve_collects_young_objects_less_often_and_freezes_its_start_up_heap():
    thresholds = gc.get_threshold()
    try:
        serving.tune_gc()
        assert gc.get_threshold() == serving.GC_THRESHOLDS
        assert serving.GC_THRESHOLDS[0] > thresholds[0]  # fewer young collections
        _young, middle, old = serving.GC_THRESHOLDS
        assert middle * old >= 200  # full collections no more often than every 200 young ones
        serving.freeze_heap()
        assert gc.get_freeze_count() > 0
        # A cycle made after the freeze is still collected.
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
