"""Runtime engine: settling semantics, explicit adjoints vs autograd, data loaders."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from epc.compiler.errors import EpcError
from epc.compiler.reference import forward_sweep
from epc.runtime import zoo
from epc.runtime.data import fit_to_input, load_dataset
from epc.runtime.engine import Engine

torch.set_num_threads(1)


def _batch(eng, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = eng.input_shapes[eng.inputs[0]]
    return eng.prepare(torch.rand((n,) + shape, generator=g, dtype=torch.float64))


def _pool_then_conv(asymmetric: bool = False):
    """zoo.convnet in the order of the ONNX conv nets (conv_digits): h1 -> max-pool -> conv
    -> h2 and h2 -> max-pool -> flatten -> dense -> out, so each chain with feedback ends
    in its weighted op. `asymmetric`: h2's conv is 2x2, padded on one side only."""
    from epc.compiler.ir import Conv, Dense, Flatten, MaxPool
    g = zoo.convnet(channels=(4, 6))
    g.states[0].shape, g.states[1].shape = (4, 8, 8), (6, 4, 4)
    g.coupling("c_h1").ops = [Conv("h1.w", pads=[1, 1, 1, 1])]
    conv = Conv("h2.w", pads=[1, 1, 1, 1])
    if asymmetric:
        g.weights["h2.w"] = (np.random.default_rng(3).uniform(-0.5, 0.5, (6, 4, 2, 2))
                             .astype(np.float32))
        conv = Conv("h2.w", pads=[0, 0, 1, 1])
    g.coupling("c_h2").ops = [MaxPool([2, 2], [2, 2]), conv]
    g.coupling("c_out").ops = [MaxPool([2, 2], [2, 2]), Flatten(), Dense("out.w")]
    return g


GRAPHS = {
    "mlp": lambda: zoo.mlp((64, 32, 10)),
    "pool_conv": _pool_then_conv,
    "pool_conv_asym": lambda: _pool_then_conv(asymmetric=True),
    "conv_max": lambda: zoo.convnet(channels=(4, 6)),
    "conv_avg": lambda: zoo.convnet(channels=(4, 6), pool="avg"),
    "resnet": lambda: zoo.resnet(width=16),
    "tap": lambda: zoo.with_tap(zoo.convnet(channels=(4, 6)), "h1", pool=True),
    "teacher": lambda: zoo.with_teacher(zoo.mlp((64, 32, 10))),
}


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_explicit_drive_equals_autograd_of_phi(name):
    """Each state's drive from explicit couplings/adjoints is dPhi/ds_j (autograd)."""
    eng = Engine(GRAPHS[name](), dtype=torch.float64, pool_freeze=None)
    batch = _batch(eng)
    g = torch.Generator().manual_seed(1)
    S = {j: torch.rand((batch["n"],) + eng.shapes[j], generator=g, dtype=torch.float64)
         for j in eng.settled}
    leaves = {j: v.clone().requires_grad_(True) for j, v in S.items()}
    phi = eng.phi(leaves, batch)
    auto = dict(zip(eng.settled, torch.autograd.grad(phi, [leaves[j] for j in eng.settled])))
    # one sync sweep from S with identity activations gives the raw drives
    from epc.compiler.ir import Activation
    acts = eng.acts
    eng.acts = {k: Activation.identity() for k in acts}
    r = eng.settle(batch, dict(S), max_sweeps=1, mode="sync", tol=0.0)
    eng.acts = acts
    for j in eng.settled:
        torch.testing.assert_close(r.states[j], auto[j], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "resnet", "conv_avg", "tap"])
def test_fixed_point_satisfies_update_rule_and_energy_decreases(name):
    eng = Engine(GRAPHS[name](), dtype=torch.float64)
    batch = _batch(eng)
    r = eng.settle(batch, max_sweeps=400, tol=1e-10, trace=True)
    assert r.unconverged == 0
    energies = [t["energy"] for t in r.trace]
    # block coordinate descent on a bilinear energy never increases it
    assert all(b <= a + 1e-9 for a, b in zip(energies, energies[1:]))
    again = eng.settle(batch, dict(r.states), max_sweeps=1, tol=0.0)
    for j in eng.settled:
        torch.testing.assert_close(again.states[j], r.states[j], rtol=0, atol=1e-9)


def test_colour_and_sync_reach_the_same_fixed_point_colour_faster():
    eng = Engine(zoo.mlp((64, 64, 32, 10)), dtype=torch.float64)
    batch = _batch(eng, 32)
    rc = eng.settle(batch, max_sweeps=1000, tol=1e-8, mode="colour")
    rs = eng.settle(batch, max_sweeps=1000, tol=1e-8, mode="sync")
    assert rc.unconverged == 0 and rs.unconverged == 0
    for j in eng.settled:
        torch.testing.assert_close(rc.states[j], rs.states[j], rtol=0, atol=1e-6)
    assert rc.sweeps * 1.5 <= rs.sweeps


def test_sweep_cap_counts_unconverged_samples():
    eng = Engine(zoo.mlp((64, 64, 32, 10)), dtype=torch.float64)
    batch = _batch(eng, 8)
    r = eng.settle(batch, max_sweeps=2, tol=1e-12)
    assert r.sweeps == 2 and r.unconverged == 8


def test_teacher_states_are_the_feedforward_pass():
    g = GRAPHS["teacher"]()
    eng = Engine(g, dtype=torch.float64)
    x = torch.rand(5, 64, dtype=torch.float64)
    batch = eng.prepare(x)
    ref = forward_sweep(g, {"x": x.numpy()}, lift_bounds=True)
    for t in eng.teacher_order:
        np.testing.assert_allclose(batch["clamped"][t].numpy(), ref[t], atol=1e-12)


def test_routing_freeze_makes_pool_on_state_settle():
    """A max-pool applied to a state (pool after the activation, as ONNX nets have it) makes
    argmax routing cycle; freezing the winners after a few sweeps settles every sample."""
    from epc.compiler.ir import Conv, MaxPool
    g = zoo.convnet(channels=(4, 6))
    # rewrite h1 -> h2 as pool(h1) then conv: pool applied to the state itself
    c = g.coupling("c_h2")
    h1 = g.state("h1")
    g.states[0].shape = (4, 8, 8)
    g.coupling("c_h1").ops = [Conv("h1.w", pads=[1, 1, 1, 1])]
    c.ops = [MaxPool([2, 2], [2, 2]), Conv("h2.w", pads=[1, 1, 1, 1]), MaxPool([2, 2], [2, 2])]
    eng_free = Engine(g, dtype=torch.float64, pool_freeze=None)
    eng = Engine(g, dtype=torch.float64, pool_freeze=10)
    batch = _batch(eng, 16)
    r = eng.settle(batch, max_sweeps=300, tol=1e-9)
    assert r.unconverged == 0 and r.routing is not None
    assert h1.shape == (4, 8, 8)
    rf = eng_free.settle(_batch(eng_free, 16), max_sweeps=300, tol=1e-9)
    assert rf.unconverged > 0   # argmax routing on a state cycles


@pytest.mark.parametrize("name", ["mlp", "conv_max", "resnet", "tap", "teacher"])
def test_settle_pair_equals_the_two_nudged_phases_apart(name):
    """The +-beta phases settled as one 2n batch make the same updates as two settles
    (fixed sweep count), with frozen max-pool routing too; with a tolerance, each half ends
    at the sweep where it would end alone, in the same state."""
    eng = Engine(GRAPHS[name](), dtype=torch.float64)
    batch = _batch(eng, 12)
    y = torch.arange(12) % 10
    free = eng.settle(batch, max_sweeps=60, tol=1e-10)
    rt = eng.routing(free.states, batch) if any(l.needs_ctx for l in eng.links) else None
    kw = dict(labels=y, max_sweeps=7, tol=0.0, routing=rt)
    p = eng.settle(batch, free.states, beta=0.3, **kw)
    m = eng.settle(batch, free.states, beta=-0.3, **kw)
    p2, m2 = eng.settle_pair(batch, free.states, beta=0.3, **kw)
    assert p2.sweeps == m2.sweeps == 7
    for a, b in ((p, p2), (m, m2)):
        moved = max(float((a.states[j] - free.states[j]).abs().max()) for j in eng.settled)
        assert moved > 1e-4                      # the nudge did something to compare
        for j in eng.settled:
            torch.testing.assert_close(a.states[j], b.states[j], rtol=0, atol=1e-12)
    kw.update(max_sweeps=500, tol=1e-9)
    p, m = (eng.settle(batch, free.states, beta=b, **kw) for b in (0.3, -0.3))
    p2, m2 = eng.settle_pair(batch, free.states, beta=0.3, **kw)
    assert (p2.sweeps, m2.sweeps) == (p.sweeps, m.sweeps)
    assert p2.unconverged == m2.unconverged == 0
    for a, b in ((p, p2), (m, m2)):
        torch.testing.assert_close(a.residual, b.residual, rtol=0, atol=1e-12)
        for j in eng.settled:
            torch.testing.assert_close(a.states[j], b.states[j], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "conv_max"])
def test_settled_parts_leave_the_batch_and_the_rest_ends_as_alone(name):
    """Three parts that settle at different sweeps, the middle one first (so the rows left
    are not contiguous): each part ends in the state, residual and sweep count of a settle
    of its rows alone, and the whole result is the parts in batch order."""
    eng = Engine(GRAPHS[name](), dtype=torch.float64)
    x = _batch(eng, 12)["clamped"][eng.inputs[0]]
    kw = dict(max_sweeps=500, tol=1e-9)
    alone = [eng.settle(eng.prepare(x[i:i + 1]), **kw).sweeps for i in range(12)]
    order = sorted(range(12), key=lambda i: alone[i])
    xs = x[order[4:8] + order[:4] + order[8:]]           # fastest samples in the middle
    parts = [slice(0, 4), slice(4, 8), slice(8, 12)]
    r = eng.settle(eng.prepare(xs), parts=parts, **kw)
    sep = [eng.settle(eng.prepare(xs[sl]), **kw) for sl in parts]
    assert sep[1].sweeps < min(sep[0].sweeps, sep[2].sweeps)   # the case this tests
    for a, b, sl in zip(sep, r.parts, parts):
        assert a.sweeps == b.sweeps and a.unconverged == b.unconverged == 0
        torch.testing.assert_close(a.residual, b.residual, rtol=0, atol=1e-12)
        for j in eng.settled:
            torch.testing.assert_close(a.states[j], b.states[j], rtol=0, atol=1e-12)
    assert r.sweeps == max(a.sweeps for a in sep) and r.unconverged == 0
    # the middle part settles at the very sweep cap: the others end there unsettled, with
    # the residual of that last sweep
    kw["max_sweeps"] = sep[1].sweeps
    r = eng.settle(eng.prepare(xs), parts=parts, **kw)
    for sl, b in zip(parts, r.parts):
        a = eng.settle(eng.prepare(xs[sl]), **kw)
        assert a.sweeps == b.sweeps == kw["max_sweeps"] and a.unconverged == b.unconverged
        torch.testing.assert_close(a.residual, b.residual, rtol=0, atol=1e-12)
        for j in eng.settled:
            torch.testing.assert_close(a.states[j], b.states[j], rtol=0, atol=1e-12)
    assert r.parts[0].unconverged > 0 and r.parts[1].unconverged == 0
    assert r.unconverged == sum(p.unconverged for p in r.parts)


# --------------------------------------------------------------------------- data
def test_digits_split_and_shapes():
    d = load_dataset("digits", input_shape=(64,))
    assert d.train.x.shape == (1437, 64) and d.test.x.shape == (360, 64)
    assert float(d.train.x.max()) <= 1.0 and float(d.train.x.min()) >= 0.0
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    raw = load_digits()
    _, xte, _, yte = train_test_split(raw.data, raw.target, test_size=0.2, random_state=0)
    np.testing.assert_allclose(d.test.x.numpy(), xte / 16.0, rtol=1e-6)
    assert (d.test.y.numpy() == yte).all()


def test_resize_and_channels_to_cifar_shape():
    d = load_dataset("digits", input_shape=(3, 32, 32), resize="32")
    assert d.train.x.shape == (1437, 3, 32, 32)
    with pytest.raises(EpcError, match="--resize"):
        load_dataset("digits", input_shape=(3, 32, 32))


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def test_mnist_idx_gz_and_plain(tmp_path):
    rng = np.random.default_rng(0)
    for split, n, gz in (("train", 20, True), ("t10k", 7, False)):
        x = rng.integers(0, 256, (n, 28, 28))
        y = rng.integers(0, 10, n)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            data = _idx_bytes(arr)
            p = tmp_path / f"{split}-{kind}-ubyte"
            if gz:
                (tmp_path / (p.name + ".gz")).write_bytes(gzip.compress(data))
            else:
                p.write_bytes(data)
        if split == "t10k":
            want_x, want_y = x, y
    d = load_dataset("mnist", data_dir=tmp_path, input_shape=(784,))
    assert d.train.x.shape == (20, 784) and d.test.x.shape == (7, 784)
    np.testing.assert_allclose(d.test.x.numpy().reshape(7, 28, 28), want_x / 255.0, rtol=1e-6)
    assert (d.test.y.numpy() == want_y).all()



def test_fashion_mnist_from_a_directory_and_its_default(tmp_path, monkeypatch):
    from epc.runtime import data as D
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("t10k", 5)):
        for kind, arr in (("images-idx3", rng.integers(0, 256, (n, 28, 28))),
                          ("labels-idx1", rng.integers(0, 10, n))):
            (tmp_path / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    d = load_dataset("fashion-mnist", data_dir=tmp_path, input_shape=(1, 28, 28))
    assert d.name == "fashion-mnist" and d.train.x.shape == (12, 1, 28, 28)
    # without --data-dir it reads the Debian package's directory, and says how to get it
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", str(tmp_path))
    assert load_dataset("fashion-mnist", input_shape=(784,)).test.x.shape == (5, 784)
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(EpcError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EpcError, match="Fashion-MNIST idx files not found"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_installed_set_is_the_real_benchmark():
    d = load_dataset("fashion-mnist", input_shape=(784,))
    assert d.train.x.shape == (60000, 784) and d.test.x.shape == (10000, 784)
    assert d.num_classes == 10
    # the published set is balanced: 6,000 training and 1,000 test images per class
    assert torch.bincount(d.train.y).tolist() == [6000] * 10
    assert torch.bincount(d.test.y).tolist() == [1000] * 10
    assert 0.0 <= float(d.train.x.min()) and float(d.train.x.max()) == 1.0

def test_cifar10_binary_and_python_formats(tmp_path):
    rng = np.random.default_rng(0)
    b = tmp_path / "cifar-10-batches-bin"
    b.mkdir()
    recs = {}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = rng.integers(0, 10, 3).astype(np.uint8)
        x = rng.integers(0, 256, (3, 3072)).astype(np.uint8)
        recs[f] = (x, y)
        (b / (f + ".bin")).write_bytes(np.concatenate([y[:, None], x], 1).tobytes())
    d = load_dataset("cifar10", data_dir=tmp_path, input_shape=(3, 32, 32))
    assert d.train.x.shape == (15, 3, 32, 32)
    np.testing.assert_allclose(d.test.x.numpy().reshape(3, -1), recs["test_batch"][0] / 255.0,
                               rtol=1e-6)
    # the python distribution, read by the array-only unpickler
    p = tmp_path / "py" / "cifar-10-batches-py"
    p.mkdir(parents=True)
    for f, (x, y) in recs.items():
        (p / f).write_bytes(pickle.dumps({b"data": x, b"labels": [int(v) for v in y]}))
    d2 = load_dataset("cifar10", data_dir=tmp_path / "py", input_shape=(3, 32, 32))
    torch.testing.assert_close(d2.train.x, d.train.x)
    assert (d2.test.y == d.test.y).all()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_python_cifar_refuses_non_array_pickles(tmp_path):
    p = tmp_path / "cifar-10-batches-py"
    p.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (p / f).write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    with pytest.raises(EpcError, match="refusing to unpickle"):
        load_dataset("cifar10", data_dir=tmp_path, input_shape=(3, 32, 32))


def test_bad_data_inputs(tmp_path):
    with pytest.raises(EpcError, match="unknown data set"):
        load_dataset("imagenet")
    # the Python API's numeric forms get the CLI's checks (not a torch RuntimeError)
    for resize in (-1, 0, (8, 0), "0x8"):
        with pytest.raises(EpcError, match="bad --resize"):
            load_dataset("digits", input_shape=(1, 8, 8), resize=resize)
    with pytest.raises(EpcError, match="bad --channels"):
        load_dataset("digits", input_shape=(1, 8, 8), channels=0)
    with pytest.raises(EpcError, match="no such directory"):
        load_dataset("mnist", data_dir=tmp_path / "nope")
    with pytest.raises(EpcError, match="not found"):
        load_dataset("cifar10", data_dir=tmp_path)
    b = tmp_path / "cifar-10-batches-bin"
    b.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (b / (f + ".bin")).write_bytes(b"\x00" * 100)
    with pytest.raises(EpcError, match="not a multiple"):
        load_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(EpcError, match="labels range"):
        load_dataset("digits", num_classes=5)


def test_fit_to_input_flattens_and_checks():
    x = torch.rand(4, 1, 8, 8)
    assert fit_to_input(x, (64,)).shape == (4, 64)
    with pytest.raises(EpcError):
        fit_to_input(x, (10,))


def _pool_on_state(g):
    """zoo.convnet with h1 -> h2 rewritten as pool(h1) then conv (the ONNX nets' order: a
    max-pool applied to a settled state)."""
    from epc.compiler.ir import Conv, MaxPool
    g.states[0].shape = (4, 8, 8)
    g.coupling("c_h1").ops = [Conv("h1.w", pads=[1, 1, 1, 1])]
    g.coupling("c_h2").ops = [MaxPool([2, 2], [2, 2]), Conv("h2.w", pads=[1, 1, 1, 1]),
                              MaxPool([2, 2], [2, 2])]
    return g


def _conv_resnet():
    """A conv ResNet (identity and projection shortcuts, batch norm, a strided conv),
    compiled by the real pipeline from tests/test_passes.py's builder."""
    from test_passes import compile_, resnet
    # symmetric feedback: under auto's gains (0.1, 0.01 on skips) the two layouts' float64
    # rounding decides where tol=0 settling stops (measured: 40 sweeps against 29)
    return compile_(resnet(), feedback_gain=1)


LAYOUT_GRAPHS = {**{k: GRAPHS[k] for k in ("conv_max", "conv_avg", "tap")},
                 "pool_on_state": lambda: _pool_on_state(zoo.convnet(channels=(4, 6))),
                 "conv_resnet": _conv_resnet}


@pytest.mark.parametrize("name", sorted(LAYOUT_GRAPHS))
def test_channels_last_states_settle_as_nchw(name):
    """Image states live channels-last on CPU by default; free, frozen-routing and nudged
    (pair) settles reach what the NCHW layout reaches, to float64 rounding."""
    g = LAYOUT_GRAPHS[name]()
    cl, nchw = Engine(g, dtype=torch.float64), Engine(g, dtype=torch.float64, channels_last=False)
    assert cl.channels_last == {j for j in cl.settled if len(cl.shapes[j]) == 3} != set()
    assert not nchw.channels_last
    batch, batch0 = _batch(cl, 12), _batch(nchw, 12)
    y = torch.arange(12) % cl.num_classes
    kw = dict(max_sweeps=40, tol=0.0)
    a, b = cl.settle(batch, freeze_after=15, **kw), nchw.settle(batch0, freeze_after=15, **kw)
    for j in cl.channels_last:
        assert a.states[j].is_contiguous(memory_format=torch.channels_last)
        assert not a.states[j].is_contiguous() and b.states[j].is_contiguous()
    rt = cl.routing(a.states, batch) if any(l.needs_ctx for l in cl.links) else None
    rt0 = nchw.routing(b.states, batch0) if rt is not None else None
    pa = cl.settle_pair(batch, a.states, beta=0.3, labels=y, routing=rt, **kw)
    pb = nchw.settle_pair(batch0, b.states, beta=0.3, labels=y, routing=rt0, **kw)
    for ra, rb in ((a, b), *zip(pa, pb)):
        assert ra.sweeps == rb.sweeps
        for j in cl.settled:
            torch.testing.assert_close(ra.states[j], rb.states[j], rtol=0, atol=1e-11)
        torch.testing.assert_close(ra.residual, rb.residual, rtol=0, atol=1e-11)
    assert max(float((pa[0].states[j] - a.states[j]).abs().max()) for j in cl.settled) > 1e-4


def _mobile():
    """Depthwise and pointwise convs, a learnable channel scale before a dense readout
    (a chain with two learnable weights), compiled from tests/test_passes.py's builder."""
    from test_passes import compile_, mobile
    return compile_(mobile())


GRAD_GRAPHS = {**{k: GRAPHS[k] for k in ("conv_max", "pool_conv", "pool_conv_asym")},
               "conv_resnet": _conv_resnet, "mobile": _mobile}
# chain couplings (input ones included) whose one learnable weight is their last op's
DIRECT_CHAINS = {"conv_max": 0, "pool_conv": 3, "pool_conv_asym": 3, "conv_resnet": 7,
                 "mobile": 3}


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("name", sorted(GRAD_GRAPHS))
def test_direct_weight_gradients_equal_autograd_through_phi(name, channels_last, monkeypatch):
    """A chain whose one learnable weight is its last op (max-pool -> conv, a conv, flatten ->
    dense) gets dPhi/dW(s+) - dPhi/dW(s-) from the op's weight gradient, without applying
    the op; it equals autograd through Phi, with live and with frozen max-pools."""
    from epc.runtime import learn
    eng = Engine(GRAD_GRAPHS[name](), dtype=torch.float64, channels_last=channels_last)
    batch = _batch(eng, 12)
    y = torch.arange(12) % eng.num_classes
    free = eng.settle(batch, max_sweeps=30, tol=0.0)
    rt = eng.routing(free.states, batch) if any(l.needs_ctx for l in eng.links) else None
    plus, minus = eng.settle_pair(batch, free.states, beta=0.3, labels=y, routing=rt,
                                  max_sweeps=20, tol=0.0)
    direct = learn._last_op_grad_diff
    for routing in (None, rt) if rt is not None else (None,):
        took = []

        def counted(*a, **kw):
            g = direct(*a, **kw)
            took.append(g is not None)
            return g

        monkeypatch.setattr(learn, "_last_op_grad_diff", counted)
        fast = learn.phi_grad_diff(eng, batch, plus.states, minus.states, routing)
        monkeypatch.setattr(learn, "_last_op_learns_alone", lambda l, learn_: False)
        auto = learn.phi_grad_diff(eng, batch, plus.states, minus.states, routing)
        monkeypatch.undo()
        # every conv / dense-ended chain took the direct form (conv_max's end in a pool)
        assert took == [True] * DIRECT_CHAINS[name]
        assert fast.keys() == auto.keys() == set(eng.learnable)
        for k in fast:
            torch.testing.assert_close(fast[k], auto[k], rtol=1e-10, atol=1e-12)


def test_direct_weight_gradient_only_where_the_last_op_learns_alone():
    from epc.compiler.ir import ChannelScale, Conv, Flatten, MaxPool
    from epc.runtime.engine import Link
    from epc.runtime.learn import _last_op_learns_alone

    def link(*ops):
        return Link("c", "a", "b", list(ops), "forward", True, "chain", None, (2, 4, 4),
                    any(isinstance(o, MaxPool) for o in ops))
    conv = Conv("w", pads=[1, 1, 1, 1])
    assert _last_op_learns_alone(link(MaxPool([2, 2], [2, 2]), conv), {"w"})
    assert _last_op_learns_alone(link(ChannelScale("cs"), conv), {"w"})      # cs frozen
    assert not _last_op_learns_alone(link(ChannelScale("cs"), conv), {"w", "cs"})
    assert not _last_op_learns_alone(link(conv, MaxPool([2, 2], [2, 2])), {"w"})
    assert not _last_op_learns_alone(link(conv), set())                       # w frozen
    assert not _last_op_learns_alone(link(conv, Flatten()), {"w"})
