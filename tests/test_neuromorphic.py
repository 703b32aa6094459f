"""The neuromorphic target: parity with the float runtime, an independent integer reference,
the assembly/binary forms, the validator's refusals, and on-chip learning."""
from __future__ import annotations

import os
import re
import struct
import zlib

import numpy as np
import pytest
import torch

from epc.compiler.errors import EpcError
from epc.compiler.options import CompileOptions
from epc.api import compile_source
from epc.runtime import programs
from epc.runtime.simulator import Simulator
from epc.targets.neuromorphic import api
from epc.targets.neuromorphic.assembler import assemble, disassemble
from epc.targets.neuromorphic.binary import from_bytes, to_bytes
from epc.targets.neuromorphic.isa import BETA_FRAC, COST_WEIGHT_FRAC
from epc.targets.neuromorphic.quantize import quantize_graph
from epc.targets.neuromorphic.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")


def _digits(shape):
    xtr, ytr, xte, yte = programs.program_dataset("digits", shape, num_classes=10)
    return xtr, ytr, xte, yte


def _calibrated(g, path, **kw):
    """A program calibrated on digits, compiled as `epc compile --calibrate digits` does."""
    import epc
    epc.compile(g, target="neuromorphic", output=path, calibrate="digits", **kw)
    return api.load_program(path)


@pytest.fixture(scope="module")
def mlp():
    """The example MLP compiled to an energy graph, its weights trained by backprop (fast)."""
    torch.manual_seed(0)
    g = compile_source(os.path.join(EX, "mlp_digits.onnx"), CompileOptions(target="neuromorphic")).graph
    xtr, ytr, xte, yte = _digits(g.inputs[0].shape)
    c1, c2 = g.couplings
    h, o = g.states
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    x, y = torch.as_tensor(xtr, dtype=torch.float32), torch.as_tensor(ytr)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), torch.nn.functional.one_hot(y, 10).float())
        loss.backward()
        opt.step()
    g.weights[c1.ops[0].weight] = net[0].weight.detach().numpy() * 0.5
    g.weights[h.bias] = net[0].bias.detach().numpy() * 0.5
    g.weights[c2.ops[0].weight] = net[2].weight.detach().numpy() * 0.5
    g.weights[o.bias] = net[2].bias.detach().numpy()
    return g, (xtr, ytr, xte, yte)


def _float_predictions(g, x):
    from epc.runtime.api import make_engine
    eng, _, _ = make_engine(g, dtype="float64")
    r = eng.settle(eng.prepare(torch.as_tensor(x)), tol=0.0, max_sweeps=200)
    return eng.predict(r.states).numpy()


# --------------------------------------------------------------------------- parity
def test_mlp_parity_8bit_and_4bit(mlp, tmp_path):
    g, (xtr, ytr, xte, yte) = mlp
    pf = _float_predictions(g, xte)
    acc_f = (pf == yte).mean()
    assert acc_f > 0.9
    prog = api.compile_program(g, tmp_path / "m8.nc")
    m = programs.evaluate_program(prog, xte, yte)
    assert abs(m["test_accuracy"] - acc_f) <= 0.003 + 1e-9
    assert (m["predictions"] == pf).mean() >= 0.99
    assert m["unsettled"] == 0 and m["overflows"] == 0
    assert 1 <= m["median_sweeps"] <= m["max_sweeps"] <= prog.phase("free").sweeps
    p4 = _calibrated(g, tmp_path / "m4.nc", weight_bits=4)
    m4 = programs.evaluate_program(p4, xte, yte)
    assert m4["test_accuracy"] >= acc_f - 0.015
    assert p4.mem(g.couplings[0].ops[0].weight.join(("w.", ""))).bits == 4


def test_results_do_not_depend_on_batching(mlp):
    g, (_, _, xte, _) = mlp
    prog = quantize_graph(g)
    a = Simulator(prog).free(xte[:40])
    b = Simulator(prog).free(xte[:17])
    for name in a.states:
        assert torch.equal(a.states[name][:17], b.states[name])
    assert (a.sweeps[:17] == b.sweeps).all()


# --------------------------------------------------------------------------- reference
def _rshift(v: np.ndarray, sh: int) -> np.ndarray:
    return (v + (1 << (sh - 1))) >> sh if sh > 0 else v << (-sh)


def _conv(x, M, op):
    assert op.groups == 1 and tuple(op.dilation) == (1, 1)
    pt, pl, pb, pr = op.pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    kh, kw = M.shape[2:]
    sh, sw = op.stride
    ho, wo = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    out = np.zeros((x.shape[0], M.shape[0], ho, wo), np.int64)
    for a in range(kh):
        for b in range(kw):
            win = xp[:, :, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw]
            out += np.einsum("nchw,oc->nohw", win, M[:, :, a, b])
    return out


def _conv_t(g, M, op, in_shape):
    pt, pl, pb, pr = op.pads
    n, c, h, w = in_shape
    kh, kw = M.shape[2:]
    sh, sw = op.stride
    ho, wo = g.shape[2:]
    xp = np.zeros((n, c, h + pt + pb, w + pl + pr), np.int64)
    for a in range(kh):
        for b in range(kw):
            xp[:, :, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw] += \
                np.einsum("nohw,oc->nchw", g, M[:, :, a, b])
    return xp[:, :, pt:pt + h, pl:pl + w]


class IntReference:
    """A direct int64 interpreter of a program's free phase (no torch, no float): the
    docs/isa.md arithmetic re-implemented for dense, conv, gsum, flatten and identity chains."""

    def __init__(self, prog):
        self.p = prog
        self.mem = {m.name: m for m in prog.memories}
        self.grp = {g.name: g for g in prog.groups}

    def weight(self, op):
        M = self.mem[op.w].data.astype(np.int64)
        e = self.mem[op.e].data.astype(np.int64).reshape(-1)
        if e.size > 1:
            M = M << (e - e.min()).reshape((-1,) + (1,) * (M.ndim - 1))
        return M, int(e.min())

    def chain(self, syn, x, adjoint=None):
        shift, mult, shapes = 0, 1, []
        for op in syn.ops:
            shapes.append(x.shape)
            if op.kind == "dense":
                M, e = self.weight(op)
                x, shift = x @ M.T, shift - e
            elif op.kind == "conv":
                M, e = self.weight(op)
                x, shift = _conv(x, M, op), shift - e
            elif op.kind == "gsum":
                x = x.sum(axis=(2, 3), keepdims=op.keepdims)
                shift, mult = shift + op.rshift, mult * op.rmul
            elif op.kind == "flatten":
                x = x.reshape(x.shape[0], -1)
            elif op.kind != "identity":
                raise NotImplementedError(op.kind)
        if adjoint is None:
            return _rshift(x * mult, shift)
        g = adjoint
        for op, shp in zip(reversed(syn.ops), reversed(shapes)):
            if op.kind == "dense":
                g = g @ self.weight(op)[0]
            elif op.kind == "conv":
                g = _conv_t(g, self.weight(op)[0], op, shp)
            elif op.kind == "gsum":
                g = np.broadcast_to(g.reshape(g.shape[0], -1, 1, 1), shp).copy()
            elif op.kind == "flatten":
                g = g.reshape(shp)
        return _rshift(g * mult, shift)

    def free(self, x: np.ndarray, sweeps: int) -> dict:
        F = self.p.frac_bits
        im = self.mem[self.p.inputs[0]]
        s = {im.name: np.clip(np.floor(x * (1 << F) + 0.5).astype(np.int64), im.lo, im.hi)}
        for g in self.p.groups:
            s[g.name] = np.zeros((len(x), *self.mem[g.mem].shape), np.int64)
        for _ in range(sweeps):
            for cls in self.p.phase("free").classes:
                new = {}
                for name in cls:
                    g = self.grp[name]
                    u = np.zeros_like(s[name])
                    for syn in self.p.synapses:
                        if syn.dst == name:
                            u = u + self.chain(syn, s[syn.src])
                        if syn.src == name and syn.feedback:
                            u = u + self.chain(syn, s[name], adjoint=s[syn.dst])
                    if g.bias:
                        u = u + self.mem[g.bias].data.astype(np.int64)
                    new[name] = np.clip(u, g.lo, g.hi)
                s.update(new)
        return s


def test_mlp_matches_independent_integer_reference(mlp):
    g, (_, _, xte, _) = mlp
    prog = quantize_graph(g, weight_bits=6, per_channel=True)
    prog.phase("free").sweeps = 4
    sim = Simulator(prog).free(xte[:50]).states
    ref = IntReference(prog).free(xte[:50], 4)
    for gr in prog.groups:
        assert np.array_equal(sim[gr.name].numpy().astype(np.int64), ref[gr.name]), gr.name


def test_resnet13_compiles_and_matches_integer_reference(tmp_path):
    g = compile_source(os.path.join(EX, "resnet13.onnx"), CompileOptions(target="neuromorphic")).graph
    prog = api.compile_program(g, tmp_path / "r13.nc")
    again = api.load_program(tmp_path / "r13.nc")
    assert to_bytes(again) == to_bytes(prog)
    kinds = {op.kind for s in prog.synapses for op in s.ops}
    assert {"conv", "gsum", "dense", "identity"} <= kinds
    assert any(s.kind == "residual" for s in prog.synapses)
    prog.phase("free").sweeps = 2
    x = np.random.default_rng(0).random((2, 3, 32, 32))
    sim = Simulator(prog)
    got = sim.free(x).states
    ref = IntReference(prog).free(x, 2)
    for gr in prog.groups:
        assert np.array_equal(got[gr.name].numpy().astype(np.int64), ref[gr.name]), gr.name
    assert any(ref[gr.name].any() for gr in prog.groups)   # the check is not vacuous


# --------------------------------------------------------------------------- forms
def test_assembly_and_binary_round_trip(mlp, tmp_path):
    g, _ = mlp
    prog = quantize_graph(g, weight_bits=5, per_channel=True)
    text = disassemble(prog)
    back = assemble(text)
    assert disassemble(back) == text
    blob = to_bytes(back)
    assert blob[:6] == b"EPCNC\x00"
    assert disassemble(from_bytes(blob)) == text
    # 5-bit weights are bit-packed: the binary is smaller than one byte per weight
    nweights = sum(m.size for m in prog.memories if m.kind == "weight")
    assert len(blob) < nweights
    api.save_program(prog, tmp_path / "p.nca")
    api.save_program(prog, tmp_path / "p.nc")
    assert api.is_program(tmp_path / "p.nca") and api.is_program(tmp_path / "p.nc")
    assert to_bytes(api.load_program(tmp_path / "p.nca")) == to_bytes(api.load_program(tmp_path / "p.nc"))
    assert not api.is_program(os.path.join(EX, "mlp_digits.onnx"))


def _cli(args, capsys):
    from epc.cli import main
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture
def small_prog(mlp, tmp_path):
    g, _ = mlp
    path = tmp_path / "p.nc"
    api.compile_program(g, path)
    return path


def test_corrupt_binaries_are_refused(small_prog, tmp_path, capsys):
    blob = small_prog.read_bytes()
    cases = {"trunc.nc": blob[:len(blob) // 2], "flip.nc": blob[:100] + bytes([blob[100] ^ 4]) + blob[101:]}
    body = bytearray(blob[:-4])
    struct.pack_into("<H", body, 6, 9)           # a newer version, with a valid CRC
    cases["newer.nc"] = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    want = {"trunc.nc": "truncated", "flip.nc": "CRC32", "newer.nc": "newer"}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(EpcError, match=want[name]):
            api.load_program(p)
        code, err = _cli(["run", str(p)], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("epc: error:"), (name, err)


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def test_bad_assembly_is_refused_naming_the_instruction(small_prog, tmp_path, capsys):
    prog = api.load_program(small_prog)
    text = disassemble(prog)
    hid, obias = prog.groups[0].name, prog.output_group().bias
    first_w = next(line for line in text.splitlines() if line.startswith(".mem w."))
    wname = first_w.split()[1]
    ename = "e." + wname[2:]
    edits = {
        "typo": (_edit(text, "  dense w=", "  dnese w="), "unknown synapse op 'dnese'"),
        "width": (_edit(text, first_w, first_w.replace(" s8 ", " s40 ")), f".mem {wname}: width s40"),
        "newer": (_edit(text, ".epc-nc 1", ".epc-nc 7"), "newer"),
        "exp": (_edit(text, f".data {ename}\n  ", f".data {ename}\n  30 ; "),
                "overflows the 32-bit accumulator"),
        "ref": (_edit(text, f"update {hid}\n", "update nothere\n"), "unknown group nothere"),
        "word": (re.sub(rf"(\.data {re.escape(obias)}\n  )-?\d+", r"\g<1>99999", text),
                 "does not fit s16"),
    }
    for name, (bad, msg) in edits.items():
        p = tmp_path / f"{name}.nca"
        p.write_text(bad)
        with pytest.raises(EpcError) as ei:
            api.load_program(p)
        assert msg in str(ei.value), (name, str(ei.value))
        code, err = _cli(["run", str(p)], capsys)
        assert code == 2 and len(err) == 1 and "Traceback" not in err[0], (name, err)


def test_unsupported_graphs_are_refused_at_compile_time(mlp, tmp_path):
    g, _ = mlp
    g2 = g.copy()
    g2.costs[0].kind = "ce"
    with pytest.raises(EpcError, match="softmax"):
        api.compile_program(g2, tmp_path / "x.nc")
    with pytest.raises(EpcError, match="weight-bits"):
        api.compile_program(g, tmp_path / "x.nc", weight_bits=3)
    assert not (tmp_path / "x.nc").exists()


# --------------------------------------------------------------------------- learning
def test_nudge_and_learning_arithmetic(mlp):
    """One learning step: the nudge is antisymmetric and every mantissa change is the EP
    correlation difference scaled by 2^-shift, rounded down or up (stochastic rounding)."""
    g, (xtr, ytr, _, _) = mlp
    prog = quantize_graph(g)
    sim = Simulator(prog)
    x, y = xtr[:16], ytr[:16]
    free = sim.free(x)
    t = sim.label_target(y)
    sp = sim.settle(free.states, "nudge+", y=t, sign=1).states
    sm = sim.settle(free.states, "nudge-", y=t, sign=-1).states
    out = prog.output_group().name
    assert not torch.equal(sp[out], sm[out])
    syn = prog.synapses[1]
    w = syn.ops[0].w
    before = prog.mem(w).data.copy()
    hid = syn.src
    corr = (sp[out].numpy().T @ sp[hid].numpy() - sm[out].numpy().T @ sm[hid].numpy())
    e = int(prog.mem(syn.ops[0].e).data[0])
    shift = prog.lr_shift + 2 * prog.frac_bits + (-e) + e + e
    sim.learn_step(sp, sm)
    dm = prog.mem(w).data - before
    exact = corr / 2.0 ** shift
    assert np.all((dm == np.floor(exact)) | (dm == np.ceil(exact)))
    assert np.abs(dm).sum() > 0
    assert prog.rng_step == 1


def test_on_chip_learning_is_reproducible_and_learns(tmp_path):
    g = compile_source(os.path.join(EX, "mlp_digits.onnx"), CompileOptions(target="neuromorphic")).graph
    api.compile_program(g, tmp_path / "u.nc")
    before = programs.run_program(tmp_path / "u.nc", limit=200)
    kw = dict(epochs=1, lr_shift=10, beta=0.5, limit=480)
    m1 = programs.train_program(tmp_path / "u.nc", out=tmp_path / "t1.nc", **kw)
    m2 = programs.train_program(tmp_path / "u.nc", out=tmp_path / "t2.nc", **kw)
    assert (tmp_path / "t1.nc").read_bytes() == (tmp_path / "t2.nc").read_bytes()
    assert m1["test_accuracy"] > before["test_accuracy"] + 0.3
    t = api.load_program(tmp_path / "t1.nc")
    assert t.rng_step == 15 and t.lr_shift == 10
    assert all(np.abs(m.data).max() <= (1 << (m.bits - 1)) - 1 for m in t.memories if m.kind == "weight")
    m3 = programs.train_program(tmp_path / "u.nc", seed=1, **kw)
    assert m3["test_accuracy"] != m1["test_accuracy"] or m3["history"] != m1["history"]


@pytest.mark.parametrize("example, sharing, shift", [
    ("mlp_digits", 1, 9), ("mlp3_digits", 1, 9), ("conv1_digits", 64, 12)])
def test_default_lr_shift_follows_the_weight_sharing(example, sharing, shift):
    """The program's learning rate is 2^-lr_shift per batch-summed step: a kernel shared
    over P positions sums P correlations, so the default shift adds log2(P)/2 (dense
    layers keep the old shift, and their programs their bytes)."""
    from epc.targets.neuromorphic.quantize import weight_sharing
    g = compile_source(os.path.join(EX, f"{example}.onnx"),
                       CompileOptions(target="neuromorphic")).graph
    assert weight_sharing(g) == sharing
    assert quantize_graph(g).lr_shift == shift


def test_conv_program_learning_at_the_default_shift_does_not_saturate():
    """conv1_digits on chip: three batches at the dense layers' shift 9 pin thousands of
    kernel and weight mantissas at the 8-bit bound (one epoch then ends at chance, 9.7%);
    at its default shift 12 none saturate (one epoch: 37% on 480 samples, 3 epochs 85.6%)."""
    g = compile_source(os.path.join(EX, "conv1_digits.onnx"),
                       CompileOptions(target="neuromorphic")).graph
    xtr, ytr, _, _ = programs.program_dataset("digits", (1, 8, 8), num_classes=10)
    saturated = {}
    for shift in (None, 9):
        p = quantize_graph(g)
        p.lr_shift = p.lr_shift if shift is None else shift
        sim = Simulator(p)
        for b in range(3):
            sim.train_batch(xtr[b * 32:(b + 1) * 32], ytr[b * 32:(b + 1) * 32])
        saturated[p.lr_shift] = sum(int((np.abs(m.data) >= (1 << (m.bits - 1)) - 1).sum())
                                    for m in sim.p.memories if m.kind == "weight")
    assert saturated == {12: 0, 9: saturated[9]} and saturated[9] > 1000, saturated


# --------------------------------------------------------------------------- max-pool rules
@pytest.fixture(scope="module")
def conv():
    """The example conv net (two max-pools on settled states), trained briefly by backprop."""
    torch.manual_seed(0)
    g = compile_source(os.path.join(EX, "conv_digits.onnx"), CompileOptions(target="neuromorphic")).graph
    xtr, ytr, xte, yte = _digits(g.inputs[0].shape)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.Hardtanh(0, 1), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.Hardtanh(0, 1), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    x, y = torch.as_tensor(xtr, dtype=torch.float32), torch.as_tensor(ytr)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), nn.functional.one_hot(y, 10).float()).backward()
        opt.step()
    W = {"conv1.weight": net[0].weight, "conv2.weight": net[3].weight, "fc.weight": net[7].weight,
         "h1.bias": net[0].bias.reshape(-1, 1, 1), "h2.bias": net[3].bias.reshape(-1, 1, 1),
         "out.bias": net[7].bias}
    for k, v in W.items():
        assert g.weights[k].shape == tuple(v.shape)
        g.weights[k] = v.detach().numpy().astype(np.float32) * (1.0 if k == "out.bias" else 0.3)
    return g, xte[:48], yte[:48]


def test_conv_maxpool_settles_with_the_winner_rules_and_matches_float(conv, tmp_path):
    g, x, y = conv
    from epc.runtime.api import make_engine
    eng, _, _ = make_engine(g, dtype="float64")
    pf = eng.predict(eng.settle(eng.prepare(torch.as_tensor(x))).states).numpy()
    assert (pf == y).mean() > 0.4          # well above chance (0.1): a meaningful net
    prog = api.compile_program(g, tmp_path / "c8.nca")
    assert prog.pool_freeze == eng.pool_freeze == 20
    assert [ph.hold_pool for ph in prog.phases] == [False, True, True]
    text = (tmp_path / "c8.nca").read_text()
    assert text.startswith(".epc-nc 2") and "pool_freeze=20" in text and "pool=free" in text
    assert to_bytes(api.load_program(tmp_path / "c8.nca")) == to_bytes(prog)
    sim = Simulator(prog)
    pi, r = sim.predict(x)
    assert r.settled.all() and not r.cycled.any()
    assert r.sweeps.max() <= prog.phase("free").sweeps
    assert (pi == pf).mean() >= 0.95
    # the rules are what makes it settle: with live winners throughout, samples keep moving
    prog.pool_freeze = 0
    r0 = Simulator(prog).free(x)
    assert (~r0.settled).sum() > len(x) // 2
    # frozen winners per sample do not depend on batching, and a nudged phase keeps them
    prog.pool_freeze = 20
    a, b = Simulator(prog).free(x[:20]), Simulator(prog).free(x[:7])
    for name in a.states:
        assert torch.equal(a.states[name][:7], b.states[name])
    for k, v in a.routing.items():
        for ta, tb in zip(v, b.routing[k]):
            assert (ta is None and tb is None) or torch.equal(ta[:7], tb)
    sp = Simulator(prog).settle(a.states, "nudge+", y=sim.label_target(y[:20]), sign=1,
                                routing=a.routing)
    assert sp.froze.all()
    for k, v in sp.routing.items():
        for ta, tb in zip(v, a.routing[k]):
            assert (ta is None and tb is None) or torch.equal(ta, tb)


def test_version_2_fields_are_refused_in_a_version_1_program(small_prog):
    text = disassemble(api.load_program(small_prog))
    assert text.startswith(".epc-nc 1\n") and "pool" not in text   # an MLP stays version 1
    text = re.sub(r"(\.config [^\n]*)", r"\1 pool_freeze=20", text, count=1)
    with pytest.raises(EpcError, match="pool_freeze= needs program format version 2"):
        assemble(text)


# --------------------------------------------------------------------------- calibration
def test_compensated_rounding_lowers_the_output_error_on_real_inputs(mlp, conv):
    from epc.targets.neuromorphic.calibrate import op_input_grams, round_compensated
    from epc.targets.neuromorphic.quantize import quantize_weight
    g, (xtr, _, _, _) = mlp
    c = g.couplings[0]                                    # input -> h1, dense
    w = np.asarray(g.weights[c.ops[0].weight], dtype=np.float64)
    m, e = quantize_weight(w, 4, False)
    grams = op_input_grams(c, 0, xtr[:256], g.weights)
    assert len(grams) == 1
    np.testing.assert_allclose(grams[0], xtr[:256].T @ xtr[:256], rtol=1e-12)
    mc = round_compensated(w, e, 7, grams)
    assert mc.shape == w.shape and np.abs(mc).max() <= 7
    step = 2.0 ** float(e[0])
    out_err = [float(((((mq * step) - w) @ xtr.T) ** 2).sum()) for mq in (m, mc)]
    assert out_err[1] < 0.5 * out_err[0]                  # on all of train, not just the 256
    # a conv: w H w^T per output channel is the energy of that channel's conv output
    gc, xc, _ = conv
    cc = gc.couplings[0]
    op = cc.ops[0]
    wc = np.asarray(gc.weights[op.weight], dtype=np.float64)
    hc = op_input_grams(cc, 0, xc, gc.weights, chunk=5)[0]
    y = torch.nn.functional.conv2d(torch.as_tensor(xc), torch.as_tensor(wc), stride=op.stride,
                                   padding=(op.pads[0], op.pads[1]))
    rows = wc.reshape(wc.shape[0], -1)
    np.testing.assert_allclose(np.einsum("oi,ij,oj->o", rows, hc, rows),
                               (y.numpy() ** 2).sum((0, 2, 3)), rtol=1e-9)


def test_bias_correction_removes_the_mean_drive_error(mlp):
    """Checked against numpy: the correction of h1's bias is minus the mean of the forward
    error (W_q - W) x plus the feedback error (W2_q - W2)^T y over the calibration samples."""
    from epc.targets.neuromorphic.calibrate import bias_corrections
    g, (xtr, _, _, _) = mlp
    c1, c2 = g.couplings
    h, o = g.states
    acts = programs.calibration_acts(g, "digits")
    w1, w2 = (np.asarray(g.weights[c.ops[0].weight], dtype=np.float64) for c in (c1, c2))
    rounded = {c1.ops[0].weight: np.round(w1 * 8) / 8, c2.ops[0].weight: np.round(w2 * 8) / 8}
    corr = bias_corrections(g, acts, rounded)
    x, hs, ys = acts[c1.src], acts[h.name], acts[o.name]
    d1, d2 = rounded[c1.ops[0].weight] - w1, rounded[c2.ops[0].weight] - w2
    np.testing.assert_allclose(corr[h.bias], -((x @ d1.T).mean(0) + (ys @ d2).mean(0)),
                               atol=1e-12)
    np.testing.assert_allclose(corr[o.bias], -(hs @ d2.T).mean(0), atol=1e-12)
    assert np.abs(corr[h.bias]).max() > 1e-4              # a real shift, not a no-op


def test_calibrated_4bit_program_beats_plain_rounding(mlp, tmp_path):
    g, (_, _, xte, yte) = mlp
    plain = quantize_graph(g, weight_bits=4)
    cal = _calibrated(g, tmp_path / "m4.nc", weight_bits=4)
    assert cal.meta["scales"] == "calibrated"
    a_plain = programs.evaluate_program(validate(plain), xte, yte)["test_accuracy"]
    a_cal = programs.evaluate_program(cal, xte, yte)["test_accuracy"]
    pf = _float_predictions(g, xte)
    assert a_cal >= a_plain and a_cal >= (pf == yte).mean() - 0.01


def test_per_channel_exponents_of_a_dead_row_stay_within_the_span(mlp, tmp_path):
    """Weight decay leaves dead neurons with near-zero rows; their tiny exponents must not
    scale the other rows up in the accumulator (this once failed validation, 2^31.8)."""
    import copy
    from epc.targets.neuromorphic.quantize import MAX_EXP_SPAN, quantize_weight
    g, (_, _, xte, yte) = mlp
    g = copy.deepcopy(g)
    wname = g.couplings[0].ops[0].weight
    w = np.array(g.weights[wname], dtype=np.float32)
    w[:4] *= 1e-5                                          # four dead rows
    g.weights[wname] = w
    _, e = quantize_weight(w, 4, True)
    assert e.max() - e.min() == MAX_EXP_SPAN
    assert (e[4:] > e.max() - MAX_EXP_SPAN).all()          # live rows keep their own
    wz = w.copy()
    wz[4] = 0.0                                            # an all-zero row sets no scale
    _, ez = quantize_weight(wz, 4, True)
    np.testing.assert_array_equal(np.delete(ez, 4), np.delete(e, 4))
    assert ez[4] == e[5:].max()
    prog = _calibrated(g, tmp_path / "pc.nc", weight_bits=4, per_channel=True)
    m = programs.evaluate_program(prog, xte, yte)
    acc_f = (_float_predictions(g, xte) == yte).mean()
    assert m["overflows"] == 0 and m["test_accuracy"] >= acc_f - 0.02
