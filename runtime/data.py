"""Data sets for training and evaluation, shaped to a graph's input.

* digits: scikit-learn's bundled 8x8 digits, pixels / 16 into [0, 1], split with
  train_test_split(test_size=0.2, random_state=0) (1437 train / 360 test).
* mnist: the idx files (train-images-idx3-ubyte, ... ; gzipped or not) in a directory.
* fashion-mnist: Zalando's Fashion-MNIST, the same idx format (60,000 train / 10,000 test
  28x28 images, 10 classes), read from --data-dir or, without one, from the directory the
  Debian package `dataset-fashion-mnist` installs (/usr/share/datasets/fashion-mnist).
* cifar10 / cifar100: the binary distributions (cifar-10-batches-bin/data_batch_*.bin,
  cifar-100-binary/train.bin) or the python distribution, read by an unpickler that only
  reconstructs numpy arrays, lists, dicts, strings and numbers (never arbitrary objects).
* any pair of torch.utils.data.Dataset objects through the Python API.

Images become float32 in [0, 1], [N, C, H, W]. `fit_to_input` adapts them to a graph's
input shape: a flat input takes the flattened image, `resize` rescales H x W (bilinear),
and channels are replicated (1 -> 3) or averaged (3 -> 1) to match.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import pickletools
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from epc.compiler import flags
from epc.compiler.errors import EpcError
from epc.compiler.limits import check_memory, numel

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")
# Where `apt-get install dataset-fashion-mnist` puts the idx files (used without --data-dir).
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass
class Split:
    x: torch.Tensor      # float32 [N, ...]
    y: torch.Tensor      # int64 [N]


@dataclass
class Data:
    name: str
    train: Split
    test: Split
    num_classes: int


# --------------------------------------------------------------------------- readers
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, random_state=0)
    return xtr, ytr, xte, yte


def _open_maybe_gz(path: Path) -> bytes:
    """A data file's bytes, gunzipped if it is gzip; what a gzip member expands to beyond
    the file itself counts against the memory limit as it is read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EpcError(f"{path}: cannot read ({e.strerror or e})") from None
    if data[:2] != b"\x1f\x8b":
        return data
    out, total = [], 0
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            while True:
                chunk = f.read(1 << 24)
                if not chunk:
                    break
                total += len(chunk)
                check_memory(2 * max(total - len(data), 0), "decompressing it", str(path))
                out.append(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise EpcError(f"{path}: corrupt gzip file ({e})") from None
    return b"".join(out)


def _idx(path: Path) -> np.ndarray:
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise EpcError(f"{path}: not an unsigned-byte idx file")
    nd = data[3]
    if nd < 1 or len(data) < 4 + 4 * nd:
        raise EpcError(f"{path}: truncated idx header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd)
    if body.size != numel(dims):       # (exact: the dims may multiply past 2^63)
        raise EpcError(f"{path}: idx size {body.size} does not match its header {dims}")
    return body.reshape(dims)


def _find(root: Path, names: list[str]) -> Path | None:
    for n in names:
        for cand in (root / n, root / (n + ".gz")):
            if cand.is_file():
                return cand
    return None


def _mnist(root: Path, title: str = "MNIST"):
    out = []
    for split in ("train", "t10k"):
        ip = _find(root, [f"{split}-images-idx3-ubyte", f"{split}-images.idx3-ubyte",
                          f"MNIST/raw/{split}-images-idx3-ubyte"])
        lp = _find(root, [f"{split}-labels-idx1-ubyte", f"{split}-labels.idx1-ubyte",
                          f"MNIST/raw/{split}-labels-idx1-ubyte"])
        if ip is None or lp is None:
            raise EpcError(f"{root}: {title} idx files not found (expected "
                           f"{split}-images-idx3-ubyte[.gz] and {split}-labels-idx1-ubyte[.gz])")
        x, y = _idx(ip), _idx(lp)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or 0 in x.shape:
            raise EpcError(f"{ip}: images {list(x.shape)} and labels {list(y.shape)} ({lp}) "
                           f"do not match (one label per [H, W] image)")
        out += [(x.astype(np.float32) / 255.0)[:, None], y.astype(np.int64)]
    return out


def _cifar_bin(files: list[Path], label_bytes: int, fine: bool):
    xs, ys = [], []
    rec = label_bytes + 3072
    for f in files:
        data = _open_maybe_gz(f)
        if len(data) == 0 or len(data) % rec:
            raise EpcError(f"{f}: size {len(data)} is not a multiple of the {rec}-byte "
                           f"CIFAR record")
        a = np.frombuffer(data, dtype=np.uint8).reshape(-1, rec)
        ys.append(a[:, label_bytes - 1 if fine else 0].astype(np.int64))
        xs.append(a[:, label_bytes:].reshape(-1, 3, 32, 32))
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and plain containers (the CIFAR python format)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("copyreg", "_reconstructor")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise EpcError(f"refusing to unpickle {module}.{name}: only numpy arrays are "
                           f"accepted")
        found = super().find_class(module, name)
        if name != "_reconstruct":
            return found

        def reconstruct(subtype, shape, dtype):
            # a pickled array is made empty, then filled by __setstate__ from the bytes the
            # file holds; any other shape here would allocate what the file does not hold
            if tuple(shape) != (0,):
                raise EpcError(f"refusing to unpickle an array of shape {shape!r} before its "
                               f"data")
            return found(subtype, shape, dtype)
        return reconstruct


def _safe_unpickle(path: Path) -> dict:
    data = _open_maybe_gz(path)

    def why(e: BaseException) -> str:
        text = " ".join(str(e).split())[:120]
        return ascii(text)[1:-1] if text else type(e).__name__
    try:
        # walk the opcodes first (pure Python, reading from memory): a length the stream
        # does not hold is refused here, before the C unpickler would allocate it
        for _ in pickletools.genops(data):
            pass
    except Exception as e:  # noqa: BLE001 - any malformed stream: report, never trace back
        raise EpcError(f"{path}: not a CIFAR python batch (a malformed pickle: {why(e)})") \
            from None
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except EpcError as e:
        raise EpcError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - malformed stream: report, never trace back
        raise EpcError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {why(e)})") \
            from None
    if not isinstance(obj, dict):
        raise EpcError(f"{path}: not a CIFAR python batch (no dict)")
    # (the keys a Python 2 pickle wrote are bytes: b'data', b'labels'; latin-1 reads any)
    return {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_py(files: list[Path], key: str):
    xs, ys = [], []
    for f in files:
        d = _safe_unpickle(f)
        if "data" not in d or key not in d:
            raise EpcError(f"{f}: CIFAR python batch without 'data'/'{key}'")
        x = np.asarray(d["data"])
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            raise EpcError(f"{f}: 'data' is not a uint8 [N, 3072] array")
        labels = d[key]
        if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu":
            labels = labels.reshape(-1).tolist() if labels.ndim == 1 else None
        if not isinstance(labels, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 256
                for v in labels):
            raise EpcError(f"{f}: '{key}' is not a list of integer labels in [0, 255]")
        if len(labels) != len(x):
            raise EpcError(f"{f}: {len(labels)} labels for {len(x)} images")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)


def _cifar(root: Path, which: str):
    if which == "cifar10":
        for base in (root / "cifar-10-batches-bin", root):
            tr = [base / f"data_batch_{i}.bin" for i in range(1, 6)]
            if all(p.is_file() for p in tr) and (base / "test_batch.bin").is_file():
                return (*_cifar_bin(tr, 1, False), *_cifar_bin([base / "test_batch.bin"], 1, False))
        for base in (root / "cifar-10-batches-py", root):
            tr = [base / f"data_batch_{i}" for i in range(1, 6)]
            if all(p.is_file() for p in tr) and (base / "test_batch").is_file():
                return (*_cifar_py(tr, "labels"), *_cifar_py([base / "test_batch"], "labels"))
        raise EpcError(f"{root}: CIFAR-10 not found (expected cifar-10-batches-bin/"
                       f"data_batch_1..5.bin and test_batch.bin, or cifar-10-batches-py/)")
    for base in (root / "cifar-100-binary", root):
        if (base / "train.bin").is_file() and (base / "test.bin").is_file():
            return (*_cifar_bin([base / "train.bin"], 2, True),
                    *_cifar_bin([base / "test.bin"], 2, True))
    for base in (root / "cifar-100-python", root):
        if (base / "train").is_file() and (base / "test").is_file():
            return (*_cifar_py([base / "train"], "fine_labels"),
                    *_cifar_py([base / "test"], "fine_labels"))
    raise EpcError(f"{root}: CIFAR-100 not found (expected cifar-100-binary/train.bin and "
                   f"test.bin, or cifar-100-python/train and test)")


def check_data_name(name) -> str:
    if name not in DATASETS:
        raise EpcError(f"bad --data {name!r}: unknown data set (supported: "
                       f"{', '.join(DATASETS)}; other data through the Python API's dataset=)")
    return name


def data_files(name: str, data_dir=None) -> list[str]:
    """The files a named data set would be read from (those that exist): what a
    command's outputs must not replace."""
    if name not in DATASETS or name == "digits":
        return []
    if data_dir is None:
        if name != "fashion-mnist":
            return []
        data_dir = FASHION_MNIST_DIR
    root = Path(os.path.expanduser(str(data_dir)))
    names = []
    for split in ("train", "t10k"):
        for kind in ("images", "labels"):
            n = 3 if kind == "images" else 1
            names += [f"{split}-{kind}-idx{n}-ubyte", f"{split}-{kind}.idx{n}-ubyte",
                      f"MNIST/raw/{split}-{kind}-idx{n}-ubyte"]
    for d in ("cifar-10-batches-bin", "cifar-10-batches-py", "cifar-100-binary",
              "cifar-100-python", ""):
        for f in [f"data_batch_{i}{e}" for i in range(1, 6) for e in (".bin", "")] + \
                ["test_batch.bin", "test_batch", "train.bin", "test.bin", "train", "test"]:
            names.append(f"{d}/{f}" if d else f)
    out = []
    for n in names:
        for cand in (root / n, root / (n + ".gz")):
            if cand.is_file():
                out.append(str(cand))
    return out


# --------------------------------------------------------------------------- shaping
def parse_resize(spec) -> tuple[int, int] | None:
    if spec is None:
        return None
    if isinstance(spec, int) and not isinstance(spec, bool):
        parts = [spec]
    elif isinstance(spec, (tuple, list)) and all(
            isinstance(p, int) and not isinstance(p, bool) for p in spec):
        parts = list(spec)
    elif isinstance(spec, str) and re.fullmatch(r"\d{1,6}(x\d{1,6})?", spec.strip().lower()):
        parts = [int(p) for p in spec.strip().lower().split("x")]
    else:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1 or max(parts) > 1 << 14:
        raise EpcError(f"bad --resize {spec!r}: use H or HxW (each 1 to 16384), e.g. 32 or "
                       f"28x28")
    return (parts[0], parts[1])


def fit_to_input(x: torch.Tensor, input_shape: tuple, *, resize=None, channels: int | None = None,
                 name: str = "data") -> torch.Tensor:
    """Adapt images [N, C, H, W] (or any [N, ...]) to a graph's per-sample input shape."""
    input_shape = tuple(int(d) for d in input_shape)
    size = parse_resize(resize)
    channels = flags.check("channels", channels)
    if x.dim() == 4:
        # what resizing and replicating channels add to the data set, before doing it
        c = channels if channels else (input_shape[0] if len(input_shape) == 3 else x.shape[1])
        hw = size if size is not None else tuple(x.shape[2:])
        grown = x.shape[0] * numel((c, *hw)) * x.element_size() - x.numel() * x.element_size()
        check_memory(2 * max(grown, 0), f"resizing {x.shape[0]:,} images to "
                                        f"{c}x{hw[0]}x{hw[1]}", name)
        if size is not None and tuple(x.shape[2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        want_c = channels if channels else (input_shape[0] if len(input_shape) == 3 else None)
        if want_c and x.shape[1] != want_c:
            if x.shape[1] == 1:
                x = x.expand(-1, want_c, -1, -1)
            elif want_c == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise EpcError(f"{name}: cannot map {x.shape[1]} channels to {want_c}")
    if tuple(x.shape[1:]) == input_shape:
        return x.contiguous()
    if int(np.prod(x.shape[1:])) == int(np.prod(input_shape)):
        return x.reshape((x.shape[0],) + input_shape).contiguous()
    raise EpcError(f"{name}: samples are {list(x.shape[1:])} but the graph input is "
                   f"{list(input_shape)}; use --resize H[xW] (and --channels C) to adapt them")


def _check_labels(y: torch.Tensor, num_classes: int, name: str):
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise EpcError(f"{name}: labels range over [{int(y.min())}, {int(y.max())}] but the "
                       f"output state has {num_classes} classes")


def from_torch_dataset(ds, name: str) -> Split:
    """Materialise a torch Dataset of (x, label) pairs."""
    xs, ys = [], []
    try:
        for i in range(len(ds)):
            item = ds[i]
            x, y = item[0], item[1]
            xs.append(torch.as_tensor(np.asarray(x), dtype=torch.float32))
            ys.append(int(y))
    except (TypeError, ValueError, IndexError) as e:
        raise EpcError(f"{name}: items must be (input, integer label) pairs ({e})")
    if not xs:
        raise EpcError(f"{name}: empty dataset")
    return Split(torch.stack(xs), torch.tensor(ys, dtype=torch.int64))


def load_dataset(name: str = "digits", *, data_dir=None, input_shape=None, resize=None,
                 channels: int | None = None, num_classes: int | None = None,
                 dataset=None) -> Data:
    """Load a named data set (or a (train, test) pair of torch Datasets) shaped to the graph."""
    if dataset is not None:
        if not (isinstance(dataset, (tuple, list)) and len(dataset) == 2):
            raise EpcError("dataset= must be a (train, test) pair of torch Datasets")
        tr, te = from_torch_dataset(dataset[0], "train dataset"), \
            from_torch_dataset(dataset[1], "test dataset")
        name = "custom"
        arrays = None
    else:
        check_data_name(name)
        if name == "digits":
            arrays = _digits()
        else:
            if data_dir is None and name == "fashion-mnist":
                if not Path(FASHION_MNIST_DIR).is_dir():
                    raise EpcError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: install it "
                                   f"with `apt-get install dataset-fashion-mnist` or pass "
                                   f"--data-dir DIR holding its idx files")
                data_dir = FASHION_MNIST_DIR
            if data_dir is None:
                raise EpcError(f"data set {name} is read from a local directory: pass --data-dir")
            root = Path(os.path.expanduser(str(data_dir)))
            if not root.is_dir():
                raise EpcError(f"--data-dir {data_dir}: no such directory")
            if name in ("mnist", "fashion-mnist"):
                arrays = _mnist(root, "MNIST" if name == "mnist" else "Fashion-MNIST")
            else:
                arrays = _cifar(root, name)
        xtr, ytr, xte, yte = arrays
        if len(ytr) == 0 or len(yte) == 0:
            raise EpcError(f"{name}: the {'training' if len(ytr) == 0 else 'test'} split is "
                           f"empty")
        tr = Split(torch.as_tensor(np.ascontiguousarray(xtr)), torch.as_tensor(ytr))
        te = Split(torch.as_tensor(np.ascontiguousarray(xte)), torch.as_tensor(yte))
    k = num_classes or int(max(int(tr.y.max()), int(te.y.max())) + 1)
    _check_labels(tr.y, k, f"{name} train labels")
    _check_labels(te.y, k, f"{name} test labels")
    if input_shape is not None:
        tr = Split(fit_to_input(tr.x, input_shape, resize=resize, channels=channels, name=name), tr.y)
        te = Split(fit_to_input(te.x, input_shape, resize=resize, channels=channels, name=name), te.y)
    return Data(name, tr, te, k)
