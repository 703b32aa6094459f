"""Reference interpreters of the IR (what `--verify` and the tests compare with).

* `run_feedforward`: evaluates the feedforward form node by node.
* `forward_sweep`: one feedforward pass of the energy form: states in topological order of
  the couplings, feedback ignored, each state set to rho(sum of inbound chains + bias).
  With `lift_bounds`, each state uses its source activation (the source model's), so the
  sweep must reproduce the source model exactly. `feedforward_states` is the same pass on
  tensors, differentiable in the weights (bench/backprop.py trains through it).
"""
from __future__ import annotations

import networkx as nx
import numpy as np
import torch

from . import ops as O
from .errors import EpcError
from .ir import Graph


def _tensors(g: Graph, dtype) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v), dtype=dtype) for k, v in g.weights.items()
            if isinstance(v, np.ndarray)}


def run_feedforward(g: Graph, inputs: dict[str, np.ndarray], dtype=torch.float64) -> dict:
    w = _tensors(g, dtype)
    vals = {k: torch.as_tensor(v, dtype=dtype) for k, v in inputs.items()}
    for n in g.nodes:
        vals[n.name] = O.apply_node_op(n.op, [vals[x] for x in n.inputs], w)
    return {o: vals[o].numpy() for o in g.outputs}


def coupling_order(g: Graph) -> list[str]:
    """States in topological order of the (feedforward direction of the) couplings."""
    dg = nx.DiGraph()
    dg.add_nodes_from(s.name for s in g.states)
    dg.add_edges_from((c.src, c.dst) for c in g.couplings if c.src not in
                      {i.name for i in g.inputs})
    try:
        return list(nx.topological_sort(dg))
    except nx.NetworkXUnfeasible:
        raise EpcError(f"graph {g.name}: couplings form a cycle; no feedforward order")


def feedforward_states(g: Graph, inputs: dict[str, torch.Tensor], w: dict[str, torch.Tensor],
                       *, source_acts: bool = True, chain_forward=O.chain_forward,
                       skip_roles: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """One feedforward pass of the energy form on tensors (differentiable in `w`): every
    state, in coupling order, set to rho(sum of inbound chains + bias), with the source
    model's activation (`source_acts`) or the energy form's. `chain_forward` applies a
    coupling's chain (the runtime passes its equal, faster kernels); states whose role is in
    `skip_roles` are not computed. Returns inputs and states by name."""
    vals = dict(inputs)
    for name in coupling_order(g):
        st = g.state(name)
        if st.role in skip_roles:
            continue
        u = None
        for c in g.inbound(name):
            y = chain_forward(c.ops, vals[c.src], w)[0]
            u = y if u is None else u + y
        if st.bias:
            u = w[st.bias] if u is None else u + w[st.bias]
        # source_act is already the source model's own function (relu for a ReLU, clip(0, 6)
        # for a ReLU6): lifting it again would turn a ReLU6 into a ReLU
        vals[name] = O.activate(st.source_act if source_acts else st.act, u)
    return vals


def forward_sweep(g: Graph, inputs: dict[str, np.ndarray], *, lift_bounds: bool = True,
                  dtype=torch.float64) -> dict[str, np.ndarray]:
    vals = feedforward_states(g, {k: torch.as_tensor(v, dtype=dtype) for k, v in inputs.items()},
                              _tensors(g, dtype), source_acts=lift_bounds)
    return {k: v.numpy() for k, v in vals.items()}
