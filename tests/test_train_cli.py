"""epc train / eval / check-gradients through the CLI: metrics, checkpoints, resume, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from epc.compiler.bundle import Bundle, read_bundle, write_bundle
from epc.runtime import zoo
from epc.runtime.api import evaluate, train
from epc.targets.torch import emit

def test_train_eval_metrics_checkpoint_plot(cli, mlp_path, tmp_path):
    ck, mj, png = tmp_path / "ck", tmp_path / "run.json", tmp_path / "curves.png"
    r = cli("train", mlp_path, "--epochs", 3, "--seed", 0, "--lr", 5e-3, "--metrics-json", mj,
            "--checkpoint", ck, "--plot", png, "-q")
    assert r.exit_code == 0, r.output
    m = json.loads(mj.read_text())
    for k in ("train_accuracy", "test_accuracy", "epochs", "seconds", "unconverged_fraction",
              "history"):
        assert k in m
    assert m["epochs"] == 3 and len(m["history"]) == 3
    assert m["threads"] == torch.get_num_threads() and m["torch_version"] == torch.__version__
    assert m["test_accuracy"] > 0.8  # 3 epochs of EP on digits (chance is 0.1)
    assert png.read_bytes()[:4] == b"\x89PNG"
    b = read_bundle(ck / "last.epc")
    assert b.target == "torch" and b.docs["train_state"]["epoch"] == 3
    # the checkpoint holds the trained weights: eval reproduces the reported accuracy
    r = cli("eval", ck / "last.epc", "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["accuracy"] == pytest.approx(m["test_accuracy"])
    assert "accuracy" in r.stdout


def test_resume_continues_exactly(mlp_path, tmp_path):
    full = train(mlp_path, epochs=3, seed=1, checkpoint=str(tmp_path / "a"))
    part = train(mlp_path, epochs=3, seed=1, checkpoint=str(tmp_path / "b"), stop_after=1)
    assert part["epochs"] == 1
    rest = train(mlp_path, epochs=3, seed=1, checkpoint=str(tmp_path / "b"), resume=True)
    assert rest["epochs"] == 3
    wa = read_bundle(tmp_path / "a" / "last.epc").graph.weights
    wb = read_bundle(tmp_path / "b" / "last.epc").graph.weights
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    assert rest["test_accuracy"] == full["test_accuracy"]
    assert [h["train_loss"] for h in rest["history"]] == [h["train_loss"] for h in full["history"]]


def test_seeds_reproduce_and_differ(mlp_path):
    a = train(mlp_path, epochs=1, seed=3)
    b = train(mlp_path, epochs=1, seed=3)
    c = train(mlp_path, epochs=1, seed=4)
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    assert a["history"][0]["train_loss"] != c["history"][0]["train_loss"]


def test_sgd_sync_one_sided_warm_start_options(mlp_path):
    m = train(mlp_path, epochs=1, optimizer="sgd", lr=0.05, schedule="sync",
              nudge="one-sided", warm_start=True, clip=5.0, weight_decay=1e-4)
    assert m["test_accuracy"] > 0.5


def test_torch_dataset_api():
    from torch.utils.data import TensorDataset
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 64, generator=g)
    y = (x[:, 0] > 0.5).long()
    tr, te = TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:])
    m = train(zoo.mlp((64, 16, 10)), dataset=(tr, te), epochs=1)
    assert m["data"] == "custom" and m["train_samples"] == 48


def _bad(run, tmp_path, args, match):
    sentinel = tmp_path / "run.json"
    sentinel.write_text("keep")
    r = run(*args, "--metrics-json", sentinel) if args[0] == "train" else run(*args)
    assert r.exit_code == 2, (args, r.output)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("epc: error:") and match in err[0], err
    assert r.stdout == "", r.stdout     # no progress bar frame before the error
    assert sentinel.read_text() == "keep"


def test_bad_inputs_one_line_exit_2(cli, mlp_path, tmp_path):
    _bad(cli, tmp_path, ["train", mlp_path, "--data", "imagenet"], "unknown data set")
    _bad(cli, tmp_path, ["train", mlp_path, "--data", "mnist", "--data-dir", tmp_path / "no"],
         "no such directory")
    _bad(cli, tmp_path, ["train", mlp_path, "--data", "cifar10", "--data-dir", tmp_path],
         "CIFAR-10 not found")
    _bad(cli, tmp_path, ["train", mlp_path, "--beta", "0"], "--beta")
    _bad(cli, tmp_path, ["train", mlp_path, "--epochs", "-1"], "--epochs")
    _bad(cli, tmp_path, ["train", mlp_path, "--clip", "-1"], "--clip")
    _bad(cli, tmp_path, ["train", mlp_path, "--momentum", "1.5", "--optimizer", "sgd"],
         "--momentum")
    _bad(cli, tmp_path, ["train", mlp_path, "--weight-decay", "-0.1"], "--weight-decay")
    _bad(cli, tmp_path, ["train", mlp_path, "--channels", "0"], "--channels")
    _bad(cli, tmp_path, ["train", mlp_path, "--resize", "0"], "--resize")
    _bad(cli, tmp_path, ["train", tmp_path / "missing.epc"], "no such file")
    _bad(cli, tmp_path, ["check-gradients", mlp_path, "--beta", "0"], "--beta")
    # a bundle for another target
    other = tmp_path / "other.epc"
    write_bundle(other, Bundle(read_bundle(mlp_path).graph, target="neuromorphic"))
    _bad(cli, tmp_path, ["train", other], "target 'neuromorphic'")
    _bad(cli, tmp_path, ["eval", other], "target 'neuromorphic'")
    # an incompatible checkpoint (a different architecture) leaves it untouched
    ck = tmp_path / "ck"
    emit(zoo.mlp((64, 20, 10)), tmp_path / "small.epc", None)
    train(str(tmp_path / "small.epc"), epochs=1, checkpoint=str(ck))
    before = (ck / "last.epc").read_bytes()
    _bad(cli, tmp_path, ["train", mlp_path, "--epochs", "1", "--checkpoint", ck, "--resume"],
         "incompatible checkpoint")
    assert (ck / "last.epc").read_bytes() == before
    # labels beyond the output state's classes
    emit(zoo.mlp((64, 16, 5)), tmp_path / "five.epc", None)
    _bad(cli, tmp_path, ["train", tmp_path / "five.epc"], "labels range")


def test_unsettled_epochs_are_warned_about(cli, mlp_path):
    r = cli("train", mlp_path, "--epochs", "1", "--max-sweeps", "2", "-q")
    assert r.exit_code == 0, r.output
    assert "epc: warning: in epoch 1, 100% of the free phases stopped at the sweep cap" \
        in r.stderr and "--max-sweeps" in r.stderr
    r = cli("train", mlp_path, "--epochs", "1", "-q")
    assert r.exit_code == 0 and "sweep cap" not in r.stderr


def test_divergence_is_named(mlp_path, tmp_path):
    from epc.compiler.errors import EpcError
    with pytest.raises(EpcError, match=r"diverged in epoch 1: .*(state|weight|gradient)"):
        train(zoo.mlp((64, 32, 10), act=__import__("epc.compiler.ir", fromlist=["x"])
                      .Activation.relu()), epochs=1, lr=1e6, optimizer="sgd", beta=50.0)


def test_help_teaches(cli):
    for cmd in ("train", "eval", "check-gradients"):
        r = cli(cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.stdout and "epc " + cmd in r.stdout


def test_check_gradients_cli_table(cli, mlp_path, tmp_path):
    r = cli("check-gradients", mlp_path, "--samples", 16, "--json", tmp_path / "g.json")
    assert r.exit_code == 0, r.output
    j = json.loads((tmp_path / "g.json").read_text())
    assert all(c["cosine"] > 0.99 for c in j["couplings"])
    assert "cosine" in r.stdout and "c_h1" in r.stdout


def test_a_dead_layer_is_reported(run_cli, examples, tmp_path):
    """Too high a learning rate clips mlp3's last hidden layer to a constant: every epoch
    record names it, the CLI warns on stderr, `epc eval` too; a sane run names nothing."""
    import json
    b = tmp_path / "m.epc"
    assert run_cli("compile", examples / "mlp3_digits.onnx", "--target", "torch", "-o", b,
                   "-q")[0] == 0
    code, out, err = run_cli("train", b, "--epochs", "2", "--lr", "0.05", "-q",
                             "--metrics-json", tmp_path / "dead.json",
                             "--checkpoint", tmp_path / "ck")
    assert code == 0
    hist = json.loads((tmp_path / "dead.json").read_text())["history"]
    assert hist[-1]["dead_states"] == ["h3", "out"]
    assert isinstance(hist[-1]["constant_prediction"], int)   # a dead output: one class
    assert "epc: warning: after epoch 2, no unit of h3, out varies" in err
    code, out, err = run_cli("eval", tmp_path / "ck" / "last.epc")
    assert code == 0 and "no unit of h3, out varies" in err
    # one sample cannot vary: no verdict
    from epc.runtime.api import make_engine
    from epc.runtime.data import load_dataset
    from epc.runtime.train import evaluate
    eng, _, _ = make_engine(str(tmp_path / "ck" / "last.epc"))
    d = load_dataset("digits", input_shape=(64,))
    assert evaluate(eng, d.test.x[:2], d.test.y[:2])["dead_states"] == ["h3", "out"]
    assert evaluate(eng, d.test.x[:1], d.test.y[:1])["dead_states"] == []
    code, out, err = run_cli("train", b, "--epochs", "1", "-q",
                             "--metrics-json", tmp_path / "ok.json")
    assert code == 0 and "warning" not in err
    ok = json.loads((tmp_path / "ok.json").read_text())["history"][0]
    assert ok["dead_states"] == [] and ok["constant_prediction"] is None


def test_a_collapsed_network_is_reported(run_cli, tmp_path):
    """Output units that still vary across samples but never change the argmax (what a
    deep net that collapsed during training looks like): no dead state, yet `epc eval`
    warns that every sample gets the same class; labels of one class alone do not."""
    from epc.runtime.api import make_engine
    from epc.runtime.data import load_dataset
    from epc.runtime.train import evaluate
    g = zoo.mlp((64, 16, 10))
    out_w = next(c.ops[0].weight for c in g.couplings if c.dst == "out")
    g.weights[out_w] = g.weights[out_w] * 1e-2
    g.weights["out.b"] = np.where(np.arange(10) == 3, 1.0, 0.0).astype(np.float32)
    p = tmp_path / "collapsed.epc"
    emit(g, p, None)
    eng, _, _ = make_engine(str(p))
    d = load_dataset("digits", input_shape=(64,))
    r = evaluate(eng, d.test.x, d.test.y, batch_size=100)
    assert r["dead_states"] == [] and r["constant_prediction"] == 3
    one_class = d.test.y == 5
    assert evaluate(eng, d.test.x[one_class], d.test.y[one_class])["constant_prediction"] is None
    code, out, err = run_cli("eval", p)
    assert code == 0 and "every one of these samples is predicted as class 3" in err


def test_epoch_lines_are_not_wrapped_in_logs(cli, mlp_path):
    """Each epoch's summary is one line whatever the console width (rich wrapped it at 80
    columns in a log file, putting the unconverged figure on a line of its own)."""
    r = cli("train", mlp_path, "--epochs", "1", env={"COLUMNS": "40"})
    assert r.exit_code == 0, r.output
    lines = [l for l in r.stdout.splitlines() if l.startswith("epoch 1: ")]
    assert len(lines) == 1 and "test acc" in lines[0] and "unconverged" in lines[0] \
        and lines[0].rstrip().endswith("%"), r.stdout


def test_color_is_taken_for_colour_by_every_command(cli, mlp_path):
    """`epc compile --schedule color` is accepted; so are train, eval and check-gradients,
    and the run is the colour schedule's, bit for bit."""
    from epc.runtime.api import check_gradients
    a = train(mlp_path, epochs=1, seed=0, schedule="colour", stop_after=1)
    b = train(mlp_path, epochs=1, seed=0, schedule="color", stop_after=1)
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    assert b["config"]["mode"] == "colour"
    assert evaluate(mlp_path, schedule="color")["settling"]["mode"] == "colour"
    assert check_gradients(mlp_path, schedule="color", samples=4)["mode"] == "colour"
    r = cli("eval", mlp_path, "--schedule", "color")
    assert r.exit_code == 0, r.output


def test_the_cli_runs_on_one_thread_unless_asked(cli, mlp_path, tmp_path):
    """The commands own their process: one torch thread by default, whatever torch would
    pick, and `--threads N` where asked; the metrics say which."""
    mj = tmp_path / "run.json"
    try:
        torch.set_num_threads(2)
        r = cli("train", mlp_path, "--epochs", 1, "--stop-after", 1, "--metrics-json", mj, "-q")
        assert r.exit_code == 0, r.output
        assert json.loads(mj.read_text())["threads"] == 1
        r = cli("train", mlp_path, "--epochs", 1, "--stop-after", 1, "--metrics-json", mj, "-q",
                "--threads", 2)
        assert r.exit_code == 0, r.output
        assert json.loads(mj.read_text())["threads"] == 2
    finally:
        torch.set_num_threads(1)


def test_eval_settles_a_checkpoint_as_its_training_did(cli, mlp_path, tmp_path):
    """A run trained with its own sweep cap: `epc eval` of its checkpoint uses that cap by
    default and reproduces the reported test loss exactly; an explicit flag overrides."""
    ck = tmp_path / "ck"
    m = train(mlp_path, epochs=1, seed=0, max_sweeps=5, checkpoint=str(ck))
    e = evaluate(str(ck / "last.epc"))
    assert e["settling"]["from_training"] == ["max_sweeps"]
    assert e["settling"]["max_sweeps"] == 5
    assert e["loss"] == m["history"][-1]["test_loss"]
    assert e["accuracy"] == m["test_accuracy"]
    e60 = evaluate(str(ck / "last.epc"), max_sweeps=60)
    assert e60["settling"]["from_training"] == [] and e60["settling"]["max_sweeps"] == 60
    assert e60["loss"] != e["loss"]
    r = cli("eval", ck / "last.epc")
    assert r.exit_code == 0 and "settled as in training: max-sweeps 5" in r.stdout, r.output
    # a bundle that was never trained settles by its compiled schedule
    assert evaluate(mlp_path)["settling"]["from_training"] == []


def test_metrics_file_follows_the_run_and_survives_an_interruption(mlp_path, tmp_path):
    mj = tmp_path / "run.json"
    seen = []

    def on_epoch(rec):
        m = json.loads(mj.read_text())
        seen.append((m["epochs"], len(m["history"]), m["in_progress"]))
        if rec["epoch"] == 2:
            raise KeyboardInterrupt     # the user stops the run during epoch 3's start

    with pytest.raises(KeyboardInterrupt):
        train(mlp_path, epochs=4, seed=0, metrics_json=str(mj), on_epoch=on_epoch)
    assert seen == [(1, 1, True), (2, 2, True)]
    m = json.loads(mj.read_text())      # what the interrupted run leaves: two whole epochs
    assert m["in_progress"] and m["epochs"] == 2 and len(m["history"]) == 2
    done = train(mlp_path, epochs=2, seed=0, metrics_json=str(mj))
    m = json.loads(mj.read_text())
    assert not m["in_progress"] and m["epochs"] == 2
    assert m["history"] == json.loads(json.dumps(done["history"]))


def test_the_one_layer_conv_net_learns_its_filters(run_cli, examples, tmp_path):
    """examples/conv1_digits.onnx compiled with --pool-first (the pool moves into the
    input coupling): 5 epochs of EP reach 95.3% here (seed 0; 99.44% after 30, docs/findings.md),
    and the filters of the input convolution are learned, not only the readout: put back
    to their initial values in the trained bundle, the accuracy falls (to 92.2% here)."""
    b = tmp_path / "c1.epc"
    assert run_cli("compile", examples / "conv1_digits.onnx", "--target", "torch",
                   "--pool-first", "-o", b, "-q")[0] == 0
    code, out, err = run_cli("train", b, "--epochs", "5", "--seed", "0", "-q",
                             "--metrics-json", tmp_path / "run.json",
                             "--checkpoint", tmp_path / "ck")
    assert code == 0, err
    m = json.loads((tmp_path / "run.json").read_text())
    assert m["test_accuracy"] > 0.93 and m["unconverged_fraction"] == 0.0
    trained = read_bundle(str(tmp_path / "ck" / "last.epc"))
    trained.graph.weights["conv1.weight"] = read_bundle(str(b)).graph.weights["conv1.weight"]
    write_bundle(tmp_path / "init_filters.epc", trained)
    acc = evaluate(str(tmp_path / "ck" / "last.epc"))["accuracy"]
    assert acc == pytest.approx(m["test_accuracy"])
    assert acc - evaluate(str(tmp_path / "init_filters.epc"))["accuracy"] > 0.01
