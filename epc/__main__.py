"""The `epc` console script and `python -m epc ...`: the command line, safe to interrupt
from its first instruction.

This module imports nothing heavy: a Ctrl-C while epc's own modules load (typer, numpy,
the driver: the first few hundred milliseconds) ends like one during a command, with
`epc: interrupted` and exit status 130, not a traceback. After the status is decided,
further Ctrl-Cs are ignored so that the exit itself (flushing output, unloading torch)
cannot be interrupted into a traceback. (Before this module runs, the interpreter's own
start-up is Python's: a Ctrl-C there prints Python's traceback.)
"""
import os
import signal
import sys


def _interrupted() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sys.stderr.write("epc: interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return 130


def main() -> None:
    try:
        from epc.cli import console
        code = console()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:
        code = _interrupted()
    if code == 130:
        # interrupted: the line is out; leave now with 130. (A Ctrl-C that landed while an
        # extension ran Python code through the C API marks the interpreter, whose normal
        # exit would then re-raise SIGINT and end with -2 instead of 130.)
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    main()
