"""StochEP on the neuromorphic core: bernoulli groups in a fixed-point program.

The program's spike generators (xorshift32 per unit), integer rate traces, spike inputs
accumulated as additions into current traces, exact time-step phases with their means,
and on-chip EP learning from the nudged phases' integer rates (docs/isa.md, Spikes). The
simulator is checked bit for bit against an independent integer reference written here
from the ISA text, against itself across batch sizes and resumed training, and in the
mean against the float runtime; corrupted spike generators are refused in one line."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from epc.api import compile_source
from epc.compiler.errors import EpcError
from epc.compiler.options import CompileOptions
from epc.runtime import programs
from epc.runtime.simulator import Simulator
from epc.targets.neuromorphic import api
from epc.targets.neuromorphic.assembler import assemble, disassemble
from epc.targets.neuromorphic.binary import from_bytes, to_bytes
from epc.targets.neuromorphic.isa import format_version
from epc.targets.neuromorphic.quantize import quantize_graph
from epc.targets.neuromorphic.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")


def _graph(**kw):
    opts = CompileOptions(target="neuromorphic", neuron="bernoulli", **kw)
    return compile_source(os.path.join(EX, "mlp_digits.onnx"), opts).graph


@pytest.fixture(scope="module")
def digits():
    return programs.program_dataset("digits", (64,), num_classes=10)


@pytest.fixture(scope="module")
def trained(digits):
    """The example MLP with bernoulli hidden neurons (32 free / 16 nudged time steps,
    trace:8), its weights those of the same net with clip(0, 1) rate units trained by
    backprop (its mean-field limit), so its spiking forms classify well."""
    torch.manual_seed(0)
    g = _graph(time_steps=32, nudge_time_steps=16)
    xtr, ytr, _, _ = digits
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Hardtanh(0, 1),
                              torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    x, y = torch.as_tensor(xtr, dtype=torch.float32), torch.as_tensor(ytr)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), torch.nn.functional.one_hot(y, 10).float()).backward()
        opt.step()
    c1, c2 = g.couplings
    h, o = g.states
    g.weights[c1.ops[0].weight] = net[0].weight.detach().numpy()
    g.weights[h.bias] = net[0].bias.detach().numpy()
    g.weights[c2.ops[0].weight] = net[2].weight.detach().numpy()
    g.weights[o.bias] = net[2].bias.detach().numpy()
    return g


# --------------------------------------------------------------------------- the program
def test_program_round_trip_and_fields(trained, tmp_path):
    prog = api.compile_program(trained, tmp_path / "s.nc")
    assert format_version(prog) == 3 and prog.spike_seed != 0
    h = prog.group("h1")
    assert (h.neuron, h.tau_shift, h.lo, h.hi) == ("bernoulli", 3, 0, 255)
    assert prog.output_group().neuron == "rate"          # the linear readout stays rate
    assert [(p.name, p.sweeps, p.mean, p.noise) for p in prog.phases] == [
        ("free", 32, 16, ""), ("nudge+", 16, 8, "free"), ("nudge-", 16, 8, "free")]
    text = disassemble(prog)
    assert "neuron=bernoulli tau_shift=3" in text and "spike_seed=" in text
    assert disassemble(assemble(text)) == text
    assert disassemble(from_bytes(to_bytes(prog))) == text
    api.save_program(prog, tmp_path / "s.nca")
    assert disassemble(api.load_program(tmp_path / "s.nca")) == text
    assert disassemble(api.load_program(tmp_path / "s.nc")) == text
    # independent sampling: the nudged phases seed their own generators
    g2 = _graph(time_steps=16, nudge_time_steps=9, sampling="independent")
    p2 = quantize_graph(g2)
    assert [(p.sweeps, p.mean, p.noise) for p in p2.phases] == [
        (16, 8, ""), (9, 5, "own"), (9, 5, "own")]


def test_rate_programs_are_unchanged_version_1():
    g = compile_source(os.path.join(EX, "mlp_digits.onnx"),
                       CompileOptions(target="neuromorphic")).graph
    prog = quantize_graph(g)
    text = disassemble(prog)
    assert format_version(prog) == 1 and text.startswith(".epc-nc 1\n")
    assert "spike_seed" not in text and "neuron=" not in text and "mean=" not in text


# --------------------------------------------------------------------------- bit-exact
M32 = 0xFFFFFFFF


def _h(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _rshift(x: np.ndarray, k: int) -> np.ndarray:
    return x << -k if k <= 0 else (x + (1 << (k - 1))) >> k


class SpikeReference:
    """The free phase of a dense bernoulli program, written from docs/isa.md (Spikes) in
    Python integers and int64 numpy, one sample at a time: no code shared with the
    simulator."""

    def __init__(self, prog):
        self.p = prog
        self.mem = {m.name: m for m in prog.memories}
        self.grp = {g.name: g for g in prog.groups}

    def weight(self, syn):
        (op,) = syn.ops
        assert op.kind == "dense"
        M = self.mem[op.w].data.astype(np.int64)
        e = int(self.mem[op.e].data.reshape(-1)[0])
        return M, -e

    def generators(self, sample: int) -> dict:
        seed = self.p.spike_seed
        k0 = _h(seed ^ _h(0))
        k1 = _h(k0 ^ sample)
        out = {}
        for gi, g in enumerate(self.p.groups):
            if g.neuron != "bernoulli":
                continue
            k2 = _h(k1 ^ _h((0 << 16) | gi))
            n = self.mem[g.mem].size
            out[g.name] = [(_h(k2 ^ u) or seed) for u in range(n)]
        return out

    def free(self, x: np.ndarray, sample: int) -> dict:
        p, F = self.p, self.p.frac_bits
        im = self.mem[p.inputs[0]]
        s = {im.name: np.clip(np.floor(x * (1 << F) + 0.5).astype(np.int64), im.lo, im.hi)}
        for g in p.groups:
            s[g.name] = np.zeros(self.mem[g.mem].shape, np.int64)
        bern = {g.name for g in p.groups if g.neuron == "bernoulli"}
        X = self.generators(sample)
        A = {j: np.zeros_like(s[j]) for j in bern}
        Z = {j: np.zeros_like(s[j]) for j in bern}
        I: dict = {}
        ph = p.phase("free")
        sums = {g.name: np.zeros_like(s[g.name]) for g in p.groups}
        for t in range(ph.sweeps):
            for cls in ph.classes:
                new, fired = {}, {}
                for j in cls:
                    g = self.grp[j]
                    u = np.zeros_like(s[j])
                    for syn in p.synapses:
                        M, sh = self.weight(syn) if syn.dst == j or (
                            syn.src == j and syn.feedback) else (None, 0)
                        if syn.dst == j:
                            if syn.src in bern:
                                K = self.grp[syn.src].tau_shift
                                cur = I.get((syn.name, 0), np.zeros_like(s[j]))
                                cur = cur - _rshift(cur, K) + (M @ Z[syn.src]) * (1 << F)
                                I[(syn.name, 0)] = cur
                                u = u + _rshift(cur, sh + K)
                            else:
                                u = u + _rshift(M @ s[syn.src], sh)
                        if syn.src == j and syn.feedback:
                            if syn.dst in bern:
                                K = self.grp[syn.dst].tau_shift
                                cur = I.get((syn.name, 1), np.zeros_like(s[j]))
                                cur = cur - _rshift(cur, K) + (Z[syn.dst] @ M) * (1 << F)
                                I[(syn.name, 1)] = cur
                                u = u + _rshift(cur, sh + K)
                            else:
                                u = u + _rshift(s[syn.dst] @ M, sh)
                    if g.bias:
                        u = u + self.mem[g.bias].data.astype(np.int64)
                    v = np.clip(u, g.lo, g.hi)
                    if j in bern:
                        z = np.zeros_like(v)
                        for k in range(v.size):
                            w = X[j][k]
                            w ^= (w << 13) & M32
                            w ^= w >> 17
                            w ^= (w << 5) & M32
                            X[j][k] = w
                            z[k] = int((w >> (32 - F)) < v[k])
                        K = g.tau_shift
                        A[j] = A[j] - _rshift(A[j], K) + z * (1 << F)
                        v = np.minimum(_rshift(A[j], K), g.hi)
                        fired[j] = z
                    new[j] = v
                s.update(new)
                Z.update(fired)
            if t >= ph.sweeps - ph.mean:
                for j in sums:
                    sums[j] = sums[j] + s[j]
        H = ph.mean
        assert H & (H - 1) == 0
        return {j: _rshift(v, H.bit_length() - 1) for j, v in sums.items()}


@pytest.mark.parametrize("example", ["mlp_digits", "mlp3_digits"])
def test_simulator_matches_the_independent_integer_reference(trained, digits, example):
    """The digits MLP (spikes read forward) and the 3-hidden MLP at its initial weights
    (spikes read forward and through the feedback of spiking neighbours)."""
    if example == "mlp_digits":
        prog = quantize_graph(trained)
    else:
        g = compile_source(os.path.join(EX, f"{example}.onnx"), CompileOptions(
            target="neuromorphic", neuron="bernoulli")).graph
        prog = quantize_graph(g)
        syn = {(s.src, s.dst): s for s in prog.synapses}
        assert any(Simulator(prog).spike_read.get((s.name, True)) for s in syn.values())
    prog.phase("free").sweeps, prog.phase("free").mean = 12, 4
    validate(prog)
    xte = digits[2][:6]
    sim = Simulator(prog).free(xte).states
    ref = SpikeReference(prog)
    for i in range(len(xte)):
        r = ref.free(xte[i], i)
        for g in prog.groups:
            assert np.array_equal(sim[g.name][i].numpy().astype(np.int64), r[g.name]), (i, g.name)
    # the hidden units did spike, at neither extreme
    for g in prog.groups:
        if g.neuron == "bernoulli":
            assert 0 < float(sim[g.name].mean()) < 255, g.name


def test_results_do_not_depend_on_batching_and_reproduce(trained, digits):
    prog = quantize_graph(trained)
    x, y = digits[2][:40], digits[3][:40]
    a = programs.evaluate_program(prog, x, y, batch_size=40)
    b = programs.evaluate_program(prog, x, y, batch_size=7)
    assert np.array_equal(a["predictions"], b["predictions"])
    assert a["synaptic_events_per_inference"] == b["synaptic_events_per_inference"]
    s1 = Simulator(prog).free(x[10:20], ids=np.arange(10, 20)).states["out"]
    s2 = Simulator(prog).free(x, ids=np.arange(40)).states["out"][10:20]
    assert torch.equal(s1, s2)
    # another seed is other spikes
    prog2 = quantize_graph(trained, seed=1)
    assert prog2.spike_seed != prog.spike_seed
    s3 = Simulator(prog2).free(x, ids=np.arange(40)).states["out"]
    assert not torch.equal(s3, Simulator(prog).free(x, ids=np.arange(40)).states["out"])


def test_on_chip_learning_resumes_bit_exactly_from_the_saved_program(trained, digits, tmp_path):
    """Two learning steps in one simulator equal one step, the program saved and loaded,
    then the second: the spike seeds come from the program (rng_step, spike_seed)."""
    xtr, ytr = digits[0], digits[1]
    b1, b2 = slice(0, 24), slice(24, 48)
    p = quantize_graph(trained)
    sim = Simulator(p)
    sim.train_batch(xtr[b1], ytr[b1])
    api.save_program(p, tmp_path / "mid.nc")
    sim.train_batch(xtr[b2], ytr[b2])
    q = api.load_program(tmp_path / "mid.nc")
    assert q.rng_step == 1
    Simulator(q).train_batch(xtr[b2], ytr[b2])
    assert disassemble(p) == disassemble(q)
    # both nudged phases continued the free phase's generators: shared sampling
    r = Simulator(quantize_graph(trained))
    free, sp, sm = r.train_batch(xtr[b1], ytr[b1])
    assert not torch.equal(sp.states["out"], sm.states["out"])


# --------------------------------------------------------------------------- traces
def test_integer_trace_matches_the_float_trace_in_the_mean():
    """A bernoulli group at fixed probabilities: the xorshift32 generator fires with the
    probability p (to 4 standard errors), and the integer rate trace's mean over the
    second half of the steps equals the float runtime's trace (runtime/spikes.py) in the
    mean: both estimate p."""
    from epc.runtime.spikes import Noise, generator
    g = _graph(time_steps=64, nudge_time_steps=32)
    prog = quantize_graph(g)
    sim = Simulator(prog)
    rows, steps, F = 500, 64, prog.frac_bits
    probs = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9])
    pq = torch.floor(probs * (1 << F) + 0.5).clamp(max=255)
    p = pq.repeat(rows, 43)[:, :256].to(torch.float64)          # [rows, 256] units
    from epc.runtime.simulator import _Spikes
    spk = _Spikes(sim.spike_generators(np.arange(rows), 0, 0), {"h1": torch.zeros_like(p)},
                  {"h1": torch.zeros_like(p)}, {})
    noise = Noise(generator("cpu", 3))
    r_float = torch.zeros_like(p)
    int_sum, float_sum, fired = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for t in range(steps):
        r_int = sim._fire("h1", p, spk)
        fired += spk.pending["h1"]
        r_float = torch.lerp(r_float, noise.spikes(p / (1 << F)), 1.0 / 8)
        if t >= steps // 2:
            int_sum += r_int
            float_sum += r_float
    cols = [torch.arange(256)[k::6] for k in range(6)]
    for k, col in enumerate(cols):
        want = float(pq[k]) / (1 << F)
        n = rows * steps * len(col)
        rate = float(fired[:, col].sum()) / n
        assert abs(rate - want) <= 4 * (want * (1 - want) / n) ** 0.5 + 1e-12, (k, rate, want)
        mi = float(int_sum[:, col].mean()) / (steps // 2) / (1 << F)
        mf = float(float_sum[:, col].mean()) / (steps // 2)
        # the trace starts at 0: over steps 32..63 it has reached 1 - (7/8)^32 = 98.6%
        assert abs(mi - mf) < 0.01, (k, mi, mf)
        assert abs(mi - want) < 0.02, (k, mi, want)


# --------------------------------------------------------------------------- counts
def test_spike_inputs_are_counted_as_additions(trained, digits):
    prog = quantize_graph(trained)
    res = programs.resource_report(prog)
    # hidden -> output reads spikes (one addition per spike and output unit); the input
    # drive and the rate output's feedback stay multiply-adds
    assert res["spike_additions_per_step_max"] == 256 * 10
    assert res["synops_per_sweep"] == 10 * 256 and res["multiply_adds_once"] == 64 * 256
    assert res["synops_per_inference_max"] == 64 * 256 + 32 * 10 * 256
    sim = Simulator(prog)
    x = digits[2][:16]
    sim.free(x)
    st = sim.stats
    assert st.spikes > 0 and st.spike_events == 10 * st.spikes
    assert st.synops == 16 * (64 * 256 + 32 * 10 * 256)   # the input drive once per sample
    assert st.spike_unit_steps == 16 * 32 * 256
    m = programs.evaluate_program(prog, x, digits[3][:16])
    assert m["synaptic_events_per_inference"] < res["spike_additions_per_inference_max"]
    assert 0 < m["spike_rate"] < 1 and m["time_steps"] == 32


def test_inspect_reports_additions(trained, tmp_path, run_cli):
    api.compile_program(trained, tmp_path / "s.nc")
    code, out, err = run_cli("inspect", tmp_path / "s.nc")
    assert code == 0, err
    assert "spike additions per time step" in out and "2,560" in out
    assert "neuron=bernoulli tau_shift=3" in out


# --------------------------------------------------------------------------- accuracy
def test_program_agrees_with_the_float_stochastic_runtime(trained, digits):
    """The trained net's program and the float runtime with bernoulli neurons (the same
    time steps and trace) reach accuracies within 3 points on 360 test digits."""
    from epc.runtime.engine import Engine
    xte, yte = digits[2], digits[3]
    prog = quantize_graph(trained)
    m = programs.evaluate_program(prog, xte, yte)
    eng = Engine(trained, dtype=torch.float32)
    batch = eng.prepare(torch.as_tensor(xte, dtype=torch.float32))
    pred = eng.predict(eng.settle(batch).states).numpy()
    acc_float = float((pred == yte).mean())
    assert acc_float > 0.85 and m["test_accuracy"] > 0.85, (acc_float, m["test_accuracy"])
    assert abs(acc_float - m["test_accuracy"]) <= 0.03
    assert float((m["predictions"] == pred).mean()) > 0.9


def test_on_chip_learning_with_spikes_learns(tmp_path):
    """From untrained weights, two epochs of on-chip EP on 640 digits with bernoulli
    neurons (32/16 time steps) reach well above chance (10%); same seed, same bytes."""
    g = _graph(time_steps=32, nudge_time_steps=16)
    api.compile_program(g, tmp_path / "u.nc")
    kw = dict(epochs=2, limit=640, seed=0)
    m1 = programs.train_program(tmp_path / "u.nc", out=tmp_path / "t1.nc", **kw)
    m2 = programs.train_program(tmp_path / "u.nc", out=tmp_path / "t2.nc", **kw)
    assert (tmp_path / "t1.nc").read_bytes() == (tmp_path / "t2.nc").read_bytes()
    assert m1["test_accuracy"] >= 0.6, m1["history"]
    assert m1["history"][-1]["test_accuracy"] > m1["history"][0]["test_accuracy"] - 0.05
    assert m1["rng_step"] == 2 * 20
    assert m1["spike_rate"] > 0 and m1["synaptic_events_per_inference"] > 0


# --------------------------------------------------------------------------- refusals
def _one_error_line(code, err, needle):
    assert code == 2, (code, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("epc: error: "), err
    assert needle.lower() in lines[0].lower(), (needle, lines[0])


@pytest.mark.parametrize("old, new, needle", [
    (r"spike_seed=\d+", "spike_seed=0", "spike_seed=0"),
    (r"spike_seed=\d+", "spike_seed=4294967296", "32-bit"),
    (r" spike_seed=\d+", "", "nonzero seed"),
    ([(r"(\.mem h1 state )u8", r"\1u16"), ("lo=0 hi=255 act=clip role=hidden",
                                           "lo=0 hi=300 act=clip role=hidden")],
     None, "probability scale"),
    (r"(\.mem h1 state )u8", r"\1s16", "probability scale"),
    ("hi=255 act=clip role=hidden", "hi=255 act=relu role=hidden", "bounded activation"),
    ("tau_shift=3", "tau_shift=13", "tau_shift=13"),
    ("tau_shift=3", "tau_shift=-1", "tau_shift=-1"),
    (r"\.phase free sweeps=32 mean=16", ".phase free sweeps=0 mean=16", "sweeps=0"),
    (r"\.phase free sweeps=32 mean=16", ".phase free sweeps=-4 mean=16", "sweeps=-4"),
    (r"\.phase free sweeps=32 mean=16", ".phase free sweeps=32 mean=0", "mean=0"),
    (r"\.phase free sweeps=32 mean=16", ".phase free sweeps=32 mean=33", "mean=33"),
    (r"\.phase free sweeps=32 mean=16", ".phase free sweeps=32", "mean=0"),
    ("noise=free", "noise=sometimes", "noise=sometimes"),
    (r"\.phase free sweeps=32 mean=16", ".phase free sweeps=32 mean=16 noise=own",
     "nudged phases"),
    (" neuron=bernoulli tau_shift=3", " neuron=poisson tau_shift=3", "poisson"),
    (" neuron=bernoulli tau_shift=3", " neuron=bernoulli", "go together"),
    (r"^\.epc-nc 3", ".epc-nc 2", "version 3"),
])
def test_corrupted_spike_generators_are_refused(trained, tmp_path, run_cli, old, new, needle):
    import re
    api.compile_program(trained, tmp_path / "s.nca")
    text = (tmp_path / "s.nca").read_text()
    bad = text
    for o, n in (old if new is None else [(old, new)]):
        bad = re.sub(o, n, bad, count=1, flags=re.M)
    assert bad != text
    (tmp_path / "bad.nca").write_text(bad)
    for cmd in (("inspect",), ("run", "--limit", "4")):
        code, out, err = run_cli(*cmd, tmp_path / "bad.nca")
        _one_error_line(code, err, needle)


def test_rate_program_with_spiking_fields_is_refused(tmp_path, run_cli):
    g = compile_source(os.path.join(EX, "mlp_digits.onnx"),
                       CompileOptions(target="neuromorphic")).graph
    text = disassemble(quantize_graph(g)).replace(".epc-nc 1", ".epc-nc 3", 1)
    for old, new, needle in [
            ("rng_step=0", "rng_step=0 spike_seed=5", "without a bernoulli group"),
            (".phase free sweeps=100", ".phase free sweeps=100 mean=50", "mean= and noise=")]:
        (tmp_path / "r.nca").write_text(text.replace(old, new, 1))
        code, out, err = run_cli("inspect", tmp_path / "r.nca")
        _one_error_line(code, err, needle)


@pytest.mark.parametrize("args, needle", [
    (["--averaging", "window:8"], "exponential rate trace"),
    (["--averaging", "trace:6"], "power of two"),
])
def test_compile_refuses_what_the_core_cannot_average(run_cli, tmp_path, args, needle):
    out = tmp_path / "x.nc"
    code, o, err = run_cli("compile", os.path.join(EX, "mlp_digits.onnx"), "--target",
                           "neuromorphic", "--neuron", "bernoulli", *args, "-o", out)
    _one_error_line(code, err, needle)
    assert not out.exists()


def test_bench_smoke(tmp_path):
    """bench.stochep_neuromorphic end to end at 1 epoch and 16/8 time steps: every figure
    of the report is there and consistent (the spiking program adds, the rate one
    multiplies)."""
    import json

    from bench.stochep_neuromorphic import main
    out = tmp_path / "sn.json"
    assert main(["--epochs", "1", "--time-steps", "16", "--nudge-time-steps", "8",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    pf, oc = r["program_of_float"], r["on_chip"]
    assert pf["time_steps"] == 16 and pf["synaptic_events_per_inference"] > 0
    assert abs(r["program_gap_points"]) <= 5.0
    assert oc["rate"]["test_accuracy"] > 0.5 and oc["bernoulli"]["test_accuracy"] > 0.5
    assert "synaptic_events_per_inference" not in oc["rate"]
    assert oc["bernoulli"]["synaptic_events_per_inference"] > 0
    assert r["on_chip_time_ratio"] > 0


def test_spiking_phases_keep_pool_winners_live(digits):
    """A max-pooled spiking program (conv1_digits, bernoulli): its phases never freeze the
    winners by step count, whatever `pool_freeze` says (a freeze would always fire, on a
    noisy mid-transient estimate), and the winners a free phase hands on are those of its
    means, as the float runtime's stochastic phases do."""
    import dataclasses
    # the pool after the activation (not the bernoulli default), so that it pools spikes
    opts = CompileOptions(target="neuromorphic", neuron="bernoulli", time_steps=16,
                          nudge_time_steps=8, pool_first=False)
    g = compile_source(os.path.join(EX, "conv1_digits.onnx"), opts).graph
    prog = quantize_graph(g)
    assert prog.pool_freeze > 0
    x = digits[2][:12].reshape(12, 1, 8, 8)
    sim = Simulator(prog)
    r = sim.free(x)
    assert not r.froze.any()
    want = sim.routing(r.states)
    assert want and all(torch.equal(a, b) for k in want
                        for a, b in zip(r.routing[k], want[k]) if a is not None)
    once = Simulator(dataclasses.replace(prog, pool_freeze=1)).free(x)
    assert all(torch.equal(once.states[k], r.states[k]) for k in r.states)
