"""epc: compile feedforward networks into Equilibrium Propagation programs.

The Python API is the CLI's twin: one function per command, taking its options
(`epc compile X --max-sweeps 7` is `epc.compile(X, max_sweeps=7)`):

    import epc
    g = epc.compile("examples/mlp_digits.onnx", verify=True)           # epc compile
    epc.check("model.onnx", substitute=True)["compatible"]               # epc compile --check
    print(epc.inspect(g))                                                # epc inspect
    print(epc.opt("net.epir", passes=["residual"]))                      # epc opt
    epc.compile("examples/mlp_digits.onnx", target="torch", output="mlp.epc")
    metrics = epc.train("mlp.epc", data="digits", epochs=30)             # epc train
    epc.evaluate("ckpt/last.epc", data="digits")                         # epc eval
    epc.check_gradients("mlp.epc", data="digits", beta=0.01)             # epc check-gradients
    epc.run("mlp.nc", data="digits")                                     # epc run

`epc.compile` also takes an `nn.Module` with `example_input=`. The functions live in
epc/api.py and are imported on first use: this package's own import stays light (no
torch, no numpy), which matters because every `epc.compiler...` import runs it first.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it; resolved on first access (PEP 562)
_EXPORTS = {
    "compile": "epc.api", "check": "epc.api", "opt": "epc.api", "inspect": "epc.api", "load": "epc.api", "save": "epc.api",
    "train": "epc.api", "backprop": "epc.api", "evaluate": "epc.api", "check_gradients": "epc.api", "run": "epc.api",
    "parse": "epc.compiler.text", "print_graph": "epc.compiler.text",
    "Graph": "epc.compiler.ir", "Bundle": "epc.compiler.bundle",
    "CompileOptions": "epc.compiler.options", "EpcError": "epc.compiler.errors",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'epc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
