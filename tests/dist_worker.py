"""One process of a data-parallel test run (tests/test_distributed.py starts several).

    python tests/dist_worker.py SPEC.json      # RANK, WORLD_SIZE, MASTER_ADDR/PORT set

It forms its own gloo process group (the Python API inside a caller's group), runs the
spec's jobs in order with `epc.train` / `epc.evaluate`, and writes what each returned to
OUT/JOB.rankR.json; an EpcError is written there as {"error": ...}. A job may make this
process die (`die_at_step`: os._exit in the middle of a step) or hang (`hang_at_step`)
in one rank, to see what the others do.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

torch.set_num_threads(1)


def main(spec_path: str) -> int:
    import epc
    from epc.compiler.errors import EpcError
    from epc.runtime import train as T

    spec = json.load(open(spec_path))
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec.get("timeout",
                                                                              60)))
    step = T.Trainer.step
    for job in spec["jobs"]:
        kw = dict(job.get("kwargs", {}))
        kw.update(job.get("rank_kwargs", {}).get(str(rank), {}))
        steps = {"n": 0}

        def patched(self, *a, _job=job, **k):
            steps["n"] += 1
            if _job.get("die_at_step") and rank == _job.get("rank", 1) \
                    and steps["n"] == _job["die_at_step"]:
                os._exit(3)
            if _job.get("hang_at_step") and rank == _job.get("rank", 1) \
                    and steps["n"] == _job["hang_at_step"]:
                time.sleep(600)
            return step(self, *a, **k)
        T.Trainer.step = patched
        fn = epc.train if job.get("command", "train") == "train" else epc.evaluate
        t0 = time.perf_counter()
        try:
            r = fn(job["model"], **kw)
            if "predictions" in r:
                r["predictions"] = [int(p) for p in r["predictions"]]
        except EpcError as e:
            r = {"error": str(e), "type": type(e).__name__,
                 "every_process": getattr(e, "every_process", False)}
        r["wall_seconds"] = time.perf_counter() - t0
        with open(os.path.join(spec["out"], f"{job['name']}.rank{rank}.json"), "w") as f:
            json.dump(r, f, default=str)
        if "error" in r and job.get("stop_on_error", True):
            dist.destroy_process_group()
            return 2
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
