"""torch.distributed ranks for the sharded tier: `run_ranks(fn, world)` runs fn(rank, world, *args) in `world`
gloo processes and returns what each rank returned (picklable). A short process-group timeout makes a
mismatch of collectives fail within seconds instead of hanging; an exception in any rank fails the test
with that rank's traceback."""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

TIMEOUT_S = 30


def _entry(rank: int, fn: Callable[..., Any], world: int, init: str, out_dir: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # `world` ranks share the machine's cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        result: Any = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a rank that failed may leave the group unusable
        pass


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """fn(rank, world, *args) on `world` gloo ranks -> [rank 0's result, rank 1's, ...].

    fn must be a module-level function (spawned processes import it by name).
    """
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "store")
        ctx = mp.start_processes(_entry, args=(fn, world, init, tmp, args), nprocs=world, join=False,
                                 start_method="spawn")
        try:
            while not ctx.join(timeout=TIMEOUT_S * 4):
                pass
        except mp.ProcessExitedException as e:  # gloo aborts a rank whose collective does not match the others'
            raise AssertionError(f"a rank of {world} died: {e} (mismatched collectives abort gloo ranks)") from None
        results = []
        for rank in range(world):
            path = os.path.join(tmp, f"rank{rank}.pkl")
            if not os.path.exists(path):
                raise AssertionError(f"rank {rank} of {world} wrote no result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise AssertionError(f"rank {rank} of {world} failed:\n{value}")
            results.append(value)
        return results
