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

import contextlib
import io
import json
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EpcError
from .ir import FORMAT_VERSION, Graph, WeightSpec
from .limits import check_memory, numel
from .text import DTYPES, attach_weights, parse, print_graph

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
    every checkpoint, metrics file and plot unreadable to anyone else. Only a new path or
    a regular file is replaced (a rename over a symbolic link, FIFO or device would
    replace the node itself); a path that cannot be written is an EpcError. (The driver
    checks its outputs the same way before a command starts: epc/outputs.py.)
    """
    path = Path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise EpcError(f"{path}: cannot write ({e.strerror or e})") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise EpcError(f"{path}: not a regular file; refusing to replace it")
    mode = st.st_mode & 0o7777 if st is not None else 0o666 & ~_umask()
    with _ctrl_c_after():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                       dir=path.parent)
        except OSError as e:
            raise EpcError(f"{path}: cannot write ({e.strerror or e})") from None
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(e, OSError):
                raise EpcError(f"{path}: cannot write ({e.strerror or e})") from None
            raise


@contextlib.contextmanager
def _ctrl_c_after():
    """A Ctrl-C during the block is delivered when it ends: between creating its temporary
    and renaming it into place, a write cannot be interrupted into leaving the temporary
    behind (or a file half-replaced); the interrupt then stops the command right after.
    Only in the main thread, where Python runs signal handlers, and only over Python's own
    handler (a Ctrl-C that is ignored stays ignored)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files an interrupted atomic write of `path` left beside it
    (`.NAME.*.tmp`: a write killed before its rename, e.g. a checkpoint during SIGKILL);
    returns those removed. Called before a run writes `path` again."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for e in entries:
        if e.startswith(f".{name}.") and e.endswith(".tmp") and len(e) > len(name) + 6:
            full = os.path.join(folder, e)
            try:
                if stat.S_ISREG(os.lstat(full).st_mode):
                    os.unlink(full)
                    removed.append(full)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise EpcError(f"{full}: cannot remove this stale temporary file "
                               f"({err.strerror or err})") from None
    return removed


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


# what zipfile raises for an archive it cannot read (NotImplementedError: a member or
# archive of a newer zip version, an unsupported feature)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
               NotImplementedError)


def is_bundle(path: str | os.PathLike) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return "manifest.json" in z.namelist()
    except _ZIP_ERRORS:
        return False


# --------------------------------------------------------------------------- reading
# A bundle is read strictly: the writer above makes one layout, and anything else (a member
# it never writes, a name twice, a dtype or shape other than the IR declares) is refused
# rather than guessed at; sizes are checked before anything is allocated.
_MEMBER_RE = re.compile(r"(manifest\.json|graph\.ir|weights/[^/]+\.npy|extra/[^/]+\.(npy|json))")
_MANIFEST_KEYS = {"format", "version", "target", "meta"}
MAX_MEMBERS = 100_000
# the IR's dtypes as stored in weights/*.npy (little endian, as np.save writes them here)
_WEIGHT_DTYPES = {k: np.dtype(t).newbyteorder("<") for k, t in DTYPES.items()}


def _fail(path: str, msg: str) -> EpcError:
    return EpcError(f"{path}: {msg}")


def json_loads(data: bytes, where: str):
    """JSON from a file's bytes; a document json cannot read (bad syntax, not UTF-8,
    nested too deep for its recursion, an integer of thousands of digits) is refused."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError: ValueError
        raise EpcError(f"{where}: not valid JSON ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120] if str(e) else 'too deep'})") from None


def _members(path: str, z: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by name, after checking the archive's own structure and
    sizes: no name twice, no encrypted member, stored or deflated only, and the bytes a
    compressed member expands to counted against the size limit before any is read."""
    infos = z.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _fail(path, f"not an epc bundle ({len(infos)} archive members)")
    size = os.path.getsize(path)
    out: dict[str, zipfile.ZipInfo] = {}
    expanded = 0
    for i in infos:
        name = i.filename
        if name in out:
            raise _fail(path, f"corrupt bundle: member {name} appears twice")
        if not _MEMBER_RE.fullmatch(name):
            raise _fail(path, f"corrupt bundle: unexpected member {name!r}")
        if i.flag_bits & 0x1:
            raise _fail(path, f"corrupt bundle: member {name} is encrypted")
        if i.compress_type == zipfile.ZIP_STORED:
            if i.file_size != i.compress_size or i.header_offset + i.compress_size > size:
                raise _fail(path, f"corrupt bundle: member {name} claims {i.file_size} bytes")
        elif i.compress_type == zipfile.ZIP_DEFLATED:
            expanded += i.file_size
        else:
            raise _fail(path, f"corrupt bundle: member {name} uses compression method "
                              f"{i.compress_type} (epc reads stored or deflated members)")
        out[name] = i
    check_memory(2 * expanded, "decompressing its members", path)
    return out


def _read(path: str, z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes (zipfile checks its CRC as it reaches the end)."""
    try:
        with z.open(info) as f:
            data = f.read(info.file_size + 1)
    except _ZIP_ERRORS + (zlib.error,) as e:
        raise _fail(path, f"corrupt bundle: member {info.filename}: {e}") from None
    if len(data) != info.file_size:
        raise _fail(path, f"corrupt bundle: member {info.filename} holds {len(data)} bytes, "
                          f"its header says {info.file_size}")
    return data


def read_npy(data: bytes, where: str, *, dtype: np.dtype | None = None,
             shape: tuple | None = None) -> np.ndarray:
    """An array from .npy bytes, without pickle: a little-endian real number dtype (the
    one `dtype` names, if given), C order, the shape `shape` (if given), and exactly the
    bytes that shape needs; checked before the array is made."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shp, fortran, dt = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shp, fortran, dt = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy format version {version[0]}.{version[1]}")
    except (ValueError, SyntaxError, TypeError, EOFError, tokenize.TokenError) as e:
        # (numpy reads the header's dict with the tokenizer and ast.literal_eval)
        raise EpcError(f"{where}: not a valid .npy array "
                       f"({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    if dt.kind not in "fiu" or dt.fields is not None or dt.subdtype is not None \
            or dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder != "little"):
        raise EpcError(f"{where}: holds {dt.str} data; epc reads little-endian real "
                       f"numbers (float, int)")
    if dtype is not None and dt != dtype:
        raise EpcError(f"{where}: holds {dt.name} data, the IR declares {dtype.name}")
    if fortran:
        raise EpcError(f"{where}: Fortran-ordered array; epc writes C order")
    if shape is not None and tuple(shp) != tuple(shape):
        raise EpcError(f"{where}: holds shape {list(shp)}, the IR declares {list(shape)}")
    need = numel(shp) * dt.itemsize
    if need != len(data) - f.tell():
        raise EpcError(f"{where}: shape {list(shp)} needs {need} bytes of data, the member "
                       f"holds {len(data) - f.tell()}")
    arr = np.frombuffer(data, dtype=dt, count=numel(shp), offset=f.tell()).reshape(shp)
    return np.array(arr.astype(dt.newbyteorder("="), copy=False), order="C")


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read a bundle; every problem is an EpcError naming the file."""
    path = str(path)
    if not os.path.exists(path):
        raise EpcError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise EpcError(f"{path}: not a file")
    try:
        z = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise EpcError(f"{path}: not an epc bundle ({e})") from None
    with z:
        members = _members(path, z)
        if "manifest.json" not in members:
            raise EpcError(f"{path}: not an epc bundle (no manifest.json)")
        manifest = json_loads(_read(path, z, members["manifest.json"]),
                              f"{path}: corrupt bundle manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            raise EpcError(f"{path}: not an epc bundle (manifest format is "
                           f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
        version = manifest.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise _fail(path, f"corrupt bundle manifest: version {version!r}")
        if version > BUNDLE_VERSION:
            raise EpcError(f"{path}: bundle format version {version} is newer than this epc "
                           f"reads (up to {BUNDLE_VERSION}); upgrade epc")
        unknown = sorted(set(manifest) - _MANIFEST_KEYS)
        if unknown:
            raise _fail(path, f"corrupt bundle manifest: unknown key {unknown[0]!r}")
        target, meta = manifest.get("target"), manifest.get("meta", {})
        if not (target is None or isinstance(target, str)):
            raise _fail(path, f"corrupt bundle manifest: target {target!r} is not a name")
        if not isinstance(meta, dict):
            raise _fail(path, "corrupt bundle manifest: meta is not a JSON object")
        if "graph.ir" not in members:
            raise _fail(path, "corrupt bundle: no graph.ir")
        try:
            text = _read(path, z, members["graph.ir"]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _fail(path, f"corrupt bundle: graph.ir is not UTF-8 ({e})") from None
        g = parse(text, source=f"{path}:graph.ir")
        tensors = {}
        for name, spec in g.weights.items():
            member = f"weights/{name}.npy"
            if not isinstance(spec, WeightSpec):       # graph.ir carries the data itself
                if member in members:
                    raise _fail(path, f"corrupt bundle: weight {name} has data both in "
                                      f"graph.ir and in {member}")
                continue
            if member not in members:
                raise _fail(path, f"corrupt bundle: weight {name} is declared but has no data")
            tensors[name] = read_npy(_read(path, z, members[member]), f"{path}: {member}",
                                     dtype=_WEIGHT_DTYPES[spec.dtype], shape=spec.shape)
        for m in members:
            if m.startswith("weights/") and m[8:-4] not in g.weights:
                raise _fail(path, f"corrupt bundle: {m} is no weight of the graph")
        attach_weights(g, tensors)
        from .verify import verify      # (it imports torch: `import epc` stays light)
        try:
            verify(g)
        except EpcError as e:
            raise _fail(path, str(e)) from None
        arrays, docs = {}, {}
        for m in sorted(members):
            if m.startswith("extra/") and m.endswith(".npy"):
                arrays[m[6:-4]] = read_npy(_read(path, z, members[m]), f"{path}: {m}")
            elif m.startswith("extra/") and m.endswith(".json"):
                docs[m[6:-5]] = json_loads(_read(path, z, members[m]), f"{path}: {m}")
    return Bundle(g, target=target, meta=meta, arrays=arrays, docs=docs)
