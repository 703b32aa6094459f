"""StochEP: bernoulli (spiking) neurons in the float runtime, end to end.

Spikes are binary and fire with probability rho(u); neighbours see a rate estimate; the
time steps, averaging and sampling are IR attributes that round-trip; runs reproduce and
resume bit for bit; a bernoulli run is not the rate run; check-gradients averages K
stochastic estimates against the mean-field gradient; metrics count spikes and synaptic
events. Bad input: one `epc: error:` line, exit 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from epc.compiler.bundle import read_bundle
from epc.compiler.errors import EpcError, IRSyntaxError
from epc.compiler.text import parse, print_graph
from epc.runtime.api import check_gradients, evaluate, train
from epc.runtime.engine import Engine
from epc.runtime.gradcheck import mean_field
from epc.runtime.spikes import Noise, generator



def _one_error_line(code, err, needle):
    assert code == 2, (code, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("epc: error: "), err
    assert needle.lower() in lines[0].lower(), (needle, lines[0])


@pytest.fixture(scope="module")
def bern_path(mlp_path, tmp_path_factory) -> str:
    """The small MLP bundle (64-32-10) with bernoulli hidden neurons (16 free / 8 nudged
    time steps, trace:4): the rate bundle's weights, made spiking by `epc compile`."""
    from epc.cli import main
    p = tmp_path_factory.mktemp("b") / "bern.epc"
    assert main(["compile", mlp_path, "--neuron", "bernoulli", "--time-steps", "16",
                 "--nudge-time-steps", "8", "--averaging", "trace:4", "-o", str(p)]) == 0
    return str(p)


def _weights(path) -> dict:
    return read_bundle(path).graph.weights


def _engine(path, dtype=torch.float32) -> Engine:
    return Engine(read_bundle(path).graph, dtype=dtype)


# --------------------------------------------------------------------------- compiler
def test_spiking_attributes_in_the_ir_and_round_trip(bern_path):
    g = read_bundle(bern_path).graph
    assert [s.neuron for s in g.states] == ["bernoulli", "rate"]   # the linear output: rate
    sp = g.schedule.spiking
    assert (sp.time_steps, sp.nudge_time_steps, sp.averaging, sp.tau, sp.sampling) == \
        (16, 8, "trace", 4, "shared")
    text = print_graph(g)
    assert ("time_steps=16, nudge_time_steps=8, averaging=trace, tau=4, sampling=shared"
            in text)
    assert print_graph(parse(text)) == text
    # a rate graph prints no spiking attributes
    assert "time_steps" not in print_graph(mean_field(_engine(bern_path)).graph)


@pytest.mark.parametrize("edit, why", [
    ("time_steps=16, ", "missing 'time_steps'"),           # a part of them only
    ("time_steps=16", "time_steps=0"),
    ("averaging=trace", "averaging=mean"),
    ("sampling=shared", "sampling=both"),
    ("tau=4", "tau=4.5"),
])
def test_ir_reader_refuses_bad_spiking_attributes(bern_path, edit, why):
    text = print_graph(read_bundle(bern_path).graph)
    bad = text.replace(edit, "" if why.startswith("missing") else why, 1)
    assert bad != text
    with pytest.raises(IRSyntaxError):
        parse(bad)


def test_spiking_attributes_on_a_rate_graph_are_refused(mlp_path):
    text = print_graph(read_bundle(mlp_path).graph)
    bad = text.replace("tol=", "time_steps=8, nudge_time_steps=4, averaging=trace, tau=2, "
                               "sampling=shared, tol=", 1)
    with pytest.raises(EpcError, match="spiking attributes"):
        from epc.compiler.verify import verify
        verify(parse(bad))


@pytest.mark.parametrize("args, needle", [
    (["--neuron", "bernoulli", "--activation", "relu"], "unbounded"),
    (["--neuron", "bernoulli", "--activation", "clip:2"], "not within [0, 1]"),
    (["--neuron", "bernoulli", "--time-steps", "0"], "--time-steps 0"),
    (["--neuron", "bernoulli", "--nudge-time-steps", "-3"], "--nudge-time-steps -3"),
    (["--neuron", "bernoulli", "--averaging", "trace:0"], "--averaging"),
    (["--neuron", "bernoulli", "--sampling", "sometimes"], "--sampling"),
    (["--time-steps", "8"], "applies to bernoulli neurons"),
    (["--neuron", "bernoulli", "--max-sweeps", "50"], "applies to rate neurons"),
    (["--neuron", "bernoulli", "--target", "neuromorphic", "--averaging", "window:8"],
     "exponential rate trace"),
])
def test_compile_refusals(run_cli, examples, tmp_path, args, needle):
    out = tmp_path / "x.out"
    code, o, err = run_cli("compile", examples / "mlp_digits.onnx", "-o", out, *args)
    _one_error_line(code, err, needle)
    assert not out.exists()


# --------------------------------------------------------------------------- spikes
def test_spikes_are_binary_with_probability_p():
    p = torch.linspace(0, 1, 11).repeat(4000, 1)
    z = Noise(generator("cpu", 5)).spikes(p)
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    rate = z.mean(0)
    # 4000 draws per probability: 4 standard errors at most 0.032
    assert torch.allclose(rate, p[0], atol=0.032), rate
    assert rate[0] == 0 and rate[-1] == 1          # p = 0 never fires, p = 1 always
    # shared sampling: the stacked copies of a batch compare the same numbers
    z2 = Noise(generator("cpu", 5), copies=2).spikes(torch.full((2, 1000), 0.5))
    assert torch.equal(z2[0], z2[1]) and 300 < z2[0].sum() < 700


def test_settled_rates_track_the_mean_field_fixed_point(bern_path):
    """The spike trains are binary; averaged over samples, the units' firing rates are
    the mean-field (rate) network's fixed point rho(u*)."""
    from epc.runtime.data import load_dataset
    eng = _engine(bern_path)
    d = load_dataset("digits")
    batch = eng.prepare(d.train.x[:256].reshape(256, 64))
    r = eng.settle(batch, gen=generator("cpu", 1), max_sweeps=64, record=True)
    spikes = torch.stack([rec["h1"] for rec in r.recorded])     # [steps, n, 32]
    assert set(spikes.unique().tolist()) == {0.0, 1.0}
    assert len(r.recorded) == 32                                  # the averaged half
    ref = mean_field(eng).settle(batch, tol=1e-6, max_sweeps=500).states["h1"]
    rate = spikes.mean(0)
    # per unit, over 256 samples x 32 steps; the network's mean activity is O(0.1)
    err = (rate.mean(0) - ref.mean(0)).abs()
    assert float(err.max()) < 0.03, err
    # the out state (rate) is no spike train
    outs = torch.stack([rec["out"] for rec in r.recorded])
    assert not set(outs.unique().tolist()) <= {0.0, 1.0}


# --------------------------------------------------------------------------- training
def test_bernoulli_training_is_not_the_rate_run(mlp_path, bern_path):
    a = train(mlp_path, epochs=1, seed=0, lr=5e-3)
    b = train(bern_path, epochs=1, seed=0, lr=5e-3)
    assert a["history"][0]["train_loss"] != b["history"][0]["train_loss"]
    assert b["history"][0]["mean_free_sweeps"] == 16            # exactly its time steps
    assert b["history"][0]["mean_nudged_sweeps"] == 8
    assert b["test_accuracy"] > 0.4           # it learns (chance 0.1; measured 0.53)
    h = b["history"][0]
    assert 0 < h["spike_rate"] < 1 and h["synaptic_events_per_inference"] > 0
    assert h["time_steps"] == 16
    assert "spike_rate" not in a["history"][0]


def test_same_seed_same_bits_and_resume_exact(bern_path, tmp_path):
    full = train(bern_path, epochs=2, seed=7, checkpoint=str(tmp_path / "a"))
    again = train(bern_path, epochs=2, seed=7)
    other = train(bern_path, epochs=2, seed=8)
    assert [h["train_loss"] for h in full["history"]] == \
        [h["train_loss"] for h in again["history"]]
    assert full["history"][-1]["train_loss"] != other["history"][-1]["train_loss"]
    part = train(bern_path, epochs=2, seed=7, checkpoint=str(tmp_path / "b"), stop_after=1)
    assert part["epochs"] == 1
    rest = train(bern_path, epochs=2, seed=7, checkpoint=str(tmp_path / "b"), resume=True)
    wa, wb = _weights(tmp_path / "a" / "last.epc"), _weights(tmp_path / "b" / "last.epc")
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    assert [h["train_loss"] for h in rest["history"]] == \
        [h["train_loss"] for h in full["history"]]
    assert rest["test_accuracy"] == full["test_accuracy"]
    # eval of the checkpoint draws the spikes training's test evaluation drew
    e = evaluate(str(tmp_path / "a" / "last.epc"))
    assert e["accuracy"] == full["test_accuracy"]
    assert e["spike_rate"] == full["history"][-1]["spike_rate"]


@pytest.mark.parametrize("flags", [["--sampling", "independent"], ["--averaging", "window:4"],
                                   ["--time-steps", "24"]])
def test_every_spiking_flag_changes_the_run(run_cli, bern_path, tmp_path, flags):
    base = train(bern_path, epochs=1, seed=0)
    p = tmp_path / "v.epc"
    code, _, err = run_cli("compile", bern_path, *flags, "-o", p)
    assert code == 0, err
    v = train(str(p), epochs=1, seed=0)
    assert v["history"][0]["train_loss"] != base["history"][0]["train_loss"]
    if flags[0] == "--time-steps":
        assert v["history"][0]["mean_free_sweeps"] == 24


def test_spike_train_estimate_is_its_own_run(bern_path):
    a = train(bern_path, epochs=1, seed=0, lr=5e-3)
    b = train(bern_path, epochs=1, seed=0, lr=5e-3, estimate="spikes")
    assert a["history"][0]["train_loss"] != b["history"][0]["train_loss"]
    assert b["config"]["estimate"] == "spikes" and b["test_accuracy"] > 0.4   # 0.53


def test_mixed_graph_rate_and_bernoulli_states(tmp_path, run_cli, examples):
    """mlp3: h1 and h3 bernoulli, h2 rate (edited in the IR text), the output rate: it trains,
    reproduces, and h2 does not spike."""
    p = tmp_path / "b3.epc"
    assert run_cli("compile", examples / "mlp3_digits.onnx", "--neuron", "bernoulli",
                   "--time-steps", "16", "--nudge-time-steps", "8", "-o", p)[0] == 0
    text = print_graph(read_bundle(p).graph, weights="inline")
    states = [l for l in text.splitlines() if l.lstrip().startswith("state ")]
    assert sum("neuron=bernoulli" in l for l in states) >= 2
    h2 = next(l for l in states if l.lstrip().startswith("state h2 "))
    ir = tmp_path / "mixed.ir"
    ir.write_text(text.replace(h2, h2.replace("neuron=bernoulli", "neuron=rate")))
    eng = Engine(parse(ir.read_text()))
    assert eng.bernoulli == {"h1", "h3"} and "h2" in eng.settled
    from epc.runtime.data import load_dataset
    d = load_dataset("digits")
    r = eng.settle(eng.prepare(d.train.x[:16].reshape(16, 64)), gen=generator("cpu", 0),
                   record=True)
    assert set(torch.stack([x["h1"] for x in r.recorded]).unique().tolist()) == {0.0, 1.0}
    assert not set(torch.stack([x["h2"] for x in r.recorded]).unique().tolist()) <= {0., 1.}
    mixed = tmp_path / "mixed.epc"
    assert run_cli("compile", ir, "-o", mixed)[0] == 0
    assert Engine(read_bundle(mixed).graph).bernoulli == {"h1", "h3"}
    a = train(str(mixed), epochs=1, seed=0)
    b = train(str(mixed), epochs=1, seed=0)
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    every = train(str(p), epochs=1, seed=0)      # all three hidden states bernoulli
    assert every["history"][0]["train_loss"] != a["history"][0]["train_loss"]
    # h2's units are no spikes: the spike rate counts h1 and h3 only (256 + 64 units)
    assert 0 < a["history"][0]["spike_rate"] < 1


def test_rate_only_flags_refused_on_bernoulli(bern_path, cli):
    for args, needle in ((["train", bern_path, "--max-sweeps", "10"], "--max-sweeps"),
                         (["train", bern_path, "--gradient", "implicit"], "implicit"),
                         (["train", bern_path, "--nudge-form", "deviation"], "--nudge-form"),
                         (["train", bern_path, "--precision", "bf16"], "--precision"),
                         (["eval", bern_path, "--precision", "bf16"], "--precision"),
                         (["eval", bern_path, "--tol", "0.01"], "--tol"),
                         (["train", bern_path, "--estimate", "spikes", "--nudge", "one-sided"],
                          "symmetric")):
        r = cli(*args, "--epochs", "1") if args[0] == "train" else cli(*args)
        assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, \
            r.stderr


def test_estimate_spikes_refused_on_rate(mlp_path, cli):
    r = cli("train", mlp_path, "--estimate", "spikes", "--epochs", "1")
    assert r.exit_code == 2 and "applies to bernoulli" in r.stderr


def test_eval_prints_spike_metrics(bern_path, cli, tmp_path):
    j = tmp_path / "e.json"
    r = cli("eval", bern_path, "--json", j)
    assert r.exit_code == 0, r.stderr
    assert "spike rate" in r.stdout and "synaptic events" in r.stdout
    m = json.loads(j.read_text())
    assert 0 < m["spike_rate"] < 1 and m["time_steps"] == 16
    # a hidden unit's spike is delivered over its 10 synapses to the output (the
    # feedback carries the output's rate values: multiply-adds, not events), so the
    # events per inference are 10 x (spike rate x 32 units x 16 time steps)
    spikes = m["spike_rate"] * 32 * 16
    assert m["synaptic_events_per_inference"] == pytest.approx(spikes * 10, rel=1e-6)
    # per sweep: the output's values fed back to 32 hidden units (320), plus the input's
    # drive (64 x 32) once
    assert m["multiply_adds_per_inference"] == 64 * 32 + 320 * 16


# --------------------------------------------------------------------------- gradients
def test_check_gradients_stochastic_mean_against_mean_field(bern_path):
    r = check_gradients(bern_path, beta=0.2, samples=32, seeds=8)
    assert r["stochastic"]["seeds"] == 8
    for row in r["couplings"] + r["biases"]:
        assert row["cosine"] > 0.9, row
        # the mean of 8 beats a single estimate
        assert row["cosine"] >= row["single_cosine_mean"] - 1e-9
        assert row["relative_std_error"] > 0
    one = check_gradients(bern_path, beta=0.2, samples=32, seeds=1)
    assert one["couplings"][0]["single_cosine_std"] == 0


# --------------------------------------------------------------------------- depth defaults
def _spiking_line(path) -> str:
    text = print_graph(read_bundle(path).graph)
    return next(l for l in text.splitlines() if l.strip().startswith("schedule ["))


@pytest.mark.parametrize("example, hidden, want", [
    # one hidden state: the measured shallow default (unchanged)
    ("mlp_digits", 1, (64, 32, "trace", 8)),
    ("conv1_digits", 1, (64, 32, "trace", 8)),
    # deeper: both phases 64 steps per hidden state on the longest path, trace:4
    ("conv_digits", 2, (128, 128, "trace", 4)),
    ("mlp3_digits", 3, (192, 192, "trace", 4)),
])
def test_time_steps_default_by_depth_and_printed(run_cli, examples, tmp_path, example,
                                                 hidden, want):
    from epc.compiler.passes.schedule import hidden_depth, spiking_defaults
    out = tmp_path / f"{example}.epc"
    code, said, err = run_cli("compile", examples / f"{example}.onnx", "--neuron", "bernoulli",
                              "-o", out)
    assert code == 0, err
    # the compile line says what the net will run with
    assert (f"bernoulli: {want[0]}/{want[1]} time steps, {want[2]}:{want[3]}, shared "
            f"sampling") in said + err
    g = read_bundle(out).graph
    assert hidden_depth(g) == hidden
    sp = g.schedule.spiking
    assert (sp.time_steps, sp.nudge_time_steps, sp.averaging, sp.tau) == want
    assert sp.sampling == "shared"
    assert spiking_defaults(g) == sp          # a function of the graph alone
    assert (f"time_steps={want[0]}, nudge_time_steps={want[1]}, averaging={want[2]}, "
            f"tau={want[3]}") in _spiking_line(out)
    # the same source compiles to the same schedule (deterministic)
    out2 = tmp_path / f"{example}_again.epc"
    assert run_cli("compile", examples / f"{example}.onnx", "--neuron", "bernoulli",
                   "-o", out2)[0] == 0
    assert _spiking_line(out2) == _spiking_line(out)


def test_explicit_spiking_flags_win_over_the_depth_default(run_cli, examples, tmp_path):
    out = tmp_path / "m3.epc"
    code, _, err = run_cli("compile", examples / "mlp3_digits.onnx", "--neuron", "bernoulli",
                           "--time-steps", "50", "--averaging", "trace:8", "-o", out)
    assert code == 0, err
    sp = read_bundle(out).graph.schedule.spiking
    # the flags given win; the one not given keeps the depth default
    assert (sp.time_steps, sp.nudge_time_steps, sp.averaging, sp.tau) == (50, 192, "trace", 8)
    out = tmp_path / "m1.epc"
    assert run_cli("compile", examples / "mlp_digits.onnx", "--neuron", "bernoulli",
                   "--nudge-time-steps", "40", "--averaging", "window:16", "-o", out)[0] == 0
    sp = read_bundle(out).graph.schedule.spiking
    assert (sp.time_steps, sp.nudge_time_steps, sp.averaging, sp.tau) == (64, 40, "window", 16)


def test_a_compiled_rate_net_made_spiking_gets_the_depth_default(run_cli, examples, tmp_path):
    """`epc compile trained.epc --neuron bernoulli` gives the schedule compiling the source
    gives; recompiling a bernoulli bundle keeps its schedule unless a flag changes it."""
    rate = tmp_path / "m3.epc"
    assert run_cli("compile", examples / "mlp3_digits.onnx", "--target", "torch",
                   "-o", rate)[0] == 0
    spiking = tmp_path / "m3b.epc"
    assert run_cli("compile", rate, "--neuron", "bernoulli", "-o", spiking)[0] == 0
    sp = read_bundle(spiking).graph.schedule.spiking
    assert (sp.time_steps, sp.nudge_time_steps, sp.tau) == (192, 192, 4)
    again = tmp_path / "m3b2.epc"
    assert run_cli("compile", spiking, "--nudge-time-steps", "64", "-o", again)[0] == 0
    sp = read_bundle(again).graph.schedule.spiking
    assert (sp.time_steps, sp.nudge_time_steps, sp.tau) == (192, 64, 4)


def _hidden_shapes(path) -> dict:
    g = read_bundle(path).graph
    return {s.name: tuple(s.shape) for s in g.states if s.role == "hidden"}


def test_bernoulli_conv_pools_first_unless_told(run_cli, examples, tmp_path):
    """--neuron bernoulli moves each max-pool in front of its activation when --pool-first
    is not given (the max of drives, not of noisy rate estimates: docs/stochep.md); either
    flag given wins; rate nets keep the pool after the activation; a compiled rate net made
    spiking keeps its structure (an energy graph is not rewritten)."""
    def shapes(name, *args):
        out = tmp_path / f"{name}.epc"
        code, _, err = run_cli("compile", examples / "conv_digits.onnx", "--target", "torch",
                               "-o", out, *args)
        assert code == 0, err
        return out, _hidden_shapes(out)
    pooled = {"h1": (32, 4, 4), "h2": (64, 2, 2)}
    full = {"h1": (32, 8, 8), "h2": (64, 4, 4)}
    assert shapes("b", "--neuron", "bernoulli")[1] == pooled
    assert shapes("b_no", "--neuron", "bernoulli", "--no-pool-first")[1] == full
    assert shapes("b_yes", "--neuron", "bernoulli", "--pool-first")[1] == pooled
    rate, got = shapes("r")
    assert got == full
    assert shapes("r_yes", "--pool-first")[1] == pooled
    made = tmp_path / "made.epc"
    code, _, err = run_cli("compile", rate, "--neuron", "bernoulli", "-o", made)
    assert code == 0, err
    assert _hidden_shapes(made) == full
    # the Python API's default is the CLI's
    from epc.api import compile_source
    from epc.compiler.options import CompileOptions
    g = compile_source(str(examples / "conv_digits.onnx"),
                       CompileOptions(neuron="bernoulli")).graph
    assert {s.name: tuple(s.shape) for s in g.states if s.role == "hidden"} == pooled


def test_stochastic_free_phase_never_freezes_pool_winners(run_cli, examples, tmp_path):
    """A stochastic phase never settles: freezing the max-pool winners after N steps would
    always fire, mid-transient; the free phase keeps following its estimates and the
    nudged phases take the winners of its averaged states. A rate net still freezes."""
    from epc.runtime.data import load_dataset
    out = {}
    for tag, args in (("bern", ["--neuron", "bernoulli", "--time-steps", "24",
                                "--nudge-time-steps", "8", "--no-pool-first"]), ("rate", [])):
        p = tmp_path / f"c1_{tag}.epc"
        assert run_cli("compile", examples / "conv1_digits.onnx", "--target", "torch",
                       "-o", p, *args)[0] == 0
        eng = _engine(p)
        x = load_dataset("digits").test.x[:16].reshape(16, 1, 8, 8)
        out[tag] = (eng, eng.prepare(x))
    eng, batch = out["bern"]
    r = eng.settle(batch, gen=generator("cpu", 3), freeze_after="auto")
    assert r.sweeps == 24 and r.routing is None
    eng, batch = out["rate"]
    r = eng.settle(batch, max_sweeps=30, tol=0.0, freeze_after=5)
    assert r.routing is not None
