"""The settle walk: one settling phase's schedule, shared by the float engine
(runtime/engine.py) and the integer simulator (runtime/simulator.py).

A sweep updates the colour classes in order, each class as one block computed from the
same snapshot (block Gauss-Seidel; a single class holding every state is a synchronous
sweep). Every state's change lands in one [rows, total] buffer, so a sweep's residual is
one abs and one max per row whatever the number of states.

The batch is cut into units that stop on their own: the whole batch (a plain float
settle), each half of a +-beta pair (`Engine.settle_pair`), or each sample (the
simulator). A unit stops at the first sweep where its largest change is at most `tol`
(0 for integers: the integer fixed point), is not finite (divergence), or, where the
arithmetic looks for them, its state repeats an earlier one (a cycle). Its rows then
leave the batch, so the rest settles on exactly as it would alone and the sweeps no longer
pay for samples whose result is taken. Before sweep `freeze_at` (0-based) the arithmetic
freezes its piecewise selections (max-pool winners) at the current states. The sweep cap
ends the units still going.

What differs between the two runtimes is the arithmetic, an object with:

    detach                    compute changes on detached values (autograd runs through)
    drive(j, S, ver)          state j's new value at states S (ver: how many times each
                              state has been replaced, for caches keyed on a state value)
    delta_buffer(n)           (buffer [n, total], {state: its columns, shaped like it})
    freeze(S, rows)           freeze the selections at S (rows: the unit id of each row;
                              None for a single unit)
    take_rows(take)           keep only the rows `take` selects, in whatever it holds per row
    finish(units, rows, sizes, S, d, sweeps, converged)
                              units (ids) end here: their rows (a slice or an index,
                              `sizes` rows per unit in order) of S and of |delta s| d;
                              converged: per unit, residual <= tol
    cycles(S, rows, done)     optional: `done` (per unit) with the units whose state
                              repeats an earlier one set (rows: the unit id of each row),
                              or None (nothing new)

Data-parallel settles (runtime/distributed.py, float engine only): each process settles its
shard of one batch, and a unit stops when all of it has settled, i.e. on the largest changes
over the processes. `stops` (a `DeferredStops`) carries the reduction (a max over the
processes) and the plan of when to make it: each sweep keeps its local maxima, and the
sweeps that could stop a unit (local maxima within tol, or not finite) their states and
changes; at the sweeps the plan names, the maxima of all sweeps since the last decision are
reduced in one collective and decided in order, exactly as one process decides them sweep
by sweep. Deciding late costs the sweeps run past a stop, never another result. A decision
is also made before the max-pool freeze and after every sweep of a traced settle, so the
selections frozen and the trace are those of the sweep decided.
"""
from __future__ import annotations

import math
import time

import torch


def settle_walk(ar, S: dict, classes: list[list[str]], *, max_sweeps: int, tol: float,
                freeze_at: int | None = None, units: list[int] | None = None,
                observe=None, stops: DeferredStops | None = None, kind=None) -> int:
    """Settle S in place (its entries are replaced, never written into) with the
    arithmetic `ar`; returns the sweeps run (those of the last unit to finish).

    units: the row counts of consecutive units in batch order (None: the whole batch is
    one unit). observe(S, residual): called after every sweep with the largest change
    of the rows still settling (a trace). stops: decide the stops on the maxima over the
    processes of a data-parallel run (see the module's docstring); kind: which kind of
    settle this is, for the plan (settles of one kind stop at similar sweeps)."""
    n = next(iter(S.values())).shape[0]
    ver = {j: 0 for cls in classes for j in cls}
    if stops is not None:
        if getattr(ar, "cycles", None) is not None:
            raise ValueError("deferred stop decisions do not look for cycles")
        return _walk_deferred(ar, S, classes, ver, max_sweeps, tol, freeze_at, units,
                              observe, stops, kind)
    delta, cols = ar.delta_buffer(n)
    drive, detach = ar.drive, ar.detach
    if units is not None:
        return _walk_units(ar, S, classes, ver, delta, cols, max_sweeps, tol, freeze_at,
                           units, observe)
    sweeps = 0
    for sweep in range(max_sweeps):
        if sweep == freeze_at:
            ar.freeze(S, None)
        d = _sweep(classes, S, ver, drive, detach, delta, cols)
        sweeps = sweep + 1
        rmax = float(d.max())
        if observe is not None:
            observe(S, rmax)
        if rmax <= tol or not math.isfinite(rmax):
            break
    ar.finish([0], slice(0, n), [n], S, delta, sweeps, [not sweeps or rmax <= tol])
    return sweeps


def _sweep(classes, S, ver, drive, detach, delta, cols) -> torch.Tensor:
    """One sweep: each colour class's new values from the same snapshot, then swapped in;
    each state's change written to its columns of `delta`. Returns |delta|."""
    for cls in classes:
        new = {j: drive(j, S, ver) for j in cls}
        for j, v in new.items():
            if detach:
                torch.sub(v.detach(), S[j].detach(), out=cols[j])
            else:
                torch.sub(v, S[j], out=cols[j])
            S[j] = v
            ver[j] += 1
    return delta.abs_()


def _walk_units(ar, S, classes, ver, delta, cols, max_sweeps, tol, freeze_at, units,
                observe) -> int:
    """`settle_walk` for a batch of several units (see there)."""
    drive, detach = ar.drive, ar.detach
    cycles = getattr(ar, "cycles", None)
    ids, sizes = list(range(len(units))), list(units)
    equal = len(set(sizes)) == 1          # equal units: their maxima in one reduction
    sweeps = 0
    for sweep in range(max_sweeps):
        if sweep == freeze_at:
            ar.freeze(S, _unit_of_rows(ids, sizes))
        d = _sweep(classes, S, ver, drive, detach, delta, cols)
        sweeps = sweep + 1
        # each unit's largest change: one reduction and one sync per sweep
        if equal:
            r = d.view(len(ids), -1).amax(1).tolist()
        else:
            r = torch.stack([d[a:a + k].amax() for a, k in zip(_starts(sizes), sizes)]).tolist()
        if observe is not None:
            observe(S, max(r))
        done = [x <= tol or not math.isfinite(x) for x in r]
        if cycles is not None:
            done = cycles(S, _unit_of_rows(ids, sizes), done) or done
        last = sweeps == max_sweeps
        if not (last or True in done):
            continue
        starts = _starts(sizes)
        for which in ([k for k, x in enumerate(done) if x],
                      [k for k, x in enumerate(done) if not x] if last else []):
            if which:
                ar.finish([ids[k] for k in which], _rows(starts, sizes, which, d.device),
                          [sizes[k] for k in which], S, d, sweeps, [r[k] <= tol for k in which])
        keep = [k for k, x in enumerate(done) if not x]
        if last or not keep:
            return sweeps
        _narrow(S, ar, _rows(starts, sizes, keep, d.device))
        ids, sizes = [ids[k] for k in keep], [sizes[k] for k in keep]
        equal = len(set(sizes)) == 1
        delta, cols = ar.delta_buffer(sum(sizes))
    # no sweep at all (max_sweeps 0)
    ar.finish(ids, slice(0, sum(sizes)), sizes, S, delta, sweeps, [True] * len(ids))
    return sweeps


class SyncPlan:
    """When a data-parallel settle reduces its deferred stop decisions. It decides how
    many sweeps run past a stop and how many collectives a settle makes, never what the
    settle returns.

    A collective costs `t_sync` (a round trip, and on a busy machine the wait for the
    other processes' next time slice), a sweep `t_sweep`. Where a collective is cheaper
    than a sweep, the first one comes a little before the sweep at which the last settle
    of the kind first stopped (the stops move little from batch to batch), and one
    follows every sweep or two: few sweeps are run past a stop. Where it costs more, the
    first comes at the sweep at which that settle ended (one for both halves of a +-beta
    pair), then the gaps grow from about sqrt(t_sync / t_sweep) sweeps, doubling, to
    MAX_GAP. Every process must follow the same plan, so the costs it reads are the
    maxima over the processes, carried by the reductions themselves.
    """

    LEAD = 0.8          # where collectives are cheap: first at 80% of the last first stop
    FIRST = 8           # with no history: first after 8 sweeps
    MAX_GAP = 8

    def __init__(self, last: tuple[int, int] | None, costs: tuple[float, float] | None):
        ratio = costs[1] / max(costs[0], 1e-9) if costs else 1.0
        if last is None:
            self.next = self.FIRST
        elif ratio < 1.0:
            self.next = max(1, int(self.LEAD * last[0]))
        else:
            self.next = max(1, last[1])
        self.gap = min(self.MAX_GAP, max(1, round(math.sqrt(ratio))))

    def due(self, sweeps: int) -> bool:
        if sweeps < self.next:
            return False
        self.next = sweeps + self.gap
        self.gap = min(2 * self.gap, self.MAX_GAP)
        return True


class DeferredStops:
    """The stop decisions of a data-parallel run's settles: `reduce` maps a float64 tensor
    of this process's values to their maxima over the processes; per kind of settle, the
    sweeps of its last first stop and last stop; the costs of a sweep and of a collective,
    this process's (moving averages) and as last agreed over all (what `SyncPlan` plans
    by)."""

    def __init__(self, reduce):
        self.reduce = reduce
        self.last_stops: dict = {}
        self.costs = [0.0, 0.0]
        self.agreed: tuple[float, float] | None = None

    def plan(self, kind) -> SyncPlan:
        return SyncPlan(self.last_stops.get(kind), self.agreed)


def _walk_deferred(ar, S, classes, ver, max_sweeps, tol, freeze_at, units, observe,
                   stops: DeferredStops, kind) -> int:
    """`settle_walk` with stop decisions reduced over processes (see the module)."""
    drive, detach = ar.drive, ar.detach
    whole = units is None                 # the batch is one unit (finished as in settle_walk)
    n = next(iter(S.values())).shape[0]
    ids, sizes = [0] if whole else list(range(len(units))), [n] if whole else list(units)
    delta, cols = ar.delta_buffer(n)
    plan = stops.plan(kind)
    clock = time.perf_counter
    # the sweeps since the last decision: (sweeps, local maxima per unit still settling,
    # (states, |delta s|) where this sweep could stop a unit, else None)
    pending: list[tuple[int, list[float], tuple | None]] = []
    first_stop = None
    sweeps = 0
    d = delta
    for sweep in range(max_sweeps):
        if sweep == freeze_at:
            ar.freeze(S, None if whole else _unit_of_rows(ids, sizes))
        t0 = clock()
        d = _sweep(classes, S, ver, drive, detach, delta, cols)
        sweeps = sweep + 1
        if len(set(sizes)) == 1:
            r = d.view(len(ids), -1).amax(1).tolist()
        else:
            r = torch.stack([d[a:a + k].amax() for a, k in zip(_starts(sizes), sizes)]).tolist()
        could = any(x <= tol or not math.isfinite(x) for x in r)
        pending.append((sweeps, r, (dict(S), d) if could else None))
        if could:      # a kept sweep's changes stay as they are
            delta, cols = ar.delta_buffer(sum(sizes))
        t1 = clock()
        stops.costs[0] += 0.1 * ((t1 - t0) - stops.costs[0])
        last = sweeps == max_sweeps
        due = plan.due(sweeps)
        if not (due or last or sweeps == freeze_at or observe is not None):
            continue
        # the pending sweeps' maxima, then this process's costs (their maxima: agreed)
        glob = stops.reduce(torch.tensor([x for p in pending for x in p[1]] + stops.costs,
                                         dtype=torch.float64, device=d.device)).tolist()
        stops.costs[1] += 0.1 * ((clock() - t1) - stops.costs[1])
        stops.agreed = (glob[-2], glob[-1])
        w = len(ids)
        # decide the sweeps in order, as one process decides each after it ran:
        # ends[k] = (sweep, kept, global maximum) of the unit at position k
        ends: dict[int, tuple] = {}
        stop = None
        for i, (sw, _, kept) in enumerate(pending):
            g = glob[i * w:(i + 1) * w]
            if observe is not None:       # a traced settle decides every sweep
                observe(S, max(g[k] for k in range(w) if k not in ends))
            for k in range(w):
                if k not in ends and (g[k] <= tol or not math.isfinite(g[k])):
                    ends[k] = (sw, kept, g[k])
                    first_stop = sw if first_stop is None else first_stop
            if len(ends) == w:
                stop = sw
                break
        pending = []
        if not ends and not last:
            continue
        starts = _starts(sizes)
        # the units that ended, by the sweep they ended at (its states and changes; a unit
        # stopped by another process's non-finite maximum at a sweep this one did not
        # keep ends on the latest ones, and the caller's divergence check fails the run
        # in every process)
        by_sweep: dict[int, list[int]] = {}
        for k, (sw, _, _) in ends.items():
            by_sweep.setdefault(sw, []).append(k)
        for sw, which in sorted(by_sweep.items()):
            which.sort()
            kept = ends[which[0]][1] or (S, d)
            if whole:
                S.clear()
                S.update(kept[0])
            ar.finish([ids[k] for k in which], _rows(starts, sizes, which, d.device),
                      [sizes[k] for k in which], kept[0], kept[1], sw,
                      [ends[k][2] <= tol for k in which])
        if stop is not None:
            sweeps = stop
            break
        rest = [k for k in range(w) if k not in ends]
        if last:           # the cap ends the units still going
            ar.finish([ids[k] for k in rest], _rows(starts, sizes, rest, d.device),
                      [sizes[k] for k in rest], S, d, sweeps, [False] * len(rest))
            break
        _narrow(S, ar, _rows(starts, sizes, rest, d.device))
        ids, sizes = [ids[k] for k in rest], [sizes[k] for k in rest]
        delta, cols = ar.delta_buffer(sum(sizes))
    else:
        if max_sweeps <= 0:        # no sweep at all
            ar.finish(ids, slice(0, sum(sizes)), sizes, S, delta, 0, [True] * len(ids))
    stops.last_stops[kind] = (first_stop if first_stop is not None else sweeps, sweeps)
    return sweeps


def _starts(sizes: list[int]) -> list[int]:
    out, at = [], 0
    for k in sizes:
        out.append(at)
        at += k
    return out


def _unit_of_rows(ids: list[int], sizes: list[int]) -> list[int]:
    """The unit id of every row of the batch."""
    return [u for u, k in zip(ids, sizes) for _ in range(k)]


def _rows(starts: list[int], sizes: list[int], which: list[int], device):
    """The rows of the units at positions `which` (ascending): a slice when they are
    consecutive, else an index tensor."""
    if which[-1] - which[0] == len(which) - 1:
        return slice(starts[which[0]], starts[which[-1]] + sizes[which[-1]])
    idx = [i for k in which for i in range(starts[k], starts[k] + sizes[k])]
    return torch.tensor(idx, dtype=torch.long, device=device)


def _narrow(S: dict, ar, rows) -> None:
    """Keep only `rows` (a slice or an index tensor) of every state and of the
    arithmetic's per-row buffers: the units that go on sweeping."""
    take = ((lambda t: t[rows]) if isinstance(rows, slice)
            else (lambda t: t.index_select(0, rows)))
    for j in S:
        S[j] = take(S[j])
    ar.take_rows(take)
