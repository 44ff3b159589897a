"""Run a script (argv[1:]) with every Python-level torch.distributed collective it issues logged, one line per
call, to $COLLECTIVE_LOG_DIR/restart<R>_rank<RANK>.log, flushed per call (a killed rank keeps its log).

Used by tests/launch.py under torchrun. "{RANK}" in an argument becomes the rank's number (e.g. --data_root
<root>/{RANK}): each rank then reads its own copy, as nodes with node-local disks would. Only calls made through the
torch.distributed module are seen (the
project's code calls dist.all_reduce, dist.barrier, ...); DDP's gradient buckets, issued from C++, are not.
"""
import os
import runpy
import sys

import torch
import torch.distributed as dist

OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
       "broadcast_object_list", "reduce", "reduce_scatter", "gather", "gather_object", "scatter",
       "scatter_object_list", "all_to_all", "barrier", "monitored_barrier")


def describe(op, args, kwargs):
    """op name, then dtype and shape of each tensor argument (lists of tensors: their count), the reduce op.
    Object collectives: the name alone (their lists legitimately differ: gather_object's exists on the
    destination rank only, and the objects' sizes are the ranks' own)."""
    parts = [op]
    if "object" in op:
        return op
    for a in [*args, *kwargs.values()]:
        if torch.is_tensor(a):
            parts.append(f"{str(a.dtype).replace('torch.', '')}{tuple(a.shape)}")
        elif isinstance(a, list):
            parts.append(f"list[{len(a)}]")
        elif isinstance(a, dist.ReduceOp) or type(a).__name__ == "RedOpType":
            parts.append(str(a).split(".")[-1])
    return " ".join(parts)


def install(path):
    log = open(path, "a", buffering=1)  # line-buffered: every call is on disk before it is issued

    def wrap(op, real):
        def logged(*args, **kwargs):
            log.write(describe(op, args, kwargs) + "\n")
            log.flush()
            return real(*args, **kwargs)
        return logged

    for op in OPS:
        setattr(dist, op, wrap(op, getattr(dist, op)))


if __name__ == "__main__":
    folder = os.environ["COLLECTIVE_LOG_DIR"]
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    install(os.path.join(folder, f"restart{restart}_rank{os.environ['RANK']}.log"))
    script = os.path.abspath(sys.argv[1])
    sys.argv = [a.replace("{RANK}", os.environ["RANK"]) for a in sys.argv[1:]]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
