"""Multi-process runs for the tests: torchrun on CPU (gloo), with every rank's collectives logged and compared.

run(script_args, nproc) starts `python -m torch.distributed.run` with the script under log_collectives.py, so
each rank appends every Python-level collective it issues (op, dtype, shape) to its own file, flushed per
call. On a timeout the launcher *and its ranks* (which torchrun starts in process groups of their own) are killed,
and the logs are compared: a mismatch is reported as the first call where two ranks differ, not a bare hang.
DDP's gradient buckets are issued from C++ and are not in these logs.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGGER = Path(__file__).resolve().parent / "log_collectives.py"
VIDEOS = Path(__file__).resolve().parent / "data" / "videos"


@dataclass
class Result:
    code: int
    out: str
    err: str
    logs: dict  # (restart, rank) -> [lines]

    def first_mismatch(self, killed=()):
        """None when every rank issued the same collectives in the same order (per restart), else a description
        of the first call where two ranks differ. In the attempts listed in `killed` (restart counts) a rank was
        killed: there the logs may stop early, but must agree as far as they go."""
        for restart in sorted({r for r, _ in self.logs}):
            per_rank = {rank: lines for (r, rank), lines in sorted(self.logs.items()) if r == restart}
            ref_rank, ref = next(iter(per_rank.items()))
            for rank, lines in per_rank.items():
                for i in range(max(len(ref), len(lines))):
                    a = ref[i] if i < len(ref) else "(nothing)"
                    b = lines[i] if i < len(lines) else "(nothing)"
                    if a != b and not (restart in killed and "(nothing)" in (a, b)):
                        return (f"restart {restart}, collective #{i + 1}: rank {ref_rank} issued {a}, rank {rank} "
                                f"issued {b}")
        return None

    def tail(self):
        return f"exit {self.code}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-5000:]}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """Every live process below pid (from /proc: children of each thread, recursively)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def kill_all(procs):
    """SIGKILL launchers and everything they started (ranks, DataLoader workers)."""
    victims = [q for p in procs for q in descendants(p.pid)] + [p.pid for p in procs]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


def torchrun_cmd(script_args, nproc, launcher_args=()):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *launcher_args,
            str(LOGGER), *map(str, script_args)]


def run(script_args, nproc=2, timeout=240, log_dir=None, nodes=1, launcher_args=(), env=None):
    """torchrun `script_args` (a script path, then its arguments) on `nodes` launchers of `nproc` ranks each,
    all on localhost; returns Result. nodes > 1: one launcher per "node", joined by c10d rendezvous on a free
    port (the multi-node command of the README); stdout / stderr are those of all launchers, joined."""
    log_dir = Path(log_dir or os.environ.get("TMPDIR", "/tmp")) / f"collectives_{time.time_ns()}"
    log_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLLECTIVE_LOG_DIR": str(log_dir), **(env or {})}
    if nodes == 1:
        commands = [torchrun_cmd(script_args, nproc, ["--standalone", *launcher_args])]
    else:
        rdzv = ["--nnodes", str(nodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
                "--rdzv_id", f"test{time.time_ns()}"]
        commands = [torchrun_cmd(script_args, nproc, [*rdzv, *launcher_args]) for _ in range(nodes)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                              start_new_session=True) for c in commands]
    deadline, outs = time.monotonic() + timeout, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        kill_all(procs)
        result = Result(-9, "", "", read_logs(log_dir))
        raise AssertionError(f"torchrun still running after {timeout} s: a hang. "
                             f"First differing collective: {result.first_mismatch()}") from None
    code = max((p.returncode for p in procs), key=abs)
    return Result(code, "".join(o for o, _ in outs), "".join(e for _, e in outs), read_logs(log_dir))


def read_logs(log_dir):
    logs = {}
    for f in Path(log_dir).glob("restart*_rank*.log"):
        restart, rank = (int(x) for x in f.stem.replace("restart", "").split("_rank"))
        logs[(restart, rank)] = f.read_text().splitlines()
    return logs


def link_or_copy(src, dst):
    """A hard link (no bytes copied), or a copy where src and dst are on different file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def k400_tree(root, videos_per_class=8, classes=4, broken=1):
    """A Kinetics-400 folder in the official layout -- annotations/train.csv (label,youtube_id,time_start,
    time_end,split) and train/<label>/<youtube_id>_<start:06d>_<end:06d>.<ext> -- made of the real K400 / UCF101 /
    HMDB51 clips in tests/data/videos (hard links), plus `broken` files that are not videos. Returns the root."""
    root = Path(root)
    sources = sorted(VIDEOS.iterdir())
    rows = ["label,youtube_id,time_start,time_end,split"]
    for c in range(classes):
        label = f"class {c}"
        (root / "train" / label).mkdir(parents=True)
        for i in range(videos_per_class):
            youtube_id, src = f"vid{c:02d}x{i:03d}", sources[(c + i) % len(sources)]
            dst = root / "train" / label / f"{youtube_id}_000010_000020{src.suffix}"
            if c * videos_per_class + i < broken:
                dst = dst.with_suffix(".mp4")
                dst.write_bytes(b"\x00\x00\x00\x18ftypmp42 -- truncated download")
            else:
                link_or_copy(src, dst)
            rows.append(f"{label},{youtube_id},10,20,train")
    (root / "annotations").mkdir()
    (root / "annotations" / "train.csv").write_text("\n".join(rows) + "\n")
    return root
