"""Bernoulli (StochEP) neurons in the float runtime: spikes, rate estimates, noise, counts.

A bernoulli state j holds a running estimate r_j of its firing rate; that estimate is what
its neighbours see and what settling, the costs and the EP update read. Each time step (one
sweep of the colour classes), when j's turn comes, its drive u_j is computed from its
neighbours' estimates exactly as for a rate state, and then

    p_j = rho_j(u_j)                      in [0, 1] (the compiler checks the activation)
    z_j = [U < p_j],  U ~ uniform[0, 1)   a spike, drawn from the phase's generator
    r_j <- r_j + (z_j - r_j) / tau        averaging 'trace' (exponential, decay 1/tau)
    r_j <- r_j + (z_j - z_j[t - tau]) / tau   'window' (mean of the last tau spikes)

In expectation z_j = p_j, so the mean-field limit of these dynamics is the rate network's
(relaxed by 1/tau per step): both have the same fixed points, and EP's learning rule
applies unchanged to the estimates (Lin, Jiang & Sengupta, StochEP).

Convergence: a stochastic phase has no tolerance. Its estimates keep moving by sampling
noise of order 1/tau every step (they never fall below a tol meant for deterministic
states), so each phase runs exactly its time steps (ir.Spiking: `time_steps` free,
`nudge_time_steps` each nudged phase). Its result (what predictions, costs and the EP
update read) is the mean of every state over the phase's second half: the first half is
the transient from where the phase started (give each phase at least ~4 tau steps), and
averaging the settled half cuts the estimate's noise further at no extra step (on the
digits MLP at initialisation, one estimate's cosine with the true gradient rose from 0.83
to 0.88 with tau 8). A phase that continues another (the nudged phases after the free
one) starts from where it ended at its last step, not from that mean.

Random numbers come from a `torch.Generator` on the engine's device (`Noise`); the trainer
seeds one per training step from (seed, epoch, step) and evaluation one per batch, so runs
reproduce and resume bit for bit, on CPU and, by the same construction, on CUDA (a CUDA
run does not reproduce a CPU run's numbers: the two devices' generators differ).

Counts (`SpikeCounts`): spikes per bernoulli unit and time step (`spike_rate`), and
synaptic events: one event is one spike delivered over one synapse, i.e. one addition on
an event-driven core (the weight added to the target's input; no multiplication, since a
spike is 1). Each bernoulli unit's fan-out over the couplings that read it (forward to the
couplings' destinations, and back through their feedback) is counted once per engine
(`fanouts`); a spike adds its unit's fan-out. Through a max-pool, a window of spikes is
delivered once (its maximum is 1 when any unit in it fired): those couplings count the
events of the pooled spikes at every step.
"""
from __future__ import annotations

import torch

from epc.compiler import ops as O

Tensor = torch.Tensor


class Noise:
    """Where a settle's spikes draw their uniform numbers.

    gen:    a torch.Generator on the engine's device.
    copies: the batch is `copies` stacked copies of the same samples (Engine.settle_pair:
            the +beta and -beta halves); they draw the same numbers ('shared' sampling)
            when copies > 1, else every row draws its own.
    """

    def __init__(self, gen: torch.Generator, copies: int = 1):
        self.gen, self.copies = gen, int(copies)

    def spikes(self, p: Tensor) -> Tensor:
        """Spikes z in {0, 1} (p's dtype and layout) with P(z = 1) = p: [U < p], U uniform in
        [0, 1) drawn in torch's default layout (the values do not depend on the layout the
        state is kept in); the copies of a stacked batch compare the same U."""
        shape, k = tuple(p.shape), self.copies
        rows = shape[0] // k if k > 1 and shape[0] % k == 0 else shape[0]
        u = torch.empty((rows,) + shape[1:], dtype=p.dtype, device=p.device)
        u.uniform_(generator=self.gen)
        z = torch.empty_like(p)
        if rows == shape[0]:
            return torch.lt(u, p, out=z)
        torch.lt(u.unsqueeze(0), p.unflatten(0, (k, rows)), out=z.unflatten(0, (k, rows)))
        return z


def averaged_steps(steps: int) -> int:
    """How many of a phase's last time steps its result averages: the second half."""
    return max(1, steps - steps // 2)


def generator(device, seed: int) -> torch.Generator:
    """A generator on `device` seeded with `seed` (reduced to 63 bits)."""
    return torch.Generator(device=device).manual_seed(int(seed) & ((1 << 63) - 1))


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (a run's seed, its epoch, a step...): a
    splitmix64 chain, so nearby tuples give unrelated generators."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x & ((1 << 63) - 1)


# --------------------------------------------------------------------------- fan-outs
def _ones_weights(P: dict, names) -> dict:
    """`P` with the named weights replaced by ones: a chain then counts synapses."""
    out = dict(P)
    for w in names:
        out[w] = torch.ones_like(P[w])
    return out


def fanouts(eng) -> tuple[dict, list]:
    """Per bernoulli state, the synapses each of its units reaches ({state: tensor shaped
    like the state, [1, ...]}), over the couplings that read it through a linear chain,
    and the couplings (link, direction) whose pooled spikes are counted at each step (a
    max-pool forward from a bernoulli source)."""
    per: dict[str, Tensor] = {}
    pooled: list = []
    dev, dt = eng.device, eng.dtype
    for l in eng.links:
        if l.kind == "teacher":
            continue
        P1 = _ones_weights(eng.params, l.weights)
        piecewise = any(O.rule(op).piecewise for op in l.ops)
        ones_src = torch.ones((1,) + eng.shapes[l.src], dtype=dt, device=dev)
        if l.src in eng.bernoulli and l.dst in eng.shapes:
            if piecewise:
                pooled.append(l)
            else:    # each source unit's forward fan-out: L1^T applied to ones
                y, ctx = O.chain_forward(l.ops, ones_src, P1)
                f = O.chain_adjoint(l.ops, torch.ones_like(y), ctx, P1)
                per[l.src] = per.get(l.src, 0) + f
        if l.feedback and l.dst in eng.bernoulli and l.src in eng.settled:
            # each destination unit's feedback fan-out: L1 applied to ones (through a
            # max-pool's adjoint every pooled unit reaches exactly one source unit,
            # whichever wins, so the count does not depend on the winners)
            y, _ = O.chain_forward(l.ops, ones_src, P1)
            per[l.dst] = per.get(l.dst, 0) + y
    for j in eng.bernoulli:
        if j not in per:
            per[j] = torch.zeros((1,) + eng.shapes[j], dtype=dt, device=dev)
    return {j: eng.to_layout(j, f) for j, f in per.items()}, pooled


class SpikeCounts:
    """Spikes and synaptic events of the settles that share it (running sums, kept on
    the device until read, so counting adds no synchronisation to the sweeps)."""

    def __init__(self, eng):
        self.eng = eng
        self.fan, self.pooled = eng.spike_fanouts()
        self.pooled_by_src = {j: [l for l in self.pooled if l.src == j] for j in eng.bernoulli}
        self.P1 = {l.name: _ones_weights(eng.params, l.weights) for l in self.pooled}
        self.spikes = 0            # spikes, summed over units, rows and steps
        self.events = 0            # synaptic events, likewise
        self.unit_steps = 0        # bernoulli units x rows x steps

    def add(self, j: str, z: Tensor) -> None:
        """State j fired `z` ([rows, ...] of 0/1) this step."""
        self.spikes = self.spikes + z.sum()
        self.events = self.events + (z * self.fan[j]).sum()
        for l in self.pooled_by_src[j]:
            y, _ = O.chain_forward(l.ops, z, self.P1[l.name])
            self.events = self.events + y.sum()
        self.unit_steps += z.numel()

    def totals(self) -> dict:
        """{'spikes', 'events', 'unit_steps'} as Python numbers (one synchronisation)."""
        vals = [v if torch.is_tensor(v) else torch.tensor(float(v))
                for v in (self.spikes, self.events)]
        spikes, events = torch.stack([v.double().cpu() for v in vals]).tolist()
        return {"spikes": spikes, "events": events, "unit_steps": self.unit_steps}
