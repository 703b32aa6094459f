"""Backprop on the feedforward form of a compiled graph (`epc backprop`, and the bench's
reference EP is compared with).

The feedforward form is the network the graph was compiled from: every state computed once,
in coupling order, from its inbound couplings (no feedback), with the energy form's bounded
activations (clip(u, 0, 1) by default: what EP's free phase computes when the feedback is
weak) or the source model's (ReLU). Teacher states are skipped: they are the teacher's, and
stay frozen. It is trained with autograd and cross-entropy on the output state, Adam with L2
weight decay and a cosine decay to 0, from the weights the graph holds.

What it is for (issue 21):
* warm conversion: EP fine-tuning started from backprop-trained weights (`epc backprop
  M.epc -o trained.epc`, then `epc train trained.epc`), whose accuracy before any EP step
  `epc train` reports as its `initial` entry;
* a trained distillation teacher: `onnx_bytes` is the trained feedforward net as an
  ONNX model (`epc backprop --onnx`), which `epc compile --teacher FILE.onnx` reads back
  through the ONNX frontend;
* the backprop reference of bench/backprop.py (same module, same init, same data).
"""
from __future__ import annotations

import io
import time
import warnings
from typing import Callable

import numpy as np
import torch

from epc.compiler import ops as O
from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph, op_weights
from epc.compiler.reference import feedforward_states

from . import kernels as K
from .data import Data
from .engine import Engine

ACTIVATIONS = ("energy", "source")


def label_loss_kind(eng: Engine, loss: str = "graph") -> str:
    """The loss backprop minimises: 'ce' or 'mse'; for 'graph', the kind of the compiled
    graph's label cost on its output (what EP fine-tuning then minimises: a warm start
    trained for cross-entropy has logits of a scale the MSE cost pulls down hard), else
    cross-entropy."""
    if loss != "graph":
        return loss
    kinds = [c.kind for c in eng.cost_list
             if c.target == "label" and c.state == eng.output and c.kind in ("mse", "ce")]
    return kinds[0] if kinds else "ce"


def label_loss(logits, y, kind: str, reduction: str = "mean"):
    """Cross-entropy, or EP's MSE cost 0.5 * ||s - onehot(y)||^2 per sample."""
    if kind == "ce":
        return torch.nn.functional.cross_entropy(logits, y, reduction=reduction)
    per = 0.5 * ((logits - torch.nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype))
                 ** 2).sum(1)
    return per.mean() if reduction == "mean" else per.sum()


def ff_forward(eng: Engine, x, P, energy_acts: bool = False):
    """The feedforward pass of the energy graph (`compiler.reference.feedforward_states`
    with the runtime's kernels), differentiable in `P`: with the source model's activations
    (ReLU where the energy form clips, ReLU6 stays ReLU6), or with the energy form's own
    (`energy_acts`: the bounded activations EP trains with). Teacher states are skipped."""
    vals = feedforward_states(eng.graph, {eng.inputs[0]: x}, P, source_acts=not energy_acts,
                              chain_forward=K.chain_forward, skip_roles=("teacher",))
    return vals[eng.output]


def bp_epoch(eng: Engine, x, y, P: dict, opt, perm, batch_size: int,
             energy_acts: bool = False, sched=None,
             progress: Callable | None = None, loss: str = "ce") -> tuple[float, int]:
    """One backprop epoch over the samples of (x, y) in `perm` order (`loss` 'ce' or
    'mse', as `label_loss`);
    returns the summed loss and the count of correct predictions along the way.
    `progress(seen, total, loss, accuracy)` after every batch."""
    loss_sum, correct, seen = 0.0, 0, 0
    for i in range(0, len(perm), batch_size):
        idx = perm[i:i + batch_size]
        with torch.enable_grad():
            logits = ff_forward(eng, x[idx], P, energy_acts)
            logits = logits.reshape(logits.shape[0], -1)
            value = label_loss(logits, y[idx], loss)
            opt.zero_grad()
            value.backward()
        opt.step()
        if sched is not None:
            sched.step()
        loss_sum += float(value.detach()) * len(idx)
        correct += int((logits.detach().argmax(1) == y[idx]).sum())
        seen += len(idx)
        if progress:
            progress(seen, len(perm), loss_sum / seen, correct / seen)
    return loss_sum, correct


@torch.no_grad()
def ff_evaluate(eng: Engine, x, y, P: dict, energy_acts: bool = False,
                batch_size: int = 256, loss: str = "ce") -> dict:
    """Accuracy and mean loss (`label_loss`) of the feedforward net on a split."""
    correct, total, n = 0, 0.0, x.shape[0]
    for i in range(0, n, batch_size):
        logits = ff_forward(eng, x[i:i + batch_size], P, energy_acts)
        logits = logits.reshape(logits.shape[0], -1)
        yb = y[i:i + batch_size]
        correct += int((logits.argmax(1) == yb).sum())
        total += float(label_loss(logits, yb, loss, reduction="sum"))
    return {"accuracy": correct / max(n, 1), "loss": total / max(n, 1)}


def trainable_params(eng: Engine) -> dict:
    """The engine's weights as leaf tensors, the learnable ones requiring gradients."""
    return {k: v.detach().clone().requires_grad_(k in eng.learnable)
            for k, v in eng.params.items()}


def train_feedforward(eng: Engine, d: Data, *, epochs: int, lr: float,
                      weight_decay: float = 0.0, batch_size: int = 32, seed: int = 0,
                      energy_acts: bool = True, loss: str = "graph",
                      progress: Callable | None = None,
                      on_epoch: Callable | None = None) -> tuple[dict, dict]:
    """Train the feedforward form of `eng`'s graph on `d` by backprop from the engine's
    weights (Adam at `lr` with L2 `weight_decay`, cosine to 0 over the epochs, the loss
    `label_loss_kind(eng, loss)`; `seed` drives the shuffles). Returns (the trained weights as numpy
    arrays, metrics: `initial` and final train/test accuracy and loss, `history`).
    `progress(epoch, seen, total, loss, accuracy)` after every batch, `on_epoch(record)`
    after every epoch."""
    torch.manual_seed(seed)
    P = trainable_params(eng)
    learn = [P[k] for k in eng.learnable]
    if not learn:
        raise EpcError(f"graph {eng.graph.name}: no learnable weight to train")
    opt = torch.optim.Adam(learn, lr=lr, weight_decay=weight_decay)
    n = int(d.train.x.shape[0])
    steps = epochs * -(-n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    x, y = d.train.x.to(eng.device), d.train.y.to(eng.device)
    tx, ty = d.test.x.to(eng.device), d.test.y.to(eng.device)
    kind = label_loss_kind(eng, loss)
    initial = ff_evaluate(eng, tx, ty, P, energy_acts, loss=kind)
    history, t_start = [], time.perf_counter()
    for e in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(eng.device)
        bar = (lambda seen, tot, l, a, e=e: progress(e, seen, tot, l, a)) if progress else None
        loss_sum, correct = bp_epoch(eng, x, y, P, opt, perm, batch_size, energy_acts,
                                     sched, bar, loss=kind)
        secs = time.perf_counter() - t0
        te = ff_evaluate(eng, tx, ty, P, energy_acts, loss=kind)
        if not np.isfinite(loss_sum):
            raise EpcError(f"backprop diverged in epoch {e + 1}: the train loss is "
                           f"{loss_sum}; lower --lr")
        rec = {"epoch": e + 1, "train_loss": loss_sum / max(n, 1),
               "train_accuracy": correct / max(n, 1), "test_accuracy": te["accuracy"],
               "test_loss": te["loss"], "lr": opt.param_groups[0]["lr"], "seconds": secs}
        history.append(rec)
        if on_epoch:
            on_epoch(rec)
    tr = ff_evaluate(eng, x, y, P, energy_acts, loss=kind)
    te = ff_evaluate(eng, tx, ty, P, energy_acts, loss=kind)
    weights = {k: np.ascontiguousarray(P[k].detach().cpu().numpy(), dtype=np.float32)
               for k in eng.learnable}
    return weights, {"initial": {"test_accuracy": initial["accuracy"],
                                 "test_loss": initial["loss"]},
                     "train_accuracy": tr["accuracy"], "train_loss": tr["loss"],
                     "test_accuracy": te["accuracy"], "test_loss": te["loss"],
                     "loss": kind, "seconds": time.perf_counter() - t_start,
                     "history": history}


class FeedForward(torch.nn.Module):
    """The feedforward form of an energy graph as an nn.Module (reference ops, plain torch
    calls, so the ONNX exporter traces standard ops): input -> the output state's values."""

    def __init__(self, graph: Graph, energy_acts: bool = True):
        super().__init__()
        self.graph, self.energy_acts = graph, energy_acts
        skip = {w for s in graph.states if s.role == "teacher" for w in ([s.bias] if s.bias
                                                                          else [])}
        skip |= {w for c in graph.couplings if c.kind == "teacher"
                 for op in c.ops for w in op_weights(op).values()}
        self.names = [k for k, v in graph.weights.items()
                      if isinstance(v, np.ndarray) and k not in skip]
        # parameter names are the weights' names with '.' made '_' (nn.Module's rule)
        for k in self.names:
            self.register_parameter(_param_name(k), torch.nn.Parameter(
                torch.as_tensor(np.asarray(graph.weights[k], dtype=np.float32))))

    def forward(self, x):
        w = {k: getattr(self, _param_name(k)) for k in self.names}
        vals = feedforward_states(self.graph, {self.graph.inputs[0].name: x}, w,
                                  source_acts=not self.energy_acts,
                                  chain_forward=O.chain_forward, skip_roles=("teacher",))
        return vals[self.graph.output_state().name]


def _param_name(k: str) -> str:
    return "w_" + k.replace(".", "_")


def onnx_bytes(graph: Graph, energy_acts: bool = True, opset: int = 17) -> bytes:
    """The feedforward form of `graph` (weights as the graph holds them) as an ONNX model:
    input 'input' [N, *shape], output 'logits' [N, *output shape] (the legacy TorchScript
    exporter, the form epc's ONNX frontend reads)."""
    if len(graph.inputs) != 1:
        raise EpcError(f"graph {graph.name}: ONNX export takes one-input graphs, this has "
                       f"{len(graph.inputs)}")
    m = FeedForward(graph, energy_acts).eval()
    x = torch.zeros((2,) + tuple(graph.inputs[0].shape))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), buf, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return buf.getvalue()
