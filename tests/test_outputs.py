"""Where commands may write (epc/outputs.py): no output replaces an input, another output,
a link, a FIFO, a device or a directory, and an output that cannot be written is refused
before any work; checkpoint temporaries a killed write left are cleaned by the next run."""
from __future__ import annotations

import os
import shutil
import stat

import pytest

import epc.runtime.api as runtime_api
from epc.compiler.bundle import read_bundle
from epc.runtime import zoo
from epc.targets.torch import emit


def _refused(code, err, *needles) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("epc: error: "), (code, err)
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "mlp.epc"
    emit(zoo.mlp((64, 12, 10), max_sweeps=20, nudge_sweeps=8), p, None)
    return p


@pytest.fixture
def no_work(monkeypatch):
    """Any training, evaluation or gradient check that starts fails the test: refusals of
    outputs must come first."""
    def started(*a, **k):
        raise AssertionError("the command started its work before refusing the output")
    for name in ("train", "evaluate", "check_gradients"):
        monkeypatch.setattr(runtime_api, name, started)


def _program(run_cli, model, tmp_path):
    p = tmp_path / "mlp.nc"
    assert run_cli("compile", model, "--target", "neuromorphic", "-o", p, "-q")[0] == 0
    return p


def test_no_output_replaces_an_input(run_cli, model, tmp_path, examples, no_work):
    before = model.read_bytes()
    prog = _program(run_cli, model, tmp_path)
    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copy(model, ck / "last.epc")
    link = tmp_path / "hard.epc"
    os.link(model, link)
    cases = [
        (["train", model, "--metrics-json", model], "--metrics-json"),
        (["train", model, "--plot", model], "--plot"),
        (["train", link, "--metrics-json", model], "--metrics-json"),      # a hard link
        (["train", ck / "last.epc", "--checkpoint", ck], "--checkpoint"),  # no --resume
        (["train", prog, "-o", prog], "-o"),
        (["train", prog, "--metrics-json", prog], "--metrics-json"),
        (["eval", model, "--metrics-json", model], "--metrics-json"),
        (["check-gradients", model, "--metrics-json", model], "--metrics-json"),
        (["run", prog, "--metrics-json", prog], "--metrics-json"),
        (["compile", model, "-o", model], "-o"),
        (["compile", examples / "mlp_digits.onnx", "-o", tmp_path / "t.onnx",
          "--teacher", tmp_path / "t.onnx"], None),
        (["opt", model, "-o", model], "-o"),
    ]
    shutil.copy(examples / "mlp_digits.onnx", tmp_path / "t.onnx")
    for args, flag in cases:
        line = _refused(*run_cli(*args)[::2])
        assert "is the input file" in line and (flag is None or flag in line), (args, line)
    assert model.read_bytes() == before
    assert read_bundle(ck / "last.epc").graph.name == read_bundle(model).graph.name


def test_two_outputs_may_not_be_one_file(run_cli, model, tmp_path, no_work):
    out = tmp_path / "m.json"
    line = _refused(*run_cli("train", model, "--metrics-json", out, "--plot", out)[::2])
    assert "is also the --metrics-json output" in line
    ck = tmp_path / "ck"
    line = _refused(*run_cli("train", model, "--checkpoint", ck, "--metrics-json",
                             ck / "last.epc")[::2])
    assert "is also the --metrics-json output" in line


def test_outputs_onto_links_fifos_devices_directories(run_cli, model, tmp_path, no_work):
    target = tmp_path / "target.json"
    target.write_text("keep")
    sym = tmp_path / "sym.json"
    sym.symlink_to(target)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sub = tmp_path / "sub"
    sub.mkdir()
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    for out, why in ((sym, "a symbolic link"), (fifo, "a FIFO"), ("/dev/null", "a device"),
                     (sub, "a directory"), (".", "a directory"),
                     (plain / "x.json", "not a directory"),
                     ("/proc/self/x.json", "cannot"), ("/proc/x.json", "cannot")):
        for cmd in (["eval", model, "--metrics-json", out],
                    ["train", model, "--plot", out],
                    ["compile", model, "-o", out]):
            line = _refused(*run_cli(*cmd)[::2])
            assert why in line and str(out) in line, (cmd, line)
    assert sym.is_symlink() and target.read_text() == "keep"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # a checkpoint "directory" that is a regular file, or under one
    line = _refused(*run_cli("train", model, "--checkpoint", plain)[::2])
    assert "not a directory" in line and "--checkpoint" in line


def test_an_output_into_a_data_set_is_refused(run_cli, model, tmp_path, no_work):
    d = tmp_path / "mnist"
    d.mkdir()
    for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):
        (d / n).write_bytes(b"\0\0\x08\x01\0\0\0\0")
    line = _refused(*run_cli("eval", model, "--data", "mnist", "--data-dir", d,
                             "--metrics-json", d / "t10k-labels-idx1-ubyte")[::2])
    assert "is the input file" in line


def test_a_new_folder_is_fine_and_resume_rewrites_its_checkpoint(run_cli, model, tmp_path):
    out = tmp_path / "new" / "deeper" / "m.json"
    code, _, err = run_cli("eval", model, "--metrics-json", out)
    assert code == 0 and out.exists(), err
    ck = tmp_path / "ck"
    assert run_cli("train", model, "--epochs", "2", "--stop-after", "1", "--checkpoint", ck,
                   "-q")[0] == 0
    code, _, err = run_cli("train", model, "--epochs", "2", "--checkpoint", ck, "--resume", "-q")
    assert code == 0, err


def test_stale_checkpoint_temporaries_are_removed(run_cli, model, tmp_path):
    """A write killed before its rename leaves ck/.last.epc.XXXX.tmp; the next run (and
    --resume) removes it, and only it."""
    ck = tmp_path / "ck"
    ck.mkdir()
    stale = ck / ".last.epc.k1ll3d.tmp"
    stale.write_bytes(b"half a bundle")
    other = ck / "notes.tmp"
    other.write_text("mine")
    assert run_cli("train", model, "--epochs", "2", "--stop-after", "1", "--checkpoint", ck,
                   "-q")[0] == 0
    assert not stale.exists() and other.exists()
    stale.write_bytes(b"half a bundle")
    assert run_cli("train", model, "--epochs", "2", "--checkpoint", ck, "--resume", "-q")[0] == 0
    assert not stale.exists()
    assert sorted(p.name for p in ck.iterdir()) == ["last.epc", "notes.tmp"]
