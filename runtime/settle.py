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
"""
from __future__ import annotations

import math

import torch


def settle_walk(ar, S: dict, classes: list[list[str]], *, max_sweeps: int, tol: float,
                freeze_at: int | None = None, units: list[int] | None = None,
                observe=None) -> int:
    """Settle S in place (its entries are replaced, never written into) with the
    arithmetic `ar`; returns the sweeps run (those of the last unit to finish).

    units: the row counts of consecutive units in batch order (None: the whole batch is
    one unit). observe(S, residual): called after every sweep with the largest change
    of the rows still settling (a trace)."""
    n = next(iter(S.values())).shape[0]
    ver = {j: 0 for cls in classes for j in cls}
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
        rows = _rows(starts, sizes, keep, d.device)
        take = ((lambda t: t[rows]) if isinstance(rows, slice)
                else (lambda t: t.index_select(0, rows)))
        for j in S:
            S[j] = take(S[j])
        ar.take_rows(take)
        ids, sizes = [ids[k] for k in keep], [sizes[k] for k in keep]
        equal = len(set(sizes)) == 1
        delta, cols = ar.delta_buffer(sum(sizes))
    # no sweep at all (max_sweeps 0)
    ar.finish(ids, slice(0, sum(sizes)), sizes, S, delta, sweeps, [True] * len(ids))
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
