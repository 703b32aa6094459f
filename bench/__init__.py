"""epc benchmarks: `python -m bench --json bench.json [--quick]`.

Everything is measured side by side in one run on this machine:

* sweeps: sweeps to reach the schedule's tolerance, colour schedule vs synchronous, per
  example model (free phase, a batch of digits).
* throughput: EP training samples/s of the runtime vs a straightforward baseline written
  here the way published EP code does it (synchronous updates, each state's drive by
  autograd of Phi w.r.t. the state, EP weight gradient by autograd of Phi), same nets, same
  fixed sweep counts (tolerance 0, so both do exactly the same number of sweeps). The
  runtime settles the two nudged phases as one batch (`Engine.settle_pair`), as its
  trainer does; the baseline settles them one after the other, as published code does.
  The baseline applies every coupling with the reference ops (plain torch calls,
  `compiler.ops`); the runtime uses its faster equal kernels (`runtime.kernels`).
  tests/test_bench.py checks that both compute the same states and EP gradient.
  `runtime_conv_fraction` is the share of the runtime's time spent in convolution kernels
  (one profiled epoch), and `speedup_ceiling_convs` the baseline's time over that
  convolution time: the ratio the runtime would reach if everything but the convolutions
  it shares with the baseline took no time (null for nets without convolutions).
* ep_vs_bp: one EP training epoch (runtime defaults) vs one backprop epoch of the same
  architecture (the feedforward pass of the energy graph, autograd, Adam).
* Timed pairs (runtime/baseline, EP/BP) run alternately five times after a warm-up; a
  ratio is the median over the pairs, so load that comes and goes on a shared machine
  hits both sides of a pair alike.
* gflops: multiply-accumulates executed by the settle loop per second vs the measured
  float32 matmul peak of this machine.
* compile: loading a ResNet-18-sized ONNX file and running the pass pipeline (seconds).
* neuromorphic: the bit-exact integer simulator's inference speed vs the float runtime on
  the same network (ratio).
* accuracy: digits test accuracy after 30 epochs of EP from the untrained example models,
  each beside the backprop reference: the same architecture trained by backprop with the
  same epochs, seeds, batch size and split, best of six Adam settings (bench/backprop.py),
  once with the source ReLUs and once with the energy form's clipped activations, and the
  test samples every run gets wrong (`python -m bench.accuracy` runs it alone; ~23 minutes
  here).
* parity: the trained MLP and conv nets as 8-bit and calibrated 4-bit programs in the
  simulator vs the float runtime, and on-chip learning of the untrained MLP
  (`python -m bench.parity` runs it alone).

The bench keeps freed tensor memory for reuse as `epc train` does (runtime/memory.py), for
the runtime and the baseline alike; `machine.allocator` records it, and `--system-malloc`
runs everything under the C library's own thresholds instead.
"""


def write_json(path, obj) -> None:
    """Write a bench's result file (`--json`) atomically, indented, one trailing newline."""
    import json

    from epc.compiler.bundle import atomic_write_bytes
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())
