"""A small float64 EP engine for energy graphs: the target's own reference.

It implements the BRIEF's energy semantics directly (colour-class block updates, tied
feedback through compiler/ops adjoints, mse nudging, symmetric EP updates) so that the
quantizer can calibrate on real equilibria and the tests can compare the integer
simulator with the infinite-precision dynamics it approximates, independently of the
batched runtime in epc.runtime (which the parity figures also use when it is installed).
Only what the neuromorphic target supports is handled: mse costs, clip/identity/relu.
"""
from __future__ import annotations

import numpy as np
import torch

from epc.compiler import ops as O
from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph


def _weights(g: Graph) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.float64) for k, v in g.weights.items()}


class FloatEP:
    """Float settle / nudge / EP update of an energy graph (weights held as float64)."""

    def __init__(self, g: Graph):
        if g.schedule is None:
            raise EpcError(f"graph {g.name}: no schedule (compile it first)")
        for c in g.costs:
            if c.kind != "mse":
                raise EpcError(f"cost {c.name}: kind {c.kind} is not supported here (mse only)")
        self.g = g
        self.w = _weights(g)
        self.inp = g.inputs[0].name
        self.settled = [s.name for s in g.settled_states()]
        self.teachers = [s.name for s in g.states if s.role == "teacher"]
        if g.schedule.mode == "sync":
            self.classes = [list(self.settled)]
        else:
            self.classes = [list(c) for c in g.schedule.classes]

    # ---- dynamics
    def _drive(self, name: str, s: dict, beta: float, y) -> torch.Tensor:
        g, st = self.g, self.g.state(name)
        u = torch.zeros((s[self.inp].shape[0], *st.shape), dtype=torch.float64)
        for c in g.couplings:
            if c.kind == "teacher" and st.role != "teacher":
                continue
            if c.dst == name:
                u = u + O.chain_forward(c.ops, s[c.src], self.w)[0]
            if c.src == name and c.feedback and st.role != "teacher":
                _, ctx = O.chain_forward(c.ops, s[name], self.w)
                u = u + O.chain_adjoint(c.ops, s[c.dst], ctx, self.w)
        if st.bias:
            u = u + self.w[st.bias]
        if beta and st.role != "teacher":
            for cost in g.costs:
                if cost.state == name:
                    tgt = y if cost.target == "label" else s[cost.target]
                    u = u - beta * cost.weight * (s[name] - tgt)
        return O.activate(st.act, u)

    def init(self, x: torch.Tensor) -> dict:
        s = {self.inp: x}
        for st in self.g.states:
            s[st.name] = torch.zeros((x.shape[0], *st.shape), dtype=torch.float64)
        from epc.compiler.reference import coupling_order
        for name in coupling_order(self.g):   # teacher states: one feedforward pass
            if name in self.teachers:
                s[name] = self._drive(name, s, 0.0, None)
        return s

    def settle(self, s: dict, *, beta: float = 0.0, y=None, sweeps: int = 100,
               tol: float = 1e-6) -> tuple[dict, int]:
        s = dict(s)
        for k in range(1, sweeps + 1):
            delta = 0.0
            for cls in self.classes:
                new = {n: self._drive(n, s, beta, y) for n in cls}
                for n, v in new.items():
                    delta = max(delta, float((v - s[n]).abs().max()))
                    s[n] = v
            if delta < tol:
                return s, k
        return s, sweeps

    def predict(self, x: np.ndarray, *, sweeps: int | None = None, tol: float = 1e-6) -> np.ndarray:
        xt = torch.as_tensor(x, dtype=torch.float64)
        s, _ = self.settle(self.init(xt), sweeps=sweeps or self.g.schedule.max_sweeps, tol=tol)
        out = self.g.output_state().name
        return s[out].reshape(len(x), -1).argmax(1).numpy()

    def activations(self, x: np.ndarray, sweeps: int | None = None) -> dict[str, np.ndarray]:
        xt = torch.as_tensor(x, dtype=torch.float64)
        s, _ = self.settle(self.init(xt), sweeps=sweeps or self.g.schedule.max_sweeps)
        return {k: v.numpy() for k, v in s.items()}

    # ---- learning
    def _phi_grads(self, s: dict) -> dict[str, torch.Tensor]:
        """dPhi/dtheta at states s, summed over the batch (weights by name)."""
        grads: dict[str, torch.Tensor] = {}
        for c in self.g.couplings:
            if c.kind == "teacher":
                continue
            names = [getattr(op, "weight") for op in c.ops if hasattr(op, "weight")]
            if not names:
                continue
            leaf = {n: self.w[n].clone().requires_grad_(True) for n in names}
            wd = dict(self.w)
            wd.update(leaf)
            y = O.chain_forward(c.ops, s[c.src], wd)[0]
            phi = (y * s[c.dst]).sum()
            gs = torch.autograd.grad(phi, [leaf[n] for n in names])
            for n, gr in zip(names, gs):
                grads[n] = grads.get(n, 0) + gr
        for st in self.g.settled_states():
            if st.bias:
                b = self.w[st.bias]
                gb = s[st.name].sum(0)
                while gb.dim() > b.dim():
                    gb = gb.sum(0)
                for ax in range(b.dim()):
                    if b.shape[ax] == 1 and gb.shape[ax] != 1:
                        gb = gb.sum(ax, keepdim=True)
                grads[st.bias] = grads.get(st.bias, 0) + gb
        return grads

    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, beta: float, lr: float,
                   sweeps: int | None = None, nudge_sweeps: int | None = None) -> None:
        sch = self.g.schedule
        s0, _ = self.settle(self.init(x), sweeps=sweeps or sch.max_sweeps, tol=1e-5)
        sp, _ = self.settle(s0, beta=beta, y=y, sweeps=nudge_sweeps or sch.nudge_sweeps, tol=1e-5)
        sm, _ = self.settle(s0, beta=-beta, y=y, sweeps=nudge_sweeps or sch.nudge_sweeps, tol=1e-5)
        gp, gm = self._phi_grads(sp), self._phi_grads(sm)
        n = x.shape[0]
        for k in gp:
            self.w[k] = self.w[k] + lr * (gp[k] - gm[k]) / (2 * beta * n)

    def export(self) -> Graph:
        g = self.g.copy()
        for k, v in self.w.items():
            g.weights[k] = v.numpy().astype(np.float32)
        return g


def train_float_ep(g: Graph, xtr: np.ndarray, ytr: np.ndarray, *, epochs: int, beta: float,
                   lr: float, batch: int = 32, seed: int = 0, sweeps: int | None = None,
                   nudge_sweeps: int | None = None) -> Graph:
    """Plain symmetric-nudging EP training; returns the graph with trained weights."""
    ep = FloatEP(g)
    rng = np.random.default_rng(seed)
    nout = int(np.prod(g.output_state().shape))
    for _ in range(epochs):
        perm = rng.permutation(len(xtr))
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            x = torch.as_tensor(xtr[idx], dtype=torch.float64)
            y = torch.nn.functional.one_hot(torch.as_tensor(ytr[idx]), nout).double()
            y = y.reshape(len(idx), *g.output_state().shape)
            ep.train_step(x, y, beta=beta, lr=lr, sweeps=sweeps, nudge_sweeps=nudge_sweeps)
    return ep.export()
