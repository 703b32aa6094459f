"""Compile options: everything `epc compile` flags can set, in one dataclass."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import EpcError
from .ir import Activation


def parse_activation(spec: str) -> Activation:
    """'clip:1.0' -> clip(0, 1.0); 'clip:-1:1' -> clip(-1, 1); 'hardsigmoid'; 'relu'."""
    parts = spec.split(":")
    try:
        if parts[0] == "clip":
            if len(parts) == 2:
                return Activation.clip(0.0, float(parts[1]))
            if len(parts) == 3:
                return Activation.clip(float(parts[1]), float(parts[2]))
        elif parts[0] == "hardsigmoid" and len(parts) == 1:
            return Activation.hardsigmoid(1.0, 0.0)
        elif parts[0] == "relu" and len(parts) == 1:
            return Activation.relu()
    except ValueError:
        pass
    raise EpcError(f"bad --activation {spec!r}: use clip:C (clip(u, 0, C)), clip:LO:HI, "
                   f"hardsigmoid or relu")


@dataclass
class CompileOptions:
    activation: Activation = field(default_factory=lambda: Activation.clip(0.0, 1.0))
    feedback: bool = True                 # symmetrize: tied feedback on every coupling
    pool_first: bool = False              # pool_first: act(maxpool(u)) for maxpool(act(u))
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
    schedule: str = "colour"              # colour | sync
    max_sweeps: int = 100
    nudge_sweeps: int = 40
    tol: float = 1e-4
    source_path: str | None = None        # the file compiled (teacher 'source' provenance)
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
        choices = (("cost", "cost", ("mse", "ce")), ("neuron", "neuron", ("rate", "bernoulli")),
                   ("schedule", "schedule", ("colour", "sync")),
                   ("identity_skip", "identity-skip", ("identity", "learned")))
        if self.schedule == "color":
            self.schedule = "colour"
        for field_name, flag, allowed in choices:
            v = getattr(self, field_name)
            if v not in allowed:
                raise EpcError(f"bad --{flag} {v!r}: use {' or '.join(allowed)}")
        if isinstance(self.taps, str) and self.taps != "auto":
            self.taps = [t.strip() for t in self.taps.split(",") if t.strip()]
        names = isinstance(self.taps, (list, tuple)) and all(isinstance(t, str)
                                                             for t in self.taps)
        if not (self.taps is None or self.taps == "auto" or names):
            raise EpcError(f"bad --taps {self.taps!r}: use auto or a comma-separated list of "
                           f"state names")
        for name, flag, ok, what in (
                ("skip_gain", "skip-gain", lambda v: v > 0, "a positive number"),
                ("tap_weight", "tap-weight", lambda v: v > 0, "a positive number"),
                ("teacher_temperature", "temperature", lambda v: v > 0, "a positive number"),
                ("teacher_mix", "mix", lambda v: 0.0 <= v <= 1.0, "between 0 and 1"),
                ("tol", "tol", lambda v: v >= 0, "a number >= 0")):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and ok(v)):
                raise EpcError(f"bad --{flag} {v}: must be {what}")
        for name in ("max_sweeps", "nudge_sweeps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EpcError(f"bad --{name.replace('_', '-')} {v}: must be an integer >= 1")
        return self
