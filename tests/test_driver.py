"""The driver: the Python API and the CLI are one implementation.

For every command: the API function takes exactly the command's options (names, defaults),
gives the same result for the same options and refuses bad input with the same message.
Then what a person meets: the error boundary (one line and an exit status for bad input,
for a bug, for Ctrl-C), --help showing every default, output piped to a file, where
`epc compile` writes without -o, and a light `import epc`.
"""
from __future__ import annotations

import inspect as pyinspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

import epc
from epc import api
from epc.cli import app, main
from epc.compiler.bundle import read_bundle
from epc.compiler import flags
from epc.compiler.errors import EpcError
from epc.compiler.text import print_graph

COMMANDS = {"compile": api.compile_result, "opt": api.opt, "inspect": api.inspect,
            "train": api.train, "eval": api.evaluate, "check-gradients": api.check_gradients,
            "run": api.run, "backprop": api.backprop}
# what only the CLI has (it decides what is printed) and what only Python can pass
CLI_ONLY = {"quiet", "json", "check"}   # -q; `epc run --json` prints the metrics; `epc compile
#                                         --check` is its own API function, epc.check()
API_ONLY = {"example_input", "dataset", "progress", "on_epoch"}   # objects, callbacks
PY_NAMES = {"pass": "passes"}     # `epc opt --pass` (repeatable): a keyword in Python


def _cli_options(command: str) -> dict:
    """{snake_case long flag: default} of a command's options."""
    cmd = typer.main.get_command(app).commands[command]
    out = {}
    for p in cmd.params:
        if p.param_type_name != "option" or p.name == "help":
            continue
        flag = max((o for o in p.opts if o.startswith("--")), key=len)
        name = flag[2:].replace("-", "_")
        out[PY_NAMES.get(name, name)] = getattr(p.default, "value", p.default)
    return out


def _api_options(fn) -> dict:
    ps = list(pyinspect.signature(fn).parameters.values())[1:]     # after the source
    return {p.name: p.default for p in ps}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_api_function_takes_its_commands_options(command):
    cli = {k: v for k, v in _cli_options(command).items() if k not in CLI_ONLY}
    py = {k: v for k, v in _api_options(COMMANDS[command]).items() if k not in API_ONLY}
    assert set(cli) == set(py), (sorted(set(cli) - set(py)), sorted(set(py) - set(cli)))
    assert _normalised(cli) == _normalised(py)


def _normalised(options: dict) -> dict:
    """Defaults as their flag's rule reads them: the CLI hands --feedback-gain over as
    text ('1'), the API as a number (1.0); both mean the same."""
    out = {}
    for k, v in options.items():
        try:
            out[k] = flags.check(k, v) if k in flags.RULES else v
        except EpcError:
            out[k] = v
    return out
    if command == "compile":     # epc.compile shows the same signature to help()
        assert _api_options(epc.compile) == _api_options(api.compile_result)


def _err_line(code, err) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("epc: error: "), (code, err)
    return lines[0][len("epc: error: "):]


def _same_error(run_cli, args, call):
    """The CLI's one line says what the API's EpcError says."""
    line = _err_line(*run_cli(*args)[::2])
    with pytest.raises(EpcError) as e:
        call()
    assert str(e.value) == line


@pytest.fixture(scope="module")
def program(mlp_path, tmp_path_factory):
    p = tmp_path_factory.mktemp("nc") / "mlp.nc"
    assert main(["compile", mlp_path, "--target", "neuromorphic", "-o", str(p), "-q"]) == 0
    return str(p)


def test_compile_cli_and_api(run_cli, mlp_path, tmp_path):
    """--max-sweeps on a compiled input, and the neuromorphic options, reach the API too
    (both failed before: the API kept 100, and weight_bits= was a TypeError)."""
    b = tmp_path / "b.epc"
    assert run_cli("compile", mlp_path, "--max-sweeps", "7", "-o", b)[0] == 0
    g = epc.compile(mlp_path, max_sweeps=7)
    assert g.schedule.max_sweeps == 7 == read_bundle(b).graph.schedule.max_sweeps
    assert print_graph(g) == print_graph(read_bundle(b).graph)
    code, _, err = run_cli("compile", mlp_path, "--target", "neuromorphic", "--weight-bits",
                           "4", "-o", tmp_path / "cli.nc")
    assert code == 0, err
    epc.compile(mlp_path, target="neuromorphic", weight_bits=4, output=tmp_path / "api.nc")
    assert (tmp_path / "cli.nc").read_bytes() == (tmp_path / "api.nc").read_bytes()
    _same_error(run_cli, ("compile", mlp_path, "--target", "neuromorphic", "--weight-bits", "3",
                          "-o", tmp_path / "x.nc"),
                lambda: epc.compile(mlp_path, target="neuromorphic", weight_bits=3,
                                    output=tmp_path / "x.nc"))
    # a flag that would do nothing is refused, not ignored
    _same_error(run_cli, ("compile", mlp_path, "--weight-bits", "4", "-o", tmp_path / "x.epc"),
                lambda: epc.compile(mlp_path, weight_bits=4))
    assert not (tmp_path / "x.nc").exists() and not (tmp_path / "x.epc").exists()
    with pytest.raises(TypeError, match="compile.. got an unexpected keyword argument 'bits'"):
        epc.compile(mlp_path, bits=4)


def test_opt_cli_and_api(run_cli, examples, tmp_path):
    """`epc opt` runs named passes on IR text (or any source) and prints IR text; the API
    returns the same text, and both refuse a pass the options leave off."""
    src = Path(__file__).parent / "passes" / "residual_skips.epir"
    code, out, err = run_cli("opt", src, "--pass", "residual", "--identity-skip", "learned")
    assert code == 0, err
    assert out == epc.opt(src, passes=["residual"], identity_skip="learned")
    assert "coupling c_h1__h3 : h1 -> h3 [kind=residual" in out
    # the printed result parses back to the same text
    from epc.compiler.text import parse
    assert print_graph(parse(out)) == out
    # a whole pipeline on an ONNX file, written to a file too
    o = tmp_path / "mlp.epir"
    code, out, _ = run_cli("opt", examples / "mlp_digits.onnx", "--weights", "shapes", "-o", o)
    assert code == 0 and o.read_text() == out and "schedule [mode=colour" in out
    _same_error(run_cli, ("opt", src, "--pass", "pool_first"),
                lambda: epc.opt(src, passes=["pool_first"]))
    _same_error(run_cli, ("opt", src, "--pass", "nosuch"), lambda: epc.opt(src, passes=["nosuch"]))
    _same_error(run_cli, ("opt", src, "--weights", "all"), lambda: epc.opt(src, weights="all"))
    # no output replaces its input
    before = src.read_bytes()
    _same_error(run_cli, ("opt", src, "--pass", "residual", "-o", src),
                lambda: epc.opt(src, passes=["residual"], output=src))
    assert src.read_bytes() == before

def test_inspect_cli_and_api(run_cli, mlp_path, program, tmp_path):
    code, out, _ = run_cli("inspect", mlp_path, "--format", "json", "--stats")
    assert code == 0 and out == epc.inspect(mlp_path, format="json", stats=True)
    assert json.loads(out)["stats"]["parameters"] > 0
    code, out, _ = run_cli("inspect", program)
    assert code == 0 and out == epc.inspect(program) and "; ---- resources" in out
    assert epc.inspect(epc.load(mlp_path)) == run_cli("inspect", mlp_path)[1]
    _same_error(run_cli, ("inspect", tmp_path / "none.epc"),
                lambda: epc.inspect(tmp_path / "none.epc"))
    _same_error(run_cli, ("inspect", program, "--format", "dot"),
                lambda: epc.inspect(program, format="dot"))


def test_train_cli_and_api(run_cli, mlp_path, program, tmp_path):
    mj = tmp_path / "cli.json"
    code, out, err = run_cli("train", mlp_path, "--epochs", "1", "--seed", "2", "--lr", "2e-3",
                             "--metrics-json", mj, "-q")
    assert code == 0, err
    m = epc.train(mlp_path, epochs=1, seed=2, lr=2e-3)
    cli = json.loads(mj.read_text())
    assert cli["history"][0]["train_loss"] == m["history"][0]["train_loss"]
    assert cli["test_accuracy"] == m["test_accuracy"] and cli["config"] == m["config"]
    assert f"test acc {m['test_accuracy']:.2%}" in out
    _same_error(run_cli, ("train", mlp_path, "--beta", "0"), lambda: epc.train(mlp_path, beta=0.0))
    # options a neuromorphic program does not take are refused by both, by name
    _same_error(run_cli, ("train", program, "--lr", "0.01"), lambda: epc.train(program, lr=0.01))
    _same_error(run_cli, ("train", mlp_path, "--lr-shift", "3"),
                lambda: epc.train(mlp_path, lr_shift=3))
    # no output replaces the model it reads
    before = Path(mlp_path).read_bytes()
    _same_error(run_cli, ("train", mlp_path, "--metrics-json", mlp_path),
                lambda: epc.train(mlp_path, metrics_json=mlp_path))
    assert Path(mlp_path).read_bytes() == before


def test_train_a_program_cli_and_api(run_cli, program, tmp_path):
    code, out, err = run_cli("train", program, "--epochs", "1", "--lr-shift", "10",
                             "--beta", "0.5", "-o", tmp_path / "cli.nc")
    assert code == 0, err
    m = epc.train(program, epochs=1, lr_shift=10, beta=0.5, output=tmp_path / "api.nc")
    assert (tmp_path / "cli.nc").read_bytes() == (tmp_path / "api.nc").read_bytes()
    # accuracies print one way: percentages, as for float bundles
    assert f"epoch 1/1: train acc {m['history'][0]['train_accuracy']:.2%}" in out
    assert f"test acc {m['test_accuracy']:.2%}" in out.splitlines()[-1]
    _same_error(run_cli, ("train", program, "-o", program),
                lambda: epc.train(program, output=program))


def test_eval_cli_and_api(run_cli, mlp_path, program, tmp_path):
    code, out, _ = run_cli("eval", mlp_path, "--max-sweeps", "20", "--metrics-json",
                           tmp_path / "e.json")
    r = epc.evaluate(mlp_path, max_sweeps=20)
    e = json.loads((tmp_path / "e.json").read_text())
    assert code == 0 and (e["accuracy"], e["loss"]) == (r["accuracy"], r["loss"])
    assert f"accuracy {r['accuracy']:.2%}" in out
    code, out, _ = run_cli("eval", program, "--json", tmp_path / "p.json")   # the old name
    p = epc.evaluate(program)
    assert code == 0 and json.loads((tmp_path / "p.json").read_text())["accuracy"] \
        == p["accuracy"] == p["test_accuracy"]
    assert f"accuracy {p['accuracy']:.2%}" in out
    _same_error(run_cli, ("eval", mlp_path, "--split", "val"),
                lambda: epc.evaluate(mlp_path, split="val"))
    _same_error(run_cli, ("eval", program, "--split", "train"),
                lambda: epc.evaluate(program, split="train"))


def test_check_gradients_cli_and_api(run_cli, mlp_path, program, tmp_path):
    code, out, _ = run_cli("check-gradients", mlp_path, "--samples", "4", "--metrics-json",
                           tmp_path / "g.json")
    r = epc.check_gradients(mlp_path, samples=4)
    j = json.loads((tmp_path / "g.json").read_text())
    assert code == 0 and [c["cosine"] for c in j["couplings"]] == \
        [c["cosine"] for c in r["couplings"]]
    _same_error(run_cli, ("check-gradients", mlp_path, "--samples", "0"),
                lambda: epc.check_gradients(mlp_path, samples=0))
    _same_error(run_cli, ("check-gradients", program),
                lambda: epc.check_gradients(program))


def test_run_cli_and_api(run_cli, program, mlp_path, tmp_path):
    code, out, err = run_cli("run", program, "--limit", "50", "--json")
    m = epc.run(program, limit=50)
    cli = json.loads(out)
    assert code == 0 and cli["test_accuracy"] == m["test_accuracy"] and cli["samples"] == 50
    assert f"accuracy {m['test_accuracy']:.2%} on 50 samples" in err
    _same_error(run_cli, ("run", program, "--limit", "0"), lambda: epc.run(program, limit=0))
    _same_error(run_cli, ("run", mlp_path), lambda: epc.run(mlp_path))


# --------------------------------------------------------------------------- the boundary
def test_a_bug_is_reported_as_a_bug(run_cli, mlp_path, monkeypatch):
    """An unexpected exception is not passed off as bad input: exit status 1, one line that
    says so and where the traceback is; EPC_DEBUG=1 lets it through."""
    def broken(*a, **k):
        return {}["missing"]
    monkeypatch.setattr(api, "inspect", broken)
    code, out, err = run_cli("inspect", mlp_path)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("epc: internal error (KeyError: 'missing'); this is a bug in "
                               "epc, please report it: the traceback is in ")
    path = Path(lines[0].rsplit(" ", 1)[1])
    try:
        text = path.read_text()
        assert "Traceback" in text and "broken" in text and "KeyError" in text
    finally:
        path.unlink()
    monkeypatch.setenv("EPC_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["inspect", mlp_path])


def test_ctrl_c_is_one_line_and_status_130(run_cli, mlp_path, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(api, "inspect", interrupted)
    assert run_cli("inspect", mlp_path)[::2] == (130, "epc: interrupted\n")
    monkeypatch.setattr(api, "train", interrupted)
    code, _, err = run_cli("train", mlp_path, "--checkpoint", tmp_path / "ck", "-q")
    assert code == 130 and err.count("\n") == 1 and "continue with --resume" in err, err


def test_usage_errors_name_the_commands_help(run_cli, mlp_path):
    line = _err_line(*run_cli("compile", mlp_path, "--bogus")[::2])
    assert "--bogus" in line and line.endswith("(see `epc compile --help`)")


# --------------------------------------------------------------------------- what a person meets
def test_help_shows_every_default():
    """Every option that takes a value shows its default (a text where it depends on the
    input: --max-sweeps '100; a compiled input keeps its own'); only on/off flags whose
    default is off show none. Rich markup used to eat a '[default: ...]' in help texts."""
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if p.param_type_name != "option" or p.name == "help":
                continue
            off_flag = p.is_flag and p.default is False
            assert off_flag or p.show_default not in (False, None) or p.default is not None, \
                (name, p.name)
            assert off_flag or p.default is not None or isinstance(p.show_default, str), \
                (name, p.name, "a None default needs a text saying what it means")
            assert "[default" not in (p.help or ""), (name, p.name)
    env = {"COLUMNS": "200"}
    from typer.testing import CliRunner
    out = CliRunner().invoke(app, ["compile", "--help"], env=env).stdout
    for shown in ("[default: (100; a compiled input keeps its own)]",
                  "[default: (1e-4; a compiled input keeps its own)]",
                  "[default: (40; a compiled input keeps its own)]",
                  "[default: (SOURCE's stem + .epc, or .nc for --target neuromorphic, in the "
                  "current directory)]"):
        assert shown in out, shown
    out = CliRunner().invoke(app, ["train", "--help"], env=env).stdout
    assert "[default: (0.2; a neuromorphic program's own)]" in out
    assert "[default: (the program's)]" in out


def test_piped_training_prints_each_epoch_once(mlp_path):
    """Into a pipe (a log file) there is no progress bar: each epoch is one line, once (the
    bar used to print every epoch again when the run ended)."""
    p = subprocess.run([sys.executable, "-m", "epc", "train", mlp_path, "--epochs", "2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [l.split(":")[0] for l in lines] == ["epoch 1", "epoch 2", "trained 2 "
                                                "epochs in " + lines[-2].split(" in ")[1]
                                                .split(":")[0], "recipe"]
    # the recipe the run picked (metrics JSON: recipe), as the flags that set it
    assert lines[-1] == ("recipe: 1 hidden state, symmetric feedback (feedback gain 1), "
                         "weight decay 0.001 (decoupled), lr 0.0005 (the default); no warm "
                         "start (auto: symmetric feedback, where warm conversion was "
                         "measured to fail)"), lines[-1]
    assert "━" not in p.stdout and "\x1b" not in p.stdout


def test_compile_without_output_says_where_it_wrote(run_cli, examples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("compile", examples / "mlp_digits.onnx")
    assert code == 0 and (tmp_path / "mlp_digits.epc").exists()
    assert err.startswith(f"epc: wrote mlp_digits.epc (no -o given: SOURCE's stem, in "
                          f"{tmp_path}): "), err
    # recompiling that bundle without -o would overwrite it: refused, the input kept
    before = (tmp_path / "mlp_digits.epc").read_bytes()
    line = _err_line(*run_cli("compile", "mlp_digits.epc", "--max-sweeps", "5")[::2])
    assert "is the input file" in line
    assert (tmp_path / "mlp_digits.epc").read_bytes() == before


def test_import_epc_is_light():
    """`import epc` (run first by every `import epc.compiler...`) imports neither torch nor
    numpy; the API's names resolve on first use."""
    code = ("import sys, epc; light = 'torch' not in sys.modules and 'numpy' not in "
            "sys.modules; print(light, callable(epc.compile), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True", "False"], out
    assert set(epc.__all__) >= {"compile", "inspect", "train", "evaluate", "check_gradients",
                                "run", "load", "save"}
    assert os.path.dirname(epc.api.__file__) == os.path.dirname(epc.__file__)
