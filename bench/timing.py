"""Interleaved timing: every case of a measure runs once per round, in rotating order.

The machines are shared (2 cores, other people's tests running), so absolute
times drift. Within one round the cases run back to back, so a ratio of two
cases in the same round sees the same load; the reported ratio is the median
over rounds of those paired ratios. A warm-up round is run and dropped.

The garbage collector stays on during timed operations (the collections an
operation triggers are part of its cost) and collects before every sample, so
no operation pays for garbage another case left; ``run.py`` freezes the heap of
the base models (``gc.freeze``) so collections do not scan objects that belong
to no system.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Case:
    """One timed operation. ``setup``/``teardown`` run untimed around each sample.

    ``inner`` repeats ``op`` within one sample (for sub-millisecond operations);
    the sample is the mean over those repeats.
    """

    name: str
    op: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    teardown: Callable[[], Any] | None = None
    inner: int = 1


@dataclasses.dataclass
class Timings:
    samples: dict[str, list[float]]
    errors: dict[str, str]

    def median(self, name: str) -> float | None:
        values = self.samples.get(name) or []
        return statistics.median(values) if values else None

    def ratio(self, name: str, anchor: str) -> float | None:
        """Median over rounds of ``name / anchor`` in the same round."""
        pairs = self.pairs(name, anchor)
        return statistics.median(pairs) if pairs else None

    def ratio_of_minima(self, name: str, anchor: str) -> float | None:
        a, b = self.samples.get(name) or [], self.samples.get(anchor) or []
        return min(a) / min(b) if a and b and min(b) > 0 else None

    def pairs(self, name: str, anchor: str) -> list[float]:
        a, b = self.samples.get(name) or [], self.samples.get(anchor) or []
        return [x / y for x, y in zip(a, b) if y > 0]

    def spread(self, name: str, anchor: str) -> tuple[float, float] | None:
        """Interquartile range of the paired ratios (a noise indicator)."""
        pairs = sorted(self.pairs(name, anchor))
        if len(pairs) < 2:
            return None
        q = statistics.quantiles(pairs, n=4, method="inclusive")
        return q[0], q[2]


def interleaved(cases: list[Case], rounds: int, warmup: int = 1) -> Timings:
    """Run every case once per round, rotating the order; return samples in seconds."""
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    errors: dict[str, str] = {}
    live = list(cases)
    for index in range(warmup + rounds):
        shift = index % len(live) if live else 0
        for case in live[shift:] + live[:shift]:
            if case.name in errors:
                continue
            try:
                if case.setup:
                    case.setup()
                # Before every sample: a collection owed to the garbage of the previous case (another
                # system's teardown, say) should not land in this case's timed op.
                gc.collect()
                start = time.perf_counter()
                for _ in range(case.inner):
                    case.op()
                elapsed = (time.perf_counter() - start) / case.inner
                if case.teardown:
                    case.teardown()
            except Exception as exc:  # noqa: BLE001 (a system that cannot do this: recorded, reported, not fatal)
                errors[case.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                continue
            if index >= warmup:
                samples[case.name].append(elapsed)
    return Timings(samples, errors)


def once(op: Callable[[], Any]) -> float:
    start = time.perf_counter()
    op()
    return time.perf_counter() - start
