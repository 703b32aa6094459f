"""The settle walk (runtime/settle.py) on its own, with a toy arithmetic whose every sweep is
known: s <- a * s per row. It is the walk the float engine and the integer simulator share
(tests/test_runtime.py and tests/test_neuromorphic.py check them through it)."""
from __future__ import annotations

import math

import pytest
import torch

from epc.runtime.settle import settle_walk


class Scale:
    """s <- a s, row by row (a: one factor per row); records what the walk asks."""

    detach = False

    def __init__(self, a: list[float], period: int | None = None):
        self.a = torch.tensor(a, dtype=torch.float64).reshape(-1, 1)
        self.period = period      # cycles(): a moving row repeats after this many sweeps
        self.finished = {}
        self.froze = []
        self.seen = {}

    def drive(self, j, S, ver):
        return S[j] * self.a

    def delta_buffer(self, n):
        buf = torch.zeros((n, 1), dtype=torch.float64)
        return buf, {"s": buf.view(n, 1)}

    def freeze(self, S, rows):
        self.froze.append((rows, S["s"].clone()))

    def take_rows(self, take):
        self.a = take(self.a)

    def finish(self, units, rows, sizes, S, d, sweeps, converged):
        vals = S["s"][rows]
        at = 0
        for u, k, c in zip(units, sizes, converged):
            self.finished[int(u)] = (sweeps, bool(c), vals[at:at + k, 0].tolist())
            at += k


def _sweeps_to_settle(a: float, tol: float, cap: int) -> int:
    """The first sweep k whose change |a^k - a^(k-1)| is <= tol (float64, as the walk)."""
    s = 1.0
    for k in range(1, cap + 1):
        new = s * a
        if abs(new - s) <= tol:
            return k
        s = new
    return cap


def test_each_unit_stops_at_its_own_sweep_and_leaves_the_batch():
    a = [0.5, 0.9, 0.1, 0.7, 0.95]
    tol, cap = 1e-6, 500
    ar = Scale(a)
    S = {"s": torch.ones(5, 1, dtype=torch.float64)}
    sweeps = settle_walk(ar, S, [["s"]], max_sweeps=cap, tol=tol, units=[1] * 5)
    want = [_sweeps_to_settle(x, tol, cap) for x in a]
    assert sweeps == max(want)
    for i, x in enumerate(a):
        k, conv, vals = ar.finished[i]
        assert (k, conv) == (want[i], True)
        assert math.isclose(vals[0], x ** k, rel_tol=1e-12)
    # units of two rows stop together, at the later of their two rows
    ar = Scale(a[:4])
    settle_walk(ar, {"s": torch.ones(4, 1, dtype=torch.float64)}, [["s"]], max_sweeps=cap,
                tol=tol, units=[2, 2])
    assert ar.finished[0][0] == max(want[:2]) and ar.finished[1][0] == max(want[2:4])


def test_cap_divergence_freeze_and_cycles():
    # the cap ends units still going, not converged; a NaN row stops at once
    ar = Scale([0.99, float("nan"), 0.5])
    settle_walk(ar, {"s": torch.ones(3, 1, dtype=torch.float64)}, [["s"]], max_sweeps=10,
                tol=1e-9, units=[1, 1, 1], freeze_at=4)
    assert ar.finished[0][:2] == (10, False)
    assert ar.finished[1][:2] == (1, False)
    assert ar.finished[2][:2] == (10, False)
    # the freeze comes once, before sweep 5 (0-based 4), for the rows still settling
    (rows, s), = ar.froze
    four = torch.ones(2, dtype=torch.float64)
    for _ in range(4):
        four = four * torch.tensor([0.99, 0.5], dtype=torch.float64)
    assert rows == [0, 2] and torch.equal(s[:, 0], four)
    # one unit (None): the whole batch stops when its largest change is <= tol
    ar = Scale([0.5, 0.9])
    n = settle_walk(ar, {"s": torch.ones(2, 1, dtype=torch.float64)}, [["s"]],
                    max_sweeps=500, tol=1e-6)
    assert n == _sweeps_to_settle(0.9, 1e-6, 500) and ar.finished[0][1]


def test_cycles_stop_a_moving_unit():
    """An arithmetic that looks for cycles gets the units still moving; a unit it marks
    stops there, not converged."""

    class Flip(Scale):
        def cycles(self, S, rows, done):
            v = S["s"][:, 0].tolist()
            for k, u in enumerate(rows):
                if not done[k]:
                    if (u, v[k]) in self.seen:
                        done[k] = True
                        self.finished_cycle = getattr(self, "finished_cycle", set()) | {u}
                    self.seen[(u, v[k])] = True
            return done

    ar = Flip([-1.0, 0.5])
    settle_walk(ar, {"s": torch.ones(2, 1, dtype=torch.float64)}, [["s"]], max_sweeps=100,
                tol=0.0, units=[1, 1])
    assert ar.finished[0][:2] == (3, False) and ar.finished_cycle == {0}   # 1,-1,1,-1: repeat
    assert ar.finished[1][:2] == (100, False)      # 0.5^k never repeats, nor stops at tol 0


@pytest.mark.parametrize("cap", [0, 1])
def test_no_or_one_sweep(cap):
    ar = Scale([0.5])
    n = settle_walk(ar, {"s": torch.ones(1, 1, dtype=torch.float64)}, [["s"]], max_sweeps=cap,
                    tol=0.0, units=[1])
    assert n == cap and ar.finished[0][0] == cap


class _Always(dict):
    """A stop history that always says `first` (where the deferred plan starts)."""

    def __init__(self, first):
        super().__init__()
        self.first = first

    def get(self, key, default=None):
        return (self.first, self.first)


@pytest.mark.parametrize("first", [1, 3, 8, 10_000])
@pytest.mark.parametrize("costs", [None, (1e-3, 1e-4), (1e-4, 1e-2)])
def test_deferred_stop_decisions_decide_as_every_sweep(first, costs):
    """Data-parallel settles (stops=) decide late, at the sweeps their plan names, on
    reduced maxima; with a reduction that is the identity (one process) every unit ends
    at the sweep, states and convergence of the walk that decides after every sweep,
    whatever the plan: units apart, a NaN row, the cap, the freeze (decided before it),
    a whole batch, and no sweep at all."""
    from epc.runtime.settle import DeferredStops

    def both(a, **kw):
        out = []
        for deferred in (False, True):
            ar = Scale(a)
            stops = None
            if deferred:
                stops = DeferredStops(lambda t: t.clone())
                stops.last_stops = _Always(first)
                stops.agreed = costs
            n = settle_walk(ar, {"s": torch.ones(len(a), 1, dtype=torch.float64)}, [["s"]],
                            stops=stops, kind="k", **kw)
            out.append((n, ar.finished, [(r, s.tolist()) for r, s in ar.froze]))
        return out

    for a, kw in (([0.5, 0.9, 0.1, 0.7, 0.95], dict(max_sweeps=500, tol=1e-6,
                                                    units=[1] * 5)),
                  ([0.5, 0.9, 0.1, 0.7], dict(max_sweeps=500, tol=1e-6, units=[2, 1, 1])),
                  ([0.99, float("nan"), 0.5], dict(max_sweeps=10, tol=1e-9, units=[1, 1, 1],
                                                   freeze_at=4)),
                  ([0.5, 0.3], dict(max_sweeps=40, tol=1e-6, units=[1, 1], freeze_at=2)),
                  ([0.5, 0.9], dict(max_sweeps=500, tol=1e-6)),
                  ([0.5, 0.9], dict(max_sweeps=500, tol=1e-6, freeze_at=3)),
                  ([0.999], dict(max_sweeps=7, tol=1e-9)),
                  ([0.5], dict(max_sweeps=0, tol=0.0, units=[1]))):
        ref, got = both(a, **kw)
        assert got[0] == ref[0], (a, kw)
        assert got[1].keys() == ref[1].keys()
        for u in ref[1]:      # sweeps, converged, values (NaN rows compared as text)
            assert repr(got[1][u]) == repr(ref[1][u]), (a, kw, u)
        assert repr(got[2]) == repr(ref[2]), (a, kw)


def test_deferred_stops_refuse_cycle_search():
    from epc.runtime.settle import DeferredStops

    class Cyc(Scale):
        def cycles(self, S, rows, done):
            return None

    with pytest.raises(ValueError, match="cycles"):
        settle_walk(Cyc([0.5]), {"s": torch.ones(1, 1, dtype=torch.float64)}, [["s"]],
                    max_sweeps=5, tol=0.0, units=[1],
                    stops=DeferredStops(lambda t: t.clone()))
