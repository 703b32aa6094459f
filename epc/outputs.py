"""Where a command may write: every output path is checked before the command starts.

An output (-o, --metrics-json, --plot, --checkpoint DIR's last.epc) is written atomically
(a temporary file in the same folder, renamed over the target), so it must be a path
that a rename may replace: a new path, or an existing regular file that is none of the
command's inputs. Refused, each with one line naming the flag and the path:

* a path that resolves to an input of the command (the model, a teacher, a data file;
  through any spelling, hard or symbolic link) or to another output of the same command;
* a symbolic link, directory, FIFO, device or socket (a rename would replace the link
  or the node itself, not write through it);
* a path under something that is not a directory, or in a folder where no file can be
  created (no permission, a read-only or virtual file system such as /proc).

The checks run before any work, so a run is not refused after an hour of training. A
checkpoint directory may itself be a symbolic link to a directory (its last.epc inside
is what gets replaced); `--resume` reads and rewrites that last.epc by design.
"""
from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable

from epc.compiler.errors import EpcError

CHECKPOINT_FILE = "last.epc"


@dataclass(frozen=True)
class Output:
    flag: str           # '-o', '--metrics-json', ...
    path: str
    directory: bool = False     # a checkpoint directory: the file written is DIR/last.epc


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _lstat(path: str, flag: str) -> os.stat_result | None:
    """lstat(path), None for a path that does not exist yet; a path through a
    non-directory, too long or looping is refused."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise EpcError(f"{flag} {path}: a folder on the path is not a directory") from None
    except OSError as e:
        raise EpcError(f"{flag} {path}: cannot write there ({_why(e)})") from None


def _probe_folder(path: str, flag: str) -> None:
    """The folder that will hold `path` (or, if it does not exist yet, its nearest existing
    ancestor, where it will be created) must be a directory where a file can be made."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            st = os.stat(folder)
            break
        except FileNotFoundError:
            parent = os.path.dirname(folder)
            if parent == folder:
                raise EpcError(f"{flag} {path}: no existing folder to write it in") from None
            folder = parent
        except NotADirectoryError:
            raise EpcError(f"{flag} {path}: a folder on the path is not a directory") from None
        except OSError as e:
            raise EpcError(f"{flag} {path}: cannot write there ({_why(e)})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise EpcError(f"{flag} {path}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".epc-probe-", suffix=".tmp", dir=folder)
    except OSError as e:
        raise EpcError(f"{flag} {path}: cannot create files in {folder} ({_why(e)})") from None
    os.close(fd)
    os.unlink(probe)
    name = os.path.basename(path)
    if len(os.fsencode(f".{name}.XXXXXXXX.tmp")) > 255:
        raise EpcError(f"{flag} {path}: file name too long")


def _output_file(flag: str, path: str) -> os.stat_result | None:
    """Checks for one file an output replaces; returns its stat (None: a new path)."""
    st = _lstat(path, flag)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise EpcError(f"{flag} {path}: is {_kind(st.st_mode)}; epc writes a new file or "
                       f"replaces a regular one")
    _probe_folder(path, flag)
    return st


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _files(p: Any) -> list[str]:
    if isinstance(p, (str, os.PathLike)):
        return [os.fspath(p)]
    if isinstance(p, (list, tuple, set)):
        return [os.fspath(x) for x in p if isinstance(x, (str, os.PathLike))]
    return []


def check_outputs(inputs: Iterable[Any], outputs: Iterable[Output],
                  rewrites: Iterable[Any] = ()) -> None:
    """Refuse, before any work, an output path that cannot or must not be replaced (see
    the module docstring). `inputs`: files the command reads (paths, lists of paths;
    anything else, such as an in-memory graph, is skipped). `rewrites`: inputs an
    output may replace by design (--resume's checkpoint)."""
    ins = []
    for p in inputs:
        for f in _files(p):
            try:
                ins.append((f, os.stat(f)))
            except (OSError, ValueError):
                pass      # missing inputs are their readers' to report
    allowed = []
    for p in rewrites:
        for f in _files(p):
            try:
                allowed.append(os.stat(f))
            except (OSError, ValueError):
                pass
    seen: list[tuple[str, str, os.stat_result | None, str]] = []
    for out in outputs:
        if out.path is None:
            continue
        path = os.fspath(out.path)
        if not path or "\0" in path:
            raise EpcError(f"{out.flag} {path!r}: not a file name")
        if out.directory:
            st = _lstat(path, out.flag)
            try:
                dst = os.stat(path) if st is not None else None
            except OSError as e:
                raise EpcError(f"{out.flag} {path}: {_why(e)}") from None
            if dst is not None and not stat.S_ISDIR(dst.st_mode):
                raise EpcError(f"{out.flag} {path}: is {_kind(dst.st_mode)}, not a directory "
                               f"(the checkpoint directory)")
            path = os.path.join(path, CHECKPOINT_FILE)
        st = _output_file(out.flag, path)
        if st is not None:
            for f, ist in ins:
                if _same(st, ist) and not any(_same(st, a) for a in allowed):
                    raise EpcError(f"{out.flag} {path}: is the input file {f}; write the "
                                   f"output elsewhere")
        real = os.path.realpath(path)
        for flag, other, ost, oreal in seen:
            if real == oreal or (st is not None and ost is not None and _same(st, ost)):
                raise EpcError(f"{out.flag} {path}: is also the {flag} output {other}")
        seen.append((out.flag, path, st, real))
