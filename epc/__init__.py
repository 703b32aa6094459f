"""epc: compile feedforward networks into Equilibrium Propagation programs.

The Python API mirrors the CLI:

    import epc
    g = epc.compile("examples/mlp_digits.onnx", verify=True)       # epc compile
    print(epc.inspect(g))                                            # epc inspect
    epc.save(g, "mlp.epc")
    metrics = epc.train("mlp.epc", data="digits", epochs=30)         # epc train
    epc.evaluate("ckpt/last.epc", data="digits")                     # epc eval
    epc.check_gradients("mlp.epc", data="digits", beta=0.01)         # epc check-gradients

`epc.compile` also takes an `nn.Module` with `example_input=`.
"""
from __future__ import annotations

from typing import Any

from epc.compiler.bundle import Bundle, read_bundle, write_bundle
from epc.compiler.errors import EpcError
from epc.compiler.ir import Graph
from epc.compiler.options import CompileOptions
from epc.compiler.text import parse, print_graph

__version__ = "0.1.0"


def compile(source: Any, *, target: str | None = None, output: str | None = None,
            verify: bool = False, input_shape: tuple[int, ...] | None = None,
            example_input: Any = None, print_after_all: bool = False,
            **options: Any) -> Graph:
    """Compile an ONNX path, a bundle path, a `module:factory` spec or an nn.Module.

    `options` are CompileOptions fields (activation may be given as 'clip:1.0').
    With `output`, writes the IR bundle (target None), a torch bundle or a neuromorphic
    program; returns the energy graph either way.
    """
    import sys

    from epc.compiler.pipeline import compile_source, torch_source
    opts = CompileOptions(**options)     # compile_source checks it (activation text too)
    src = source
    if not isinstance(source, str):
        if example_input is None:
            raise EpcError("compiling an nn.Module needs example_input=")
        src = torch_source(source, example_input)
    res = compile_source(src, opts, input_shape=input_shape, verify_model=verify,
                         print_after_all=print_after_all, out=sys.stdout)
    if output:
        if target == "torch":
            from epc.targets.torch import emit
            emit(res.graph, output, opts)
        elif target == "neuromorphic":
            from epc.targets.neuromorphic.api import compile_program
            compile_program(res.graph, output)
        elif target in (None, "ir"):
            write_bundle(output, Bundle(res.graph, meta={"compiled_from": res.source.path}))
        else:
            raise EpcError(f"unknown target {target!r} (supported: ir, torch, neuromorphic)")
    return res.graph


def load(path: str) -> Graph:
    """Read a bundle's graph (weights attached)."""
    return read_bundle(path).graph


def save(graph: Graph, path: str, *, target: str | None = None) -> None:
    write_bundle(path, Bundle(graph, target=target))


def inspect(graph_or_path: Any, fmt: str = "text") -> Any:
    """The IR text (fmt 'text'), a JSON-able dict ('json'), DOT ('dot') or stats ('stats')."""
    from epc.compiler.inspect import stats, to_dot, to_json
    g = load(graph_or_path) if isinstance(graph_or_path, str) else graph_or_path
    return {"text": print_graph, "json": to_json, "dot": to_dot, "stats": stats}[fmt](g)


# train / evaluate / check_gradients are the runtime's own functions (their signatures and
# docstrings, for help()), imported on first use: `import epc` stays light (no torch) for
# compiling and inspecting
_RUNTIME = ("train", "evaluate", "check_gradients")


def __getattr__(name: str) -> Any:
    if name in _RUNTIME:
        from epc.runtime import api
        fn = getattr(api, name)
        globals()[name] = fn
        return fn
    raise AttributeError(f"module 'epc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_RUNTIME))


__all__ = ["compile", "load", "save", "inspect", "train", "evaluate", "check_gradients",
           "parse", "print_graph", "Graph", "Bundle", "CompileOptions", "EpcError"]
