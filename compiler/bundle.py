"""The on-disk bundle: one versioned file holding the IR text and its weights.

A bundle is a zip archive (stored, not compressed: weights do not compress and loading
stays fast) with

    manifest.json        {"format": "epc-bundle", "version": 1, "target": ..., "meta": {...}}
    graph.ir             the textual IR (compiler/text.py)
    weights/NAME.npy     one array per declared weight (numpy format, loaded without pickle)
    extra/NAME.npy       arrays a target or the trainer keeps (optimiser moments, RNG state)
    extra/NAME.json      JSON a target or the trainer keeps (training history, config)

Nothing here unpickles: `np.load(..., allow_pickle=False)` refuses object arrays. Writes go
to a temporary file in the destination folder and are renamed into place, so an
interrupted run never leaves a half-written bundle.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EpcError
from .ir import FORMAT_VERSION, Graph
from .text import attach_weights, parse, print_graph

BUNDLE_FORMAT = "epc-bundle"
BUNDLE_VERSION = FORMAT_VERSION


@dataclass
class Bundle:
    graph: Graph
    target: str | None = None                 # None (plain IR) or 'torch'
    meta: dict = field(default_factory=dict)  # free JSON: compile options, provenance
    arrays: dict[str, np.ndarray] = field(default_factory=dict)   # extra/*.npy
    docs: dict[str, object] = field(default_factory=dict)         # extra/*.json


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the new one.

    The file gets the permissions a plain open() would give it (0666 less the umask), or
    keeps those of the file it replaces; mkstemp's temporary is 0600, which would leave
    every checkpoint, metrics file and plot unreadable to anyone else.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr, order="C"), allow_pickle=False)  # (ascontiguousarray: 0-d -> 1-d)
    return buf.getvalue()


def bundle_bytes(b: Bundle) -> bytes:
    g = b.graph
    missing = [n for n, w in g.weights.items() if not isinstance(w, np.ndarray)]
    if missing:
        raise EpcError(f"cannot write a bundle: weights without data: {', '.join(missing[:5])}")
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "target": b.target,
                "meta": b.meta}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
        # declarations only: the data is in weights/, and the text stays readable by any
        # version-1 reader (no seeded(...) recipes)
        z.writestr("graph.ir", print_graph(g, weights="shapes"))
        for name in sorted(g.weights):
            z.writestr(f"weights/{name}.npy", _npy_bytes(g.weights[name]))
        for name in sorted(b.arrays):
            z.writestr(f"extra/{name}.npy", _npy_bytes(b.arrays[name]))
        for name in sorted(b.docs):
            z.writestr(f"extra/{name}.json", json.dumps(b.docs[name], indent=1, sort_keys=True))
    return buf.getvalue()


def write_bundle(path: str | os.PathLike, b: Bundle) -> None:
    atomic_write_bytes(path, bundle_bytes(b))


def is_bundle(path: str | os.PathLike) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return "manifest.json" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read a bundle; every problem is an EpcError naming the file."""
    path = str(path)
    if not os.path.exists(path):
        raise EpcError(f"{path}: no such file")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise EpcError(f"{path}: not an epc bundle ({e})")
    with z:
        names = set(z.namelist())
        try:
            manifest = json.loads(z.read("manifest.json"))
        except KeyError:
            raise EpcError(f"{path}: not an epc bundle (no manifest.json)")
        except (json.JSONDecodeError, UnicodeDecodeError, zipfile.BadZipFile, OSError) as e:
            raise EpcError(f"{path}: corrupt bundle manifest ({e})")
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            raise EpcError(f"{path}: not an epc bundle (manifest format is "
                           f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
        version = manifest.get("version")
        if not isinstance(version, int) or version > BUNDLE_VERSION:
            raise EpcError(f"{path}: bundle format version {version} is newer than this epc "
                           f"reads (up to {BUNDLE_VERSION}); upgrade epc")
        try:
            text = z.read("graph.ir").decode("utf-8")
            g = parse(text, source=f"{path}:graph.ir")

            def load(member: str) -> np.ndarray:
                arr = np.load(io.BytesIO(z.read(member)), allow_pickle=False)
                if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
                    raise EpcError(f"{path}: {member} holds non-numeric data")
                return arr

            tensors = {n: load(f"weights/{n}.npy") for n in g.weights
                       if f"weights/{n}.npy" in names}
            attach_weights(g, tensors)
            arrays, docs = {}, {}
            for m in sorted(names):
                if m.startswith("extra/") and m.endswith(".npy"):
                    arrays[m[6:-4]] = load(m)
                elif m.startswith("extra/") and m.endswith(".json"):
                    docs[m[6:-5]] = json.loads(z.read(m))
        except EpcError as e:
            if str(e).startswith(path):
                raise
            raise EpcError(f"{path}: {e}")
        except (KeyError, ValueError, zipfile.BadZipFile, OSError, EOFError) as e:
            raise EpcError(f"{path}: corrupt bundle ({e})")
    return Bundle(g, target=manifest.get("target"), meta=manifest.get("meta") or {},
                  arrays=arrays, docs=docs)
