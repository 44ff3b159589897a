"""
What every rank of a multi-process run must agree on, and how a rank's failure reaches the others.

Under torchrun every rank runs the same script, but each reads its own file system: a node-local copy of a
dataset, a checkpoint on a node-local disk, a cache folder one node cannot see. A decision taken from such a
read (a checkpoint exists, a cache is complete, the list of videos and its order, steps per epoch, a file is
readable) changes which collectives a rank issues or what its samples mean, so ranks that decide differently
either wait for each other forever or train on silently different data. The rule every entry point follows:

    a decision a rank takes from its own files is compared across ranks before it is acted on,
    and a disagreement stops every rank at once with one message naming what differs and where.

`agree` compares a value (one all_gather_object of a short summary and a digest); `together` runs a block
that may fail on some ranks only and turns a failure anywhere into the same error everywhere; `from_rank0` and
`gather_to_rank0` move a decision or a result between rank 0 and the others. All four are no-ops in a single
process. Code that runs on one rank alone (notes, pictures, summaries, checkpoint writes) must issue no collective
at all: it uses none of them. `init_process_group` sets up the process group so that torchrun's restarts of a
failed run find their peers.
"""
import contextlib
import hashlib
import os

import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


def init_process_group(backend, device_id=None):
    """torch.distributed.init_process_group for a script started by torchrun, that also survives torchrun's
    restarts (--max-restarts): the rendezvous keys of each attempt live under a prefix of their own.

    Why: torchrun (torch 2.14.1) restarts every rank on the same store (its agent's, at the same MASTER_PORT) and the
    ranks write their addresses under the same keys each attempt. A restarted rank that starts before a slower peer
    reads the address that peer had in the attempt before -- a dead process -- and fails ("Connection refused",
    reproduced on CPU with gloo by a rank killed with SIGKILL; tests/test_rehearsal.py restarts one that way).
    """
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Under torchrun the agent serves the store and every rank is a client; otherwise rank 0 serves it.
    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                          is_master=rank == 0 and not agent_serves, timeout=default_pg_timeout)  # torch's default
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank, world_size=size,
                            device_id=device_id)


class RanksDisagree(RuntimeError):
    """Ranks read different inputs; raised on every rank with the same message."""


def world():
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def digest(value):
    """A short, stable hash of a value's repr (lists of paths, tuples of numbers, ...)."""
    return hashlib.sha256(repr(value).encode()).hexdigest()[:12]


def agree(what, summary, value=None, fix=""):
    """Stop every rank unless all ranks hold the same `value` (default: `summary`).

    what: the thing compared, e.g. "the train videos"; summary: what this rank sees, in words a user reads
    ("16 videos"); value: the exact thing compared (e.g. the list of (path, label)), hashed; fix: what to do.
    Raises RanksDisagree on every rank, e.g. "ranks see different train videos: rank 1 sees 15 videos
    (list 3f2a...), rank 0 sees 16 videos (list 9c1e...): give every node the same dataset".
    """
    rank, size = world()
    if size == 1:
        return
    mine = (str(summary), digest(summary if value is None else value))
    everyone = [None] * size
    dist.all_gather_object(everyone, mine)
    if len({d for _, d in everyone}) == 1:
        return
    groups = {}
    for r, (text, d) in enumerate(everyone):
        groups.setdefault((text, d), []).append(r)
    # Largest group last: the odd ones out are named first.
    parts = [f"rank{'s' if len(rs) > 1 else ''} {_ranks(rs)} see{'' if len(rs) > 1 else 's'} {text} (digest {d})"
             for (text, d), rs in sorted(groups.items(), key=lambda kv: len(kv[1]))]
    raise RanksDisagree(f"ranks disagree on {what}: " + "; ".join(parts) + (f". {fix}" if fix else ""))


def _ranks(rs):
    return ", ".join(map(str, rs)) if len(rs) <= 4 else f"{rs[0]}..{rs[-1]} ({len(rs)} ranks)"


@contextlib.contextmanager
def together(what):
    """Run a block that may fail on some ranks only (reading a file, building a shard); afterwards every rank
    learns whether any rank failed, and if one did, every rank raises: the failing rank its own error, the
    others RuntimeError naming it. Without this a rank that fails leaves the others waiting in their next
    collective until the timeout. One all_gather_object per block, on every rank (also when nothing failed).
    """
    rank, size = world()
    if size == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 -- re-raised below, after the others have heard of it
        error = err
    everyone = [None] * size
    dist.all_gather_object(everyone, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, message) for r, message in enumerate(everyone) if message is not None]
    if error is not None:
        raise error
    if failed:
        r, message = failed[0]
        raise RuntimeError(f"rank {r} failed while {what}: {message}"
                           + (f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""))


def from_rank0(value, world):
    """rank 0's `value` on every rank (one broadcast; `value` itself in a single process)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(value, rank, world):
    """Every rank's `value` (CPU tensors), as a list in rank order on rank 0, None elsewhere. Through the process
    group, not through files: rank 0 may not see the other ranks' disks."""
    if world == 1:
        return [value]
    everyone = [None] * world if rank == 0 else None
    dist.gather_object(value, everyone, dst=0)
    return everyone
