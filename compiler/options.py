"""Compile options: everything `epc compile` flags can set, in one dataclass."""
from __future__ import annotations

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
