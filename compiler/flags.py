"""One rule per option value, whichever command takes the option.

`epc train`, `eval`, `check-gradients`, `run`, `compile` and `opt` share flags (--seed,
--threads, --max-sweeps, --tol, --batch-size, ...). Each flag's admissible values are
stated once here, and every command (the driver, before it reads any file) and every
runtime entry point called from Python checks its options through `check`, so a value one
command refuses is refused by all, with the same message: `bad --FLAG VALUE: must be ...`.

Integer ranges are finite on purpose: a seed, thread count or sweep cap past them would
overflow the C integers torch and numpy hand them to (--seed 2^63, --threads 2^31).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import EpcError

INT_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class Rule:
    what: str                                   # "an integer in [1, 1000000]"
    ok: Callable[[Any], bool]
    normalize: Callable[[Any], Any] = lambda v: v
    choices: tuple[str, ...] = ()               # a choice of names: listed when refused


def _int_in(lo: int, hi: int) -> Rule:
    return Rule(f"an integer in [{lo}, {hi}]",
                lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi)


def _real(ok: Callable[[float], bool], what: str) -> Rule:
    return Rule(what, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and ok(v), float)


def _choice(*allowed: str, aliases: dict | None = None) -> Rule:
    aliases = aliases or {}
    return Rule(" or ".join(allowed),
                lambda v: isinstance(v, str) and aliases.get(v, v) in allowed,
                lambda v: aliases.get(v, v), choices=allowed)


def _backprop_epochs(v: Any) -> Any:
    """'auto', or the epoch count as an int: the CLI hands it over as text, read as its
    integer options are (Python's int() of ASCII text, or a float text with a zero
    fraction such as '10.0'); text that is neither stays text (and is refused)."""
    if isinstance(v, str) and v != "auto" and v.isascii():
        try:
            return int(v)
        except ValueError:
            if re.fullmatch(r"\s*[-+]?\d{1,4000}\.0+\s*", v):
                return int(v.strip().split(".")[0])
    return v


def _backprop_epochs_ok(v: Any) -> bool:
    v = _backprop_epochs(v)
    return v == "auto" or (isinstance(v, int) and not isinstance(v, bool)
                           and 0 <= v <= 1_000_000)


def _feedback_gain(v: Any) -> Any:
    """'auto', or the gain as a float (the CLI hands '0.1' over as text)."""
    if isinstance(v, str) and v != "auto":
        try:
            return float(v)
        except ValueError:
            return v
    return v if v == "auto" else float(v)


def _feedback_gain_ok(v: Any) -> bool:
    v = _feedback_gain(v) if not isinstance(v, bool) else v
    return v == "auto" or (isinstance(v, float) and math.isfinite(v) and 0 < v <= 1)


def parse_layer_lrs(v: Any) -> "str | tuple[float, ...]":
    """--layer-lrs: 'none', 'auto' or the per-level factors (positive finite numbers), from
    the option's text ('1,0.25') or a sequence of numbers; ValueError when it is none."""
    if isinstance(v, str):
        if v.strip() in ("none", "auto"):
            return v.strip()
        parts: list = [p.strip() for p in v.split(",")]
    elif isinstance(v, (list, tuple)):
        parts = list(v)
    else:
        raise ValueError(v)
    out = []
    for p in parts:
        x = float(p) if not isinstance(p, bool) else math.nan   # ValueError on bad text
        if not (math.isfinite(x) and x > 0):
            raise ValueError(p)
        out.append(x)
    if not out:
        raise ValueError(v)
    return tuple(out)


def _layer_lrs(v: Any) -> str:
    """The canonical text of a --layer-lrs value ('none', 'auto', '1.0,0.25'): what a run's
    config and checkpoint record, so a resumed run compares like with like."""
    p = parse_layer_lrs(v)
    return p if isinstance(p, str) else ",".join(repr(x) for x in p)


def _layer_lrs_ok(v: Any) -> bool:
    try:
        _layer_lrs(v)
    except (ValueError, TypeError):
        return False
    return True


_DEVICE_RE = re.compile(r"cpu|mps|cuda(:\d{1,3})?")
SEED_MAX = 2 ** 32 - 1
_AVERAGING_RE = re.compile(r"(trace|window)(:\d{1,7})?")

RULES: dict[str, Rule] = {
    # counts
    "epochs": _int_in(0, 1_000_000),
    "stop_after": _int_in(1, 1_000_000),
    "batch_size": _int_in(1, 1 << 24),
    "samples": _int_in(1, 1 << 24),
    "limit": _int_in(1, INT_MAX),
    "max_sweeps": _int_in(1, 1_000_000),
    "nudge_sweeps": _int_in(1, 1_000_000),
    "time_steps": _int_in(1, 1_000_000),
    "nudge_time_steps": _int_in(1, 1_000_000),
    "tau": _int_in(1, 1_000_000),
    "seeds": _int_in(1, 100_000),
    "threads": _int_in(1, 1024),
    "seed": _int_in(0, SEED_MAX),
    "channels": _int_in(1, 4096),
    "lr_shift": _int_in(0, 48),
    "weight_bits": _int_in(4, 8),
    "frac_bits": _int_in(1, 12),
    # reals
    "tol": _real(lambda v: v >= 0, "a finite number >= 0"),
    "lr": _real(lambda v: v > 0, "a finite number > 0"),
    "momentum": _real(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": _real(lambda v: v >= 0, "a finite number >= 0"),
    "clip": _real(lambda v: v > 0, "a finite number > 0 (the largest gradient norm kept)"),
    "beta": _real(lambda v: v != 0, "a nonzero finite number (EP estimates the gradient "
                                    "from the difference of nudged phases)"),
    "tap_weight": _real(lambda v: v > 0, "a positive number"),
    "temperature": _real(lambda v: v > 0, "a positive number"),
    "mix": _real(lambda v: 0 <= v <= 1, "between 0 and 1"),
    "skip_gain": _real(lambda v: v > 0, "a positive number"),
    "feedback_gain": Rule("a number in (0, 1] or auto", _feedback_gain_ok, _feedback_gain),
    "backprop_epochs": Rule("an integer in [0, 1000000] or auto", _backprop_epochs_ok,
                            _backprop_epochs),
    "backprop_lr": _real(lambda v: v > 0, "a finite number > 0"),
    "layer_lrs": Rule("none, auto, or comma-separated factors > 0 on --lr, one per depth "
                      "level from the input (e.g. 1,0.5)", _layer_lrs_ok, _layer_lrs),
    # a timedelta of more than about 10^14 seconds overflows; a million is 11.6 days
    "dist_timeout": _real(lambda v: 0 < v <= 1e6, "a number of seconds in (0, 1000000]"),
    # choices
    "schedule": _choice("colour", "sync", aliases={"color": "colour"}),
    "cost": _choice("mse", "ce"),
    "neuron": _choice("rate", "bernoulli"),
    "identity_skip": _choice("identity", "learned"),
    "nudge": _choice("symmetric", "one-sided"),
    "gradient": _choice("ep", "implicit"),
    "optimizer": _choice("adam", "sgd"),
    "split": _choice("test", "train"),
    "dtype": _choice("float64", "float32"),
    "divergence": _choice("stop", "warn"),
    "nudge_form": _choice("states", "deviation"),
    "precision": _choice("fp32", "bf16", "fp16"),
    "activations": _choice("energy", "source"),
    "loss": _choice("graph", "ce", "mse"),
    "sampling": _choice("shared", "independent"),
    "estimate": _choice("rates", "spikes"),
    "averaging": Rule("trace:T or window:W (T, W integers in [1, 1000000]; a bare trace or "
                      "window takes T = 8)",
                      lambda v: isinstance(v, str) and _AVERAGING_RE.fullmatch(v) is not None
                      and 1 <= int(v.partition(":")[2] or 8) <= 1_000_000),
    "device": Rule("cpu, cuda, cuda:N or mps",
                   lambda v: isinstance(v, str) and _DEVICE_RE.fullmatch(v) is not None),
}

# options whose None means "not given" (the bundle's own, the data set's own, ...)
OPTIONAL = {"stop_after", "limit", "max_sweeps", "nudge_sweeps", "tol", "clip", "beta",
            "lr_shift", "channels", "schedule", "threads", "precision",
            # bernoulli neurons' options: None keeps the compiled graph's (or the defaults)
            "time_steps", "nudge_time_steps", "averaging", "sampling"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def check(name: str, value: Any) -> Any:
    """`value` of option `name` (its Python name, e.g. 'max_sweeps') if admissible,
    normalised ('color' -> 'colour', ints -> float for reals); else EpcError naming the
    flag. None passes for the options where it means "not given"."""
    if value is None and name in OPTIONAL:
        return None
    rule = RULES[name]
    value = getattr(value, "value", value)      # the CLI's enums carry their text
    if not rule.ok(value):
        if rule.choices:
            raise EpcError(f"bad {flag(name)} {shown(value)} (supported: "
                           f"{', '.join(rule.choices)})")
        raise EpcError(f"bad {flag(name)} {shown(value)}: must be {rule.what}")
    return rule.normalize(value)


def check_all(values: dict[str, Any]) -> dict[str, Any]:
    """`check` every entry of `values` that has a rule; returns the normalised values
    (entries without a rule pass unchanged)."""
    return {k: (check(k, v) if k in RULES else v) for k, v in values.items()}
