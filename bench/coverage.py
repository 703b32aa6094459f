"""Converter coverage: which real architectures `epc compile` takes, from ONNX and from the
PyTorch module, and what it says about the rest.

Models: torchvision's classification models and a set of timm's convolutional ones, with
random weights (seeded), and the nine `light` models shipped in the onnx wheel
(onnx/backend/test/data/light, constant weights). Each is taken as a new user would:
`epc.check` (the compatibility report), then `epc compile --verify`; a model refused only
for smooth ops or gates is compiled again with `--substitute`, and its deviation from the
source is reported. Each model runs in its own process (a crash or a memory blow-up costs
one row), one torch thread.

torchvision and timm are not epc dependencies (PyPI's torchvision is a CUDA build that
does not load beside the CPU torch epc uses), so the stages that need them run in a
separate venv that has them and epc installed with --no-deps:

    python -m venv /work/tv-venv && /work/tv-venv/bin/pip install torch==2.14.1 \\
        torchvision==0.29.1 timm onnx onnxruntime onnxscript networkx typer
    /work/tv-venv/bin/pip install --no-deps -e .
    /work/tv-venv/bin/python -m bench.coverage export --dir /tmp/cov      # ONNX files
    python -m bench.coverage onnx --dir /tmp/cov --json /tmp/cov/onnx.json  # epc's venv
    /work/tv-venv/bin/python -m bench.coverage torch --json /tmp/cov/torch.json
    python -m bench.coverage light --json /tmp/cov/light.json          # no torchvision
    python -m bench.coverage table /tmp/cov/*.json                     # the table

`export` writes each model's legacy (TorchScript) ONNX export at opset 17, or, where that
exporter fails (an adaptive pool whose output size does not divide its input's, as in
vgg/alexnet at 64 px), the dynamo exporter's; `manifest.json` lists them. A stage whose
libraries are missing says so, writes a JSON that says so, and exits 0.
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
def export_one(lib: str, name: str, size: int, path: str) -> dict:
    """The model's ONNX file: the legacy exporter (opset 17), else the dynamo one."""
    import warnings

    import torch
    torch.set_num_threads(1)
    m = _build(lib, name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
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
    if kind == "torch":
        src = _build(spec["lib"], spec["name"])
        x = torch.randn(1, 3, spec["size"], spec["size"],
                        generator=torch.Generator().manual_seed(0))
        kw = {"example_input": x}
    else:
        src, kw = spec["path"], {}
    row: dict = {"path": kind}
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


def _run(kind: str, spec: dict) -> dict:
    """run_one in a fresh process (a crash or a timeout is that row's result)."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-m", "bench.coverage", "_one", "--kind", kind,
           "--spec", json.dumps(spec), "--out", out]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        with open(out) as f:
            text = f.read()
        row = json.loads(text) if text else {
            "path": kind, "status": "crashed",
            "error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:400]}
    except subprocess.TimeoutExpired:
        row = {"path": kind, "status": "timeout", "error": f"over {TIMEOUT} s"}
    finally:
        os.remove(out)
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return row


# --------------------------------------------------------------------------- stages
def stage_export(args) -> dict:
    miss = _missing(["torch", "torchvision", "timm"])
    libs = [lib for lib in ("torchvision", "timm") if _missing([lib]) is None]
    if not libs:
        return {"skipped": f"not importable here: {miss}; run this stage in a venv with "
                           f"torchvision/timm (see bench/coverage.py)"}
    os.makedirs(args.dir, exist_ok=True)
    manifest = {"libs": libs, "missing": miss, "models": []}
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
        entry = {"key": _key(lib, name, size), "lib": lib, "name": name, "size": size,
                 "path": path if info.get("exporter") else None, **info}
        manifest["models"].append(entry)
        print(f"{entry['key']}: {info.get('exporter') or 'export failed'}", flush=True)
        with open(os.path.join(args.dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def stage_onnx(args) -> dict:
    with open(os.path.join(args.dir, "manifest.json")) as f:
        manifest = json.load(f)
    rows = {}
    for m in manifest["models"]:
        if args.models and m["name"] not in args.models:
            continue
        if not m.get("path"):
            rows[m["key"]] = {"path": "onnx", "status": "export failed",
                              "error": m.get("dynamo_error") or m.get("error")}
        else:
            rows[m["key"]] = {**_run("onnx", m), "exporter": m["exporter"]}
        print(f"{m['key']} onnx: {_brief(rows[m['key']])}", flush=True)
        _save(args.json, {"stage": "onnx", "rows": rows})
    return {"stage": "onnx", "rows": rows}


def stage_torch(args) -> dict:
    libs = [lib for lib in ("torchvision", "timm") if _missing([lib]) is None]
    if not libs:
        return {"stage": "torch", "skipped": f"not importable here: "
                                             f"{_missing(['torchvision', 'timm'])}"}
    rows = {}
    for lib, name, size in _entries(libs):
        if args.models and name not in args.models:
            continue
        key = _key(lib, name, size)
        rows[key] = _run("torch", {"lib": lib, "name": name, "size": size})
        print(f"{key} torch: {_brief(rows[key])}", flush=True)
        _save(args.json, {"stage": "torch", "rows": rows})
    return {"stage": "torch", "rows": rows}


def stage_light(args) -> dict:
    import onnx
    d = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    rows = {}
    for name in LIGHT:
        if args.models and name not in args.models:
            continue
        path = os.path.join(d, f"light_{name}.onnx")
        key = f"onnx-light:{name}@224"
        rows[key] = _run("onnx", {"path": path}) if os.path.exists(path) else \
            {"path": "onnx", "status": "missing", "error": f"{path} not found"}
        print(f"{key}: {_brief(rows[key])}", flush=True)
        _save(args.json, {"stage": "light", "rows": rows})
    return {"stage": "light", "rows": rows}


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
        from epc.compiler.bundle import atomic_write_bytes
        atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def table(paths: list[str]) -> str:
    """The merged results as a markdown table: one row per model, a column per path."""
    merged: dict[str, dict] = {}
    for p in paths:
        with open(p) as f:
            obj = json.load(f)
        for key, row in obj.get("rows", {}).items():
            merged.setdefault(key, {})[row["path"]] = row
    lines = ["| model | from ONNX | from the PyTorch module |", "|---|---|---|"]
    for key in sorted(merged, key=lambda k: (k.split(":")[0], k)):
        cells = [_cell(merged[key].get(p)) for p in ("onnx", "torch")]
        lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    counts = {p: {} for p in ("onnx", "torch")}
    for rows in merged.values():
        for p, row in rows.items():
            counts[p][row["status"]] = counts[p].get(row["status"], 0) + 1
    lines.append("")
    for p, c in counts.items():
        if c:
            lines.append(f"{p}: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    for name in ("export", "onnx", "torch", "light"):
        p = sub.add_parser(name)
        p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "epc-coverage"))
        p.add_argument("--json", default=None, help="write the results here")
        p.add_argument("--models", nargs="*", default=None, help="only these model names")
    p = sub.add_parser("table")
    p.add_argument("results", nargs="+")
    p = sub.add_parser("_one")
    p.add_argument("--kind")
    p.add_argument("--spec")
    p.add_argument("--out")
    args = ap.parse_args(argv)
    if args.stage == "_one":
        return _child(args)
    if args.stage == "table":
        sys.stdout.write(table(args.results))
        return 0
    result = {"export": stage_export, "onnx": stage_onnx, "torch": stage_torch,
              "light": stage_light}[args.stage](args)
    if "skipped" in result:
        print(f"bench.coverage {args.stage}: skipped: {result['skipped']}")
    _save(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
