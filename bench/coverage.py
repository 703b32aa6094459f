"""Converter coverage: which architectures `epc compile` takes, from ONNX and from the
PyTorch module, and what it says about the rest (issue 23). One command, JSON out:

    python -m bench.coverage --json /tmp/coverage.json            # builtin + light
    python -m bench.coverage --json /tmp/cov.json --torchvision-python /work/tv-venv/bin/python

Each model is taken as a new user would: `epc.check` (the compatibility report), then
`epc compile --verify`; a model refused only for smooth ops or gates is compiled again
with `--substitute` and its deviation from the source is reported. Each model and path
runs in its own process (a crash or a memory blow-up costs one row), one torch thread.

Sources (--sources, all by default):
* builtin: bench/coverage_models.py, small models with the layouts of torchvision's
  families that torchvision's own ResNet/VGG/MobileNetV2 examples do not cover (Fire
  modules, Inception and dense blocks, ShuffleNetV2 units, VGG's adaptive pool at a small
  size, HardSwish/SiLU and squeeze-excitation gates, ConvNeXt, a ViT), random weights at
  seed 0, 32x32 inputs: through the PyTorch frontend (the module) and the ONNX frontend
  (its legacy export at opset 17, or the dynamo export where the legacy exporter fails).
  They are written here, not torchvision's code: stand-ins, said so in every row.
* light: the nine `light` models shipped in the onnx wheel (onnx/backend/test/data/light,
  real ImageNet architectures with constant weights), ONNX only.
* torchvision: torchvision's and timm's classification models themselves, exported to
  ONNX by a Python that has them (--torchvision-python; PyPI's torchvision is a CUDA build
  that cannot be installed beside epc's CPU torch, so it lives in its own venv:
  `python -m venv V && V/bin/pip install torchvision timm onnx onnxscript`), surveyed
  here through the ONNX frontend. Skipped (and said so in the JSON) without it.

`python -m bench.coverage table FILE.json` prints the markdown table of a result file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

from bench import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, input size); classification models of torchvision.models
TORCHVISION = [
    ("resnet18", 224), ("resnet34", 224), ("resnet50", 224), ("wide_resnet50_2", 224),
    ("resnext50_32x4d", 224), ("vgg11", 224), ("vgg16_bn", 224), ("alexnet", 224),
    ("vgg11", 64), ("alexnet", 64), ("mobilenet_v2", 224), ("mnasnet0_5", 224),
    ("regnet_x_400mf", 224), ("squeezenet1_0", 224), ("squeezenet1_1", 224),
    ("densenet121", 224), ("googlenet", 224), ("inception_v3", 299),
    ("shufflenet_v2_x1_0", 224), ("mobilenet_v3_small", 224), ("mobilenet_v3_large", 224),
    ("efficientnet_b0", 224), ("regnet_y_400mf", 224), ("convnext_tiny", 224),
    ("vit_b_16", 224),
]
# timm's convolutional models (timm.create_model(name, pretrained=False)), and two others
TIMM = [
    ("resnet18", 224), ("resnet50d", 224), ("regnety_002", 224), ("densenet121", 224),
    ("dla34", 224), ("dpn68b", 224), ("selecsls42b", 224), ("ese_vovnet19b_dw", 224),
    ("efficientnet_b0", 224), ("mobilenetv3_large_100", 224), ("ghostnet_100", 224),
    ("rexnet_100", 224), ("mixnet_s", 224), ("cspdarknet53", 224), ("repvgg_a0", 224),
    ("convnext_nano", 224), ("vit_tiny_patch16_224", 224),
]
LIGHT = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
         "shufflenet", "squeezenet", "vgg19", "zfnet512"]
TIMEOUT = 1800          # seconds per model and path


def _key(lib: str, name: str, size: int) -> str:
    return f"{lib}:{name}@{size}"


def _missing(libs: list[str]) -> str | None:
    import importlib.util
    gone = [m for m in libs if importlib.util.find_spec(m) is None]
    return ", ".join(gone) if gone else None


def _build(lib: str, name: str):
    """The model with random weights (seed 0), eval mode."""
    import torch
    torch.manual_seed(0)
    if lib == "builtin":
        from bench.coverage_models import build
        return build(name)
    if lib == "torchvision":
        import torchvision
        kw = {"aux_logits": False, "init_weights": True} \
            if name in ("googlenet", "inception_v3") else {}
        m = torchvision.models.get_model(name, weights=None, **kw)
    else:
        import timm
        m = timm.create_model(name, pretrained=False)
    return m.eval()


def _entries(libs) -> list[tuple[str, str, int]]:
    out = []
    if "torchvision" in libs:
        out += [("torchvision", n, s) for n, s in TORCHVISION]
    if "timm" in libs:
        out += [("timm", n, s) for n, s in TIMM]
    return out


# --------------------------------------------------------------------------- export
def _example(lib: str, name: str, size: int):
    import torch
    shape = (3, size, size)
    if lib == "builtin":
        from bench.coverage_models import MODELS
        shape = MODELS[name][1]
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))


def export_one(lib: str, name: str, size: int, path: str) -> dict:
    """The model's ONNX file: the legacy exporter (opset 17), else the dynamo one."""
    import warnings

    import torch
    torch.set_num_threads(1)
    m = _build(lib, name)
    x = _example(lib, name, size)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(m, (x,), path, dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
            return {"exporter": "legacy opset 17", "seconds": time.perf_counter() - t0}
        except Exception as e:   # noqa: BLE001 - recorded, then the other exporter
            legacy = _first_line(e)
        import contextlib
        import io
        import logging
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(m, (x,), dynamo=True, input_names=["input"],
                                  output_names=["logits"], verbose=False).save(path)
            return {"exporter": "dynamo", "legacy_error": legacy,
                    "seconds": time.perf_counter() - t0}
        except Exception as e:   # noqa: BLE001
            return {"exporter": None, "legacy_error": legacy,
                    "dynamo_error": _first_line(e)}


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}"[:400]


# --------------------------------------------------------------------------- one model
def run_one(kind: str, spec: dict) -> dict:
    """check + compile --verify (+ --substitute) of one model: from its ONNX file
    (kind 'onnx') or its PyTorch module (kind 'torch')."""
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import epc
    from epc.api import compile_result
    row: dict = {"path": kind}
    if kind == "torch":
        src = _build(spec["lib"], spec["name"])
        kw = {"example_input": _example(spec["lib"], spec["name"], spec["size"])}
    elif spec.get("path"):
        src, kw = spec["path"], {}
    else:      # a builtin model: its ONNX export first (into the run's temporary folder)
        src, kw = os.path.join(spec["dir"], f"{spec['name']}.onnx"), {}
        info = export_one(spec["lib"], spec["name"], spec["size"], src)
        row["exporter"] = info.get("exporter")
        if not info.get("exporter"):
            return {**row, "status": "export failed",
                    "error": info.get("dynamo_error") or info.get("legacy_error")}
    if spec.get("memory_limit"):
        kw["memory_limit"] = spec["memory_limit"]
    t0 = time.perf_counter()
    try:
        rep = epc.check(src, **kw)
    except epc.EpcError as e:
        return {**row, "status": "failed", "error": str(e)[:600]}
    row["check_seconds"] = round(time.perf_counter() - t0, 2)
    row["unsupported"] = {u["op"]: u["count"] for u in rep["unsupported"]}
    row["reasons"] = {u["op"]: f"{u['first']}: {u['reason']}" for u in rep["unsupported"]}
    substitute = False
    if not rep["compatible"]:
        if rep["unsupported"] and all(u["substitutable"] for u in rep["unsupported"]):
            substitute = True
        else:
            return {**row, "status": "refused", "error": (rep["error"] or "")[:600]}
    t0 = time.perf_counter()
    try:
        res = compile_result(src, verify=True, substitute=substitute, **kw)
    except epc.EpcError as e:
        return {**row, "status": "failed", "error": str(e)[:600]}
    g = res.graph
    row.update(status="substituted" if substitute else "verified",
               states=len(g.states), couplings=len(g.couplings),
               parameters=g.num_parameters(), compile_seconds=round(res.seconds, 2),
               seconds=round(time.perf_counter() - t0, 2),
               verify_error=float(res.verify.error),
               agreement=float(np.round(res.verify.agreement, 4)),
               samples=res.verify.samples, substituted=res.substituted)
    return row


def _child(args) -> int:
    spec = json.loads(args.spec)
    try:
        row = run_one(args.kind, spec)
    except Exception as e:   # noqa: BLE001 - a bug in epc: recorded as such
        row = {"path": args.kind, "status": "internal error", "error": _first_line(e),
               "traceback": traceback.format_exc()[-2000:]}
    with open(args.out, "w") as f:
        json.dump(row, f)
    return 0


def _run(kind: str, spec: dict, timeout: int = 0) -> dict:
    """run_one in a fresh process (a crash or a timeout is that row's result)."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-m", "bench.coverage", "_one", "--kind", kind,
           "--spec", json.dumps(spec), "--out", out]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout or TIMEOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        with open(out) as f:
            text = f.read()
        row = json.loads(text) if text else {
            "path": kind, "status": "crashed",
            "error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:400]}
    except subprocess.TimeoutExpired:
        row = {"path": kind, "status": "timeout", "error": f"over {timeout or TIMEOUT} s"}
    finally:
        os.remove(out)
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return row


# --------------------------------------------------------------------------- sources
def survey_builtin(args, rows: dict, save) -> None:
    from bench.coverage_models import MODELS
    with tempfile.TemporaryDirectory() as d:
        for name, (_, shape, family) in MODELS.items():
            if args.models and name not in args.models:
                continue
            key = _key("builtin", name, shape[-1])
            spec = {"lib": "builtin", "name": name, "size": shape[-1], "dir": d,
                    "memory_limit": args.memory_limit}
            for kind in ("torch", "onnx"):
                row = _run(kind, spec, args.timeout)
                row["stands_in_for"] = f"torchvision {family} (a stand-in written here)"
                rows.setdefault(key, {})[kind] = row
                print(f"{key} {kind}: {_brief(row)}", flush=True)
                save()


def survey_light(args, rows: dict, save) -> None:
    import onnx
    d = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    for name in LIGHT:
        if args.models and name not in args.models:
            continue
        path = os.path.join(d, f"light_{name}.onnx")
        key = f"onnx-light:{name}@224"
        row = _run("onnx", {"path": path, "memory_limit": args.memory_limit},
                   args.timeout) if os.path.exists(path) else \
            {"path": "onnx", "status": "missing", "error": f"{path} not found"}
        rows.setdefault(key, {})["onnx"] = row
        print(f"{key}: {_brief(row)}", flush=True)
        save()


def survey_torchvision(args, rows: dict, save) -> str | None:
    """torchvision's and timm's models, exported by --torchvision-python; returns why
    the source was skipped, if it was."""
    py = args.torchvision_python
    if not py:
        return "no --torchvision-python given (a Python with torchvision and timm)"
    d = os.path.join(args.dir, "torchvision")
    os.makedirs(d, exist_ok=True)
    cmd = [py, "-m", "bench.coverage", "_export", "--dir", d]
    if args.models:
        cmd += ["--models", *args.models]
    # the exporters' own output (the legacy one prints its whole graph when it fails) is
    # kept out of the survey's; the manifest records each model's outcome
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stderr=subprocess.PIPE, text=True)
    manifest = os.path.join(d, "manifest.json")
    if p.returncode != 0 or not os.path.exists(manifest):
        last = (p.stderr.strip().splitlines() or [""])[-1][:300]
        return f"{py} could not export the models (exit {p.returncode}: {last})"
    with open(manifest) as f:
        man = json.load(f)
    for m in man["models"]:
        if m.get("path"):
            row = {**_run("onnx", {"path": m["path"], "memory_limit": args.memory_limit},
                          args.timeout), "exporter": m["exporter"]}
        else:
            row = {"path": "onnx", "status": "export failed",
                   "error": m.get("dynamo_error") or m.get("error")}
        rows.setdefault(m["key"], {})["onnx"] = row
        print(f"{m['key']} onnx: {_brief(row)}", flush=True)
        save()
    return None if man.get("libs") else f"{py} has neither torchvision nor timm"


def export_all(args) -> int:
    """(run by --torchvision-python) torchvision's and timm's models as ONNX files in
    args.dir, with manifest.json listing them."""
    libs = [lib for lib in ("torchvision", "timm") if _missing([lib]) is None]
    os.makedirs(args.dir, exist_ok=True)
    manifest = {"libs": libs, "missing": _missing(["torchvision", "timm"]), "models": []}
    for lib, name, size in _entries(libs):
        if args.models and name not in args.models:
            continue
        path = os.path.join(args.dir, f"{lib}_{name}_{size}.onnx")
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=args.dir)
        os.close(fd)
        try:
            info = export_one(lib, name, size, tmp)
            if info.get("exporter"):
                os.replace(tmp, path)
        except Exception as e:   # noqa: BLE001 - the model itself does not build
            info = {"exporter": None, "error": _first_line(e)}
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        manifest["models"].append({"key": _key(lib, name, size), "lib": lib, "name": name,
                                   "size": size,
                                   "path": path if info.get("exporter") else None, **info})
        print(f"{_key(lib, name, size)}: {info.get('exporter') or 'export failed'}",
              flush=True)
        with open(os.path.join(args.dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    with open(os.path.join(args.dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return 0


def summary(rows: dict) -> dict:
    """Counts per source and path: how many models verified, substituted, refused..."""
    out: dict = {}
    for key, paths in rows.items():
        src = key.split(":")[0]
        for kind, row in paths.items():
            c = out.setdefault(f"{src} {kind}", {})
            c[row["status"]] = c.get(row["status"], 0) + 1
    return out


def _brief(row: dict) -> str:
    s = row["status"]
    if s == "verified":
        return f"verified, error {row['verify_error']:.1e}"
    if s == "substituted":
        return (f"substituted ({row['substituted']}), deviation {row['verify_error']:.3g}, "
                f"agreement {row['agreement']:.2f}")
    if s == "refused":
        return "refused: " + ", ".join(f"{k} x{v}" for k, v in row["unsupported"].items())
    return f"{s}: {row.get('error', '')}"


def _save(path: str | None, obj: dict) -> None:
    if path:
        write_json(path, obj)


def table(rows: dict) -> str:
    """The results as a markdown table: one row per model, a column per path."""
    lines = ["| model | from ONNX | from the PyTorch module |", "|---|---|---|"]
    for key in sorted(rows, key=lambda k: (k.split(":")[0], k)):
        cells = [_cell(rows[key].get(p)) for p in ("onnx", "torch")]
        lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    lines.append("")
    for src, c in summary(rows).items():
        lines.append(f"{src}: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
    return "\n".join(lines) + "\n"


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    s = row["status"]
    if s == "verified":
        return f"verified ({row['verify_error']:.0e}; {row['states']} states)"
    if s == "substituted":
        return (f"--substitute: deviation {row['verify_error']:.2g}, same class "
                f"{row['agreement']:.0%} ({row['substituted']})")
    if s == "refused":
        return "refused: " + ", ".join(f"{k} x{v}" for k, v in row["unsupported"].items())
    return f"{s}: {row.get('error', '')[:160]}"


SOURCES = ("builtin", "light", "torchvision")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.coverage",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the results here (default: print only)")
    ap.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES),
                    help="which models to survey (default: all; torchvision needs "
                         "--torchvision-python)")
    ap.add_argument("--models", nargs="*", default=None, help="only these model names")
    ap.add_argument("--torchvision-python", default=None,
                    help="a Python with torchvision/timm that exports their models")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "epc-coverage"),
                    help="folder for the torchvision/timm exports (default: %(default)s)")
    ap.add_argument("--memory-limit", default=None,
                    help="epc's --memory-limit for every model (default: epc's, 1G; the "
                         "light vgg19 and zfnet512 fold 1.2-1.7G of constant weights)")
    ap.add_argument("--timeout", type=int, default=TIMEOUT,
                    help="seconds per model and path (default: %(default)s)")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["table"]:
        with open(argv[1]) as f:
            sys.stdout.write(table(json.load(f)["rows"]))
        return 0
    if argv[:1] in (["_one"], ["_export"]):
        sub = argparse.ArgumentParser()
        for flag in ("--kind", "--spec", "--out", "--dir"):
            sub.add_argument(flag)
        sub.add_argument("--models", nargs="*", default=None)
        a = sub.parse_args(argv[1:])
        return _child(a) if argv[0] == "_one" else export_all(a)
    args = ap.parse_args(argv)
    if args.json and os.path.exists(args.json) and not os.path.isfile(args.json):
        ap.error(f"--json {args.json} is not a regular file")
    result: dict = {"sources": args.sources, "memory_limit": args.memory_limit,
                    "skipped": {}, "rows": {}}
    t0 = time.perf_counter()

    def save() -> None:
        result["summary"] = summary(result["rows"])
        result["seconds"] = round(time.perf_counter() - t0, 1)
        _save(args.json, result)
    for src in args.sources:
        if src == "builtin":
            survey_builtin(args, result["rows"], save)
        elif src == "light":
            survey_light(args, result["rows"], save)
        else:
            why = survey_torchvision(args, result["rows"], save)
            if why:
                result["skipped"]["torchvision"] = why
                print(f"bench.coverage: torchvision skipped: {why}", flush=True)
    save()
    sys.stdout.write(table(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
