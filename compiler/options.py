"""Compile options: everything `epc compile` flags can set, in one dataclass."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import flags
from .errors import EpcError
from .ir import Activation, Spiking


def parse_activation(spec: str) -> Activation:
    """'clip:1.0' -> clip(0, 1.0); 'clip:-1:1' -> clip(-1, 1); 'hardsigmoid'; 'relu'."""
    parts = spec.split(":") if isinstance(spec, str) else [None]
    try:
        if parts[0] == "clip" and len(parts) in (2, 3):
            lo, hi = (0.0, float(parts[1])) if len(parts) == 2 else (float(parts[1]),
                                                                     float(parts[2]))
            if math.isfinite(lo) and math.isfinite(hi) and lo < hi:
                return Activation.clip(lo, hi)
        elif parts[0] == "hardsigmoid" and len(parts) == 1:
            return Activation.hardsigmoid(1.0, 0.0)
        elif parts[0] == "relu" and len(parts) == 1:
            return Activation.relu()
    except ValueError:
        pass
    raise EpcError(f"bad --activation {spec!r}: use clip:C (clip(u, 0, C), C > 0), "
                   f"clip:LO:HI (LO < HI, finite), hardsigmoid or relu")


def parse_averaging(spec: str) -> tuple[str, int]:
    """--averaging 'trace:8' -> ('trace', 8); 'window:16'; a bare 'trace' or 'window' takes
    the default tau (its rule: compiler/flags.py)."""
    kind, _, n = flags.check("averaging", spec).partition(":")
    return kind, int(n) if n else Spiking.tau


# the spiking options: set (not None) only for bernoulli neurons
SPIKING_FLAGS = {"time_steps": "time-steps", "nudge_time_steps": "nudge-time-steps",
                 "averaging": "averaging", "sampling": "sampling"}


@dataclass
class CompileOptions:
    activation: Activation = field(default_factory=lambda: Activation.clip(0.0, 1.0))
    feedback: bool = True                 # symmetrize: tied feedback on every coupling
    feedback_gain: float | str = "auto"  # symmetrize: feedback regulation ratio, or 'auto'
    pool_first: bool | None = None        # pool_first: act(maxpool(u)) for maxpool(act(u));
    #                                       None: on for bernoulli neurons (pool_first.py)
    identity_skip: str = "identity"       # residual: 'identity' (weightless) or 'learned' (1x1)
    skip_gain: float = 1.0                # residual: state-to-state skips scaled at init
    cost: str = "mse"                     # label cost on the output state: mse | ce
    readout: bool = False                 # readout: output/tap heads outside the energy
    taps: str | list[str] | None = None   # None, 'auto' or state names
    tap_weight: float = 0.3
    teacher: str | None = None            # None, 'source' or a path to a teacher model
    teacher_temperature: float = 4.0
    teacher_mix: float = 0.5
    neuron: str = "rate"                  # rate | bernoulli (StochEP)
    # bernoulli neurons only (None: Spiking's defaults): see ir.Spiking
    time_steps: int | None = None         # free phase: exact number of time steps
    nudge_time_steps: int | None = None   # each nudged phase
    averaging: str | None = None          # 'trace:T' | 'window:W'
    sampling: str | None = None           # shared | independent
    schedule: str = "colour"              # colour | sync
    max_sweeps: int = 100
    nudge_sweeps: int = 40
    tol: float = 1e-4
    source_path: str | None = None        # the file compiled (teacher 'source' provenance)
    target: str | None = None             # the target compiled for, set by the driver
    teacher_graph: object = None          # feedforward Graph of the teacher, set by the driver

    def check(self) -> "CompileOptions":
        """Refuse bad option values before any pass runs, naming the `epc compile` flag
        (the CLI and the Python API share these checks); normalises 'color' to 'colour',
        an activation given as text to an Activation and a comma list of taps to a list."""
        if isinstance(self.activation, str):
            self.activation = parse_activation(self.activation)
        if not isinstance(self.activation, Activation):
            raise EpcError(f"bad --activation {self.activation!r}: use clip:C, clip:LO:HI, "
                           f"hardsigmoid or relu")
        if isinstance(self.taps, str) and self.taps != "auto":
            self.taps = [t.strip() for t in self.taps.split(",") if t.strip()]
        names = isinstance(self.taps, (list, tuple)) and all(isinstance(t, str)
                                                             for t in self.taps)
        if not (self.taps is None or self.taps == "auto" or names):
            raise EpcError(f"bad --taps {self.taps!r}: use auto or a comma-separated list of "
                           f"state names")
        # one rule per flag (compiler/flags.py), as every other command checks it
        for name, flag in (("cost", "cost"), ("neuron", "neuron"),
                           ("identity_skip", "identity_skip"), ("schedule", "schedule"),
                           ("skip_gain", "skip_gain"), ("feedback_gain", "feedback_gain"),
                           ("tap_weight", "tap_weight"),
                           ("teacher_temperature", "temperature"), ("teacher_mix", "mix"),
                           ("tol", "tol"), ("max_sweeps", "max_sweeps"),
                           ("nudge_sweeps", "nudge_sweeps")):
            v = getattr(self, name)
            if v is None:
                raise EpcError(f"bad {flags.flag(flag)} None: must be {flags.RULES[flag].what}")
            setattr(self, name, flags.check(flag, v))
        self._check_spiking()
        if self.readout and self.feedback_gain not in ("auto", 1.0):
            raise EpcError(f"--feedback-gain {self.feedback_gain:g} with --readout: feedback "
                           f"regulation is anchored at the output state, which a readout takes "
                           f"out of the energy; use one or the other")
        return self

    def _check_spiking(self) -> None:
        """The bernoulli options, by their rules (None: not given)."""
        for name in SPIKING_FLAGS:
            setattr(self, name, flags.check(name, getattr(self, name)))

    def spiking_given(self) -> list[str]:
        """The spiking options set (their flags)."""
        return [f"--{flag}" for k, flag in SPIKING_FLAGS.items() if getattr(self, k) is not None]

    def spiking(self, base: Spiking | None = None) -> Spiking:
        """`base` (default: Spiking's defaults) with the spiking options that are set."""
        import dataclasses
        sp = dataclasses.replace(base) if base is not None else Spiking()
        if self.time_steps is not None:
            sp.time_steps = int(self.time_steps)
        if self.nudge_time_steps is not None:
            sp.nudge_time_steps = int(self.nudge_time_steps)
        if self.averaging is not None:
            sp.averaging, sp.tau = parse_averaging(self.averaging)
        if self.sampling is not None:
            sp.sampling = self.sampling
        return sp
