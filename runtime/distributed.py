"""Data-parallel training and evaluation over torch.distributed.

EP's weight update is local and its estimate averages over the samples of a batch, like
backprop's gradient, so a batch can be split over processes: each settles its share, the
estimates are summed over the processes, and every process applies the same update to
its own copy of the weights, which therefore stay identical. What W processes compute is
what one process computes for the same global batch and seed, up to the order of float
sums:

* The global batch (`--batch-size`, drawn by the same seeded shuffle as in one process)
  is cut into W contiguous shards whose sizes differ by at most one (the first B mod W
  processes take one sample more). Each shard's estimate is weighted by its size, so
  uneven shards average exactly as the whole batch does. A batch size below W is refused.
* A settle stops when every sample of the global batch has settled, as in one process:
  the largest changes a stop is decided on are maxima over the processes
  (`Engine.stop_sync`, one all-reduce of one number per sweep; a +-beta pair, two).
  Without it a shard would stop on its own samples, and a deeper net drifts away from
  the one-process run (mlp3_digits: weights 6e-3 apart after 3 epochs).
* The EP estimate of every learnable weight (couplings, biases, taps, teacher and readout
  heads alike) and the step's counts (correct, loss, unconverged, samples) travel in one
  flat bucket: one all-reduce per step. The implicit gradient's adjoint iteration ends
  when every process's part of the batch has finished, and its estimate is weighted by
  the samples each process kept.
* Evaluation splits each batch in the same way; its counts, the spread of every state
  and the classes predicted are reduced at the end.
* A shard can be empty only in a last, short batch (fewer samples than processes); that
  process settles a copy of the batch's first sample, so that it takes part in the
  batch's collectives (the copy's changes are the sample's own, so the stops stay the
  batch's), and contributes nothing to the sums.

With --precision bf16|fp16 the processes agree only as far as 16-bit rounding lets two runs
agree: the loop's 16-bit copy of the weights rounds a float32 difference of one ulp (the
order of the all-reduce's sums) to a 16-bit ulp now and then, and training amplifies it
(mlp3_digits, 3 epochs at bf16: 1 vs 2 processes 1.2e-2 apart at most, as one process is
from itself with its initial weights scaled by 1 + 1e-7).

Failures: an error from the process group (a peer process died and its connection closed,
or it hangs past the group's timeout) becomes `ProcessLost`, an EpcError that names this
process, so the survivors stop with one line each instead of hanging. A failure decided on
shared values (divergence, bad input found while setting up) is raised in every process
alike (`every_process`), and the CLI prints it once, in process 0.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
from dataclasses import dataclass

import torch

from epc.compiler import flags
from epc.compiler.errors import EpcError

Tensor = torch.Tensor

# how long a collective waits for the other processes when epc forms the group itself
# (`epc train --dist-timeout`): longer than any step or evaluation takes, shorter than
# leaving a run hanging for gloo's default of 30 minutes
DEFAULT_TIMEOUT = 300.0


def every_process(e: EpcError) -> EpcError:
    """Mark an error as raised alike in every process of the run (the CLI prints it once)."""
    e.every_process = True
    return e


class ProcessLost(EpcError):
    """A collective failed: another process of the run stopped or cannot be reached."""

    this_process_only = True


def launched_processes() -> int:
    """The world size torchrun (or any env:// launcher) gave this process, 1 if none."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise EpcError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} in the environment is not "
                       f"a number of processes")


def _available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def join_from_environment(device: torch.device, timeout: float) -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment, no process group yet), form the
    group: nccl for CUDA devices, gloo otherwise, with `timeout` seconds on every
    collective. Returns whether it formed one (the caller destroys it when the run ends)."""
    if launched_processes() <= 1 or _available():
        return False
    if not torch.distributed.is_available():
        raise EpcError("WORLD_SIZE > 1 in the environment, but this torch build has no "
                       "torch.distributed")
    try:
        flags.check("dist_timeout", timeout)
    except EpcError as e:
        raise every_process(e) from None
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if device.type == "cuda" else {}
    try:
        torch.distributed.init_process_group(
            backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout), **kw)
    except (RuntimeError, ValueError, KeyError) as e:
        err = ProcessLost(f"could not join the {backend} process group at "
                          f"{os.environ.get('MASTER_ADDR', '?')}:"
                          f"{os.environ.get('MASTER_PORT', '?')} as process "
                          f"{os.environ.get('RANK', '?')} of {launched_processes()}: "
                          f"{_first_line(e)}")
        raise err from None
    return True


@contextlib.contextmanager
def joined(device: torch.device, timeout: float):
    """`join_from_environment` for the block, and the group it formed destroyed after it
    (gloo's, or nccl's when the block ended well: destroying a communicator whose
    collective failed can wait on it; the process ends anyway). Yields whether it formed
    one. A process that exits with a group left behind may abort (SIGABRT) instead of
    ending with its own exit status."""
    formed = join_from_environment(device, timeout)
    ok = False
    try:
        yield formed
        ok = True
    finally:
        if formed and _available() and (ok or torch.distributed.get_backend() == "gloo"):
            torch.distributed.destroy_process_group()


def process_device(device: torch.device) -> torch.device:
    """The device of this process in a multi-process run: a bare 'cuda' is the GPU of the
    process's local rank (LOCAL_RANK, set by torchrun), or the current CUDA device; an
    explicit cuda:N is kept."""
    if device.type != "cuda" or device.index is not None:
        return device
    if launched_processes() <= 1 and not (_available() and
                                          torch.distributed.get_world_size() > 1):
        return device
    local = os.environ.get("LOCAL_RANK")
    index = int(local) if local is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise EpcError(f"--device cuda: this process has local rank {index}, but the machine "
                       f"has {count} GPU(s): start at most {count} processes per machine")
    return torch.device("cuda", index)


def _first_line(e: BaseException) -> str:
    """What an error from the process group says, in one line: gloo prefixes its messages
    with the source file ([.../pair.cc:537]) and adds advice after the reason."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically caused")[0].rstrip(".")


@dataclass
class Shard:
    """This process's rows of one global batch."""

    start: int
    stop: int
    sizes: list[int]          # every process's share, in rank order

    @property
    def size(self) -> int:
        return self.stop - self.start

    def rows(self, t: Tensor) -> Tensor:
        """This shard of t (a global batch); for an empty shard, the batch's first row
        (settled for the collectives' sake, weighted 0)."""
        return t[self.start:self.stop] if self.size else t[:1]


class DataParallel:
    """This process's place in a data-parallel run: rank, world size, and the collectives
    the trainer and the evaluation use (each guarded: see `ProcessLost`)."""

    def __init__(self, device: torch.device, group=None):
        dist = torch.distributed
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.device = device
        if self.backend == "nccl" and device.type != "cuda":
            raise every_process(EpcError(
                f"the process group's backend is nccl, which reduces CUDA tensors only, and "
                f"this run's device is {device}: train with --device cuda, or form the group "
                f"with backend gloo"))
        # where the collectives' tensors live: on the GPU for nccl, else on the CPU (gloo
        # reduces CPU tensors; a CUDA run under gloo copies its buckets over)
        self.comm = device if self.backend == "nccl" else torch.device("cpu")

    @classmethod
    def current(cls, device: torch.device) -> "DataParallel | None":
        """The run's data-parallel context: None when there is no process group, or one of
        a single process (then nothing differs from a plain run, bit for bit)."""
        if not _available() or torch.distributed.get_world_size() <= 1:
            return None
        return cls(device)

    @property
    def main(self) -> bool:
        """Process 0, the one that writes files and shows progress."""
        return self.rank == 0

    def where(self) -> str:
        return f"process {self.rank} of {self.world}"

    # ------------------------------------------------------------------ sharding
    def shard(self, n: int) -> Shard:
        base, extra = divmod(n, self.world)
        sizes = [base + (r < extra) for r in range(self.world)]
        start = sum(sizes[:self.rank])
        return Shard(start, start + sizes[self.rank], sizes)

    # ------------------------------------------------------------------ collectives
    def _run(self, what: str, fn):
        try:
            return fn()
        except RuntimeError as e:     # gloo/nccl errors and torch's DistError subclasses
            raise ProcessLost(
                f"{self.where()}: lost the other processes of the run during {what} "
                f"({_first_line(e)}); one of them stopped (see its message) or hangs "
                f"past the collectives' timeout") from None

    def _to_comm(self, t: Tensor) -> Tensor:
        return t if t.device == self.comm else t.to(self.comm)

    def _reduce(self, t: Tensor, op, what: str) -> Tensor:
        c = self._to_comm(t)
        c = c.clone() if c is t else c
        self._run(what, lambda: torch.distributed.all_reduce(c, op=op, group=self.group))
        return c if c.device == t.device else c.to(t.device)

    def max(self, t: Tensor, what: str = "a settle") -> Tensor:
        """Element-wise maximum over the processes (a new tensor on t's device)."""
        return self._reduce(t, torch.distributed.ReduceOp.MAX, what)

    def sum(self, t: Tensor, what: str) -> Tensor:
        """Element-wise sum over the processes (a new tensor on t's device)."""
        return self._reduce(t, torch.distributed.ReduceOp.SUM, what)

    def any(self, flag: bool, what: str) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.comm)
        return bool(self.max(t, what)[0] > 0)

    def gather_rows(self, t: Tensor, sizes: list[int], what: str) -> list[Tensor]:
        """Every process's t (rows: its entry of `sizes`; trailing shape alike), in rank
        order; all_gather needs equal shapes, so each is padded to the largest."""
        m = max(max(sizes), 1)
        c = self._to_comm(t)
        if c.shape[0] < m:
            c = torch.cat([c, c.new_zeros((m - c.shape[0],) + tuple(c.shape[1:]))])
        c = c[:m].contiguous()
        out = [torch.empty_like(c) for _ in range(self.world)]
        self._run(what, lambda: torch.distributed.all_gather(out, c, group=self.group))
        return [o[:k].to(t.device) for o, k in zip(out, sizes)]

    def gather_text(self, text: str, what: str) -> list[str]:
        """Every process's text, in rank order (as UTF-8 bytes: nothing is unpickled)."""
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=self.comm)
        n = torch.tensor([data.numel()], dtype=torch.int64, device=self.comm)
        lens = [int(x) for x in self.gather_rows(n, [1] * self.world, what)]
        return [bytes(x.cpu().tolist()).decode(errors="replace")
                for x in self.gather_rows(data, lens, what)]

    def barrier(self, what: str) -> None:
        t = torch.zeros(1, device=self.comm)
        self._run(what, lambda: torch.distributed.all_reduce(t, group=self.group))

    # ------------------------------------------------------------------ agreement
    def fail_together(self, message: str | None, kind=EpcError, what: str = "a check",
                      known: bool = False):
        """Raise `kind` in every process if any process has a `message` (one all-reduce
        when none has; none when the caller `known`s that one has, from a reduction of its
        own): the first failing process's message, named if it is not 0."""
        if not known and not self.any(message is not None, what):
            return
        msgs = self.gather_text(message or "", what)
        k = next(i for i, m in enumerate(msgs) if m)
        text = msgs[k] if k == 0 else f"in process {k} of {self.world}: {msgs[k]}"
        raise every_process(kind(text))

    @contextlib.contextmanager
    def together(self, fingerprint=None):
        """Set-up that every process does alike: an EpcError in any process is raised in
        all of them (the first one's message), and afterwards `fingerprint()` (a callable
        returning bytes: what a process is about to run) must agree, so that processes
        started with other options or files are refused instead of drifting apart."""
        msg = None
        try:
            yield
        except EpcError as e:
            if getattr(e, "this_process_only", False):
                raise
            msg = str(e)
        self.fail_together(msg, what="the run's set-up")
        if fingerprint is not None:
            mine = hashlib.sha256(fingerprint()).hexdigest()
            prints = self.gather_text(mine, "the run's set-up")
            odd = [k for k, p in enumerate(prints) if p != prints[0]]
            if odd:
                raise every_process(EpcError(
                    f"process {odd[0]} of {self.world} does not run what process 0 runs (its "
                    f"options, data, model or checkpoint differ): start every process with "
                    f"the same command and files"))

    def attach(self, eng) -> None:
        """Make the engine's settles stop when the whole global batch has settled."""
        eng.stop_sync = self.max
