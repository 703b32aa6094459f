"""`epc run`: inference of a neuromorphic program in the bit-exact simulator.

`register(app)` adds the command to the epc typer app. Errors are EpcError, printed by the
app's main as one `epc: error: ...` line (exit 2). `epc train PROGRAM`, `epc inspect
PROGRAM` and `epc compile --target neuromorphic` live with their owners and call api.py.
"""
from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        program: str = typer.Argument(..., help="A neuromorphic program: binary (.nc, from "
                                      "`epc compile --target neuromorphic`) or assembly text "
                                      "(.nca)."),
        data: str = typer.Option("digits", "--data", help="Data set: digits (built in), "
                                 "mnist, fashion-mnist, cifar10, cifar100 (from --data-dir; "
                                 "fashion-mnist defaults to /usr/share/datasets/fashion-mnist)."),
        data_dir: Optional[str] = typer.Option(None, "--data-dir",
                                               help="Directory holding mnist/cifar files."),
        resize: Optional[str] = typer.Option(None, "--resize", help="Resize images to H or "
                                             "HxW to fit the program's input (e.g. 32)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N test "
                                            "samples (quick checks of big programs)."),
        batch_size: int = typer.Option(256, "--batch-size", help="Samples simulated together "
                                       "(results do not depend on it: each sample settles "
                                       "on its own)."),
        metrics_json: Optional[str] = typer.Option(None, "--metrics-json",
                                                   help="Write the metrics (test_accuracy, "
                                                        "max_sweeps, median_sweeps, unsettled, "
                                                        "overflows, resources, ...) as JSON."),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
    ):
        """Run a neuromorphic program's inference in the bit-exact integer simulator.

        Each test sample is clamped to the input memory (x * 2^F, rounded), every neuron
        group starts at 0, and the free phase sweeps the colour classes until no state
        changes (the integer fixed point), a state repeats (a cycle) or the sweep cap.
        The prediction is the output group's argmax. Reported: accuracy, sweeps to the
        fixed point (max, median), samples that did not settle (and how many cycled),
        saturation counts, memory bytes and synaptic operations.

        Examples:

          epc compile examples/mlp_digits.onnx --target neuromorphic -o mlp.nc

          epc run mlp.nc --data digits

          epc run r13.nc --data cifar10 --data-dir ~/data --limit 64 --metrics-json m.json

          epc run digits_conv.nc --data mnist --data-dir ~/mnist --resize 8
        """
        from .api import run_program
        m = run_program(program, data=data, data_dir=data_dir, resize=resize, limit=limit,
                        metrics_json=metrics_json, batch_size=batch_size, progress=not quiet)
        if as_json:
            typer.echo(json.dumps(m, indent=1, default=str))
