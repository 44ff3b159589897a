"""The 8-GPU command rehearsed on CPU: `torchrun train.py --dataset k400` with the K400 recipe's control flow
and only its sizes shrunk -- gradient accumulation 2, a checkpoint every epoch, a few DataLoader workers, the
official K400 folder layout made of real video files, one of them broken -- so that every branch a GPU run
takes on some ranks only runs here too. Every rank's collectives are logged and compared (tests/launch.py).

Default suite: 4 ranks with accumulation 2; ranks that see different files; a rank killed with SIGKILL
mid-epoch and restarted by torchrun, ending bit-identical to an uninterrupted run on 2 "nodes" (--nnodes 2).
`-m rehearsal` (CI runs it after the suite): the same at 8 ranks, and the evaluation scripts under torchrun
giving the results of one process.
"""
import json

import pytest
import torch

import launch
from model import load_checkpoint

TRAIN = launch.ROOT / "train.py"


def k400_args(data, out, world, *extra):
    """The K400 recipe (train.py RECIPES['k400']: stride 4, eps 0.05, lr, save every epoch, ...) with its sizes
    shrunk: tiny model, 64 prototypes, 2 clips per rank and forward, accumulation 2, 2 epochs, 1 worker."""
    return [TRAIN, "--dataset", "k400", "--data_root", data, "--out", out, "--arch", "tiny", "--num_prototypes", "64",
            "--micro_batch", "2", "--batch_size", str(2 * 2 * world), "--epochs", "2", "--warmup_epochs", "1",
            "--workers", "1", "--log_every", "1", *extra]


def weights(out):
    return load_checkpoint(str(out / "ckpt.pth"))["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ: {differ[:5]}"


def rehearse(tmp_path, world, videos_per_class):
    data = launch.k400_tree(tmp_path / "k400", videos_per_class=videos_per_class)
    out = tmp_path / "out"
    r = launch.run(k400_args(data, out, world), nproc=world, timeout=400, log_dir=tmp_path)
    assert r.code == 0, r.tail()
    assert r.first_mismatch() is None, r.first_mismatch()
    assert sorted(rank for _, rank in r.logs) == list(range(world))
    # Sinkhorn's all-reduces are in the logs (about a dozen per forward), on every rank alike.
    assert sum(line.startswith("all_reduce float32") for line in r.logs[(0, 0)]) > 10 * 2 * 2
    assert f"weights identical on all {world} ranks" in r.out
    # The start-up note of an accumulating run, printed by rank 0 alone: its memory estimate runs two forwards
    # of the model, which must issue no collective (the logs above agree) and leave the weights as they were.
    assert "note: 2 accumulation steps, so Sinkhorn balances" in r.out
    ckpt = load_checkpoint(str(out / "ckpt.pth"))
    steps_per_epoch = (4 * videos_per_class) // (world * 2 * 2)
    assert ckpt["config"]["world_size"] == world and ckpt["config"]["accum"] == 2
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * steps_per_epoch
    assert [json.loads(l)["step"] for l in open(out / "log.jsonl")] == list(range(1, 2 * steps_per_epoch + 1))
    broken = sorted(str(p) for p in (data / "train").rglob("*") if p.is_file() and p.stat().st_size < 100)
    assert set((out / "bad_videos.txt").read_text().splitlines()) == set(broken)  # K400 names have spaces
    assert "unreadable videos skipped: 1" in r.out
    return r


def test_k400_recipe_on_4_ranks_with_accumulation(tmp_path):
    rehearse(tmp_path, world=4, videos_per_class=4)  # 16 videos: 1 step per epoch on each of 4 ranks


@pytest.mark.rehearsal
def test_k400_recipe_on_8_ranks_with_accumulation(tmp_path):
    rehearse(tmp_path, world=8, videos_per_class=8)  # 32 videos: 1 step per epoch on each of 8 ranks


def test_ranks_that_see_different_videos_stop_with_one_message(tmp_path):
    # Node-local copies of the dataset (<root>/<RANK>): rank 1's copy lacks one video. Both ranks stop before
    # the first step, with the counts of each, instead of hanging (more steps on one rank) or silently training
    # on lists whose indices mean different clips.
    root = tmp_path / "k400"
    for rank in (0, 1):
        launch.k400_tree(root / str(rank), videos_per_class=4, broken=0)
    missing = next((root / "1" / "train").rglob("*.mp4"))
    missing.unlink()
    r = launch.run(k400_args(root / "{RANK}", tmp_path / "out", 2), nproc=2, timeout=120, log_dir=tmp_path)
    assert r.code != 0
    assert "ranks disagree on the training videos" in r.err, r.tail()
    assert "rank 1 sees 15 videos" in r.err and "rank 0 sees 16 videos" in r.err and "every node the same" in r.err
    assert "train.py: error: ranks disagree" in r.err and "RanksDisagree" not in r.err  # the message, no traceback
    assert not (tmp_path / "out" / "ckpt.pth").exists()


def test_killed_rank_restarted_by_torchrun_ends_bit_identical_to_two_nodes_uninterrupted(tmp_path):
    # Uninterrupted: 2 "nodes" of 1 rank each, joined by c10d rendezvous on localhost (the multi-node command).
    data = launch.k400_tree(tmp_path / "k400", videos_per_class=4)
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = ("--epochs", "3", "--workers", "2")
    r = launch.run(k400_args(data, full, 2, *extra), nproc=1, nodes=2, timeout=300, log_dir=tmp_path)
    assert r.code == 0 and r.first_mismatch() is None, r.tail()
    assert "weights identical on all 2 ranks" in r.out
    # Killed: 2 ranks on one node; rank 1 is SIGKILLed after its 5th step (in epoch 3 of 3: 2 steps per epoch),
    # and torchrun restarts both ranks, which resume from the last checkpoint on disk (epoch 1 or 2).
    script = [launch.ROOT / "tests" / "kill_at_step.py", *k400_args(data, killed, 2, *extra)[1:]]
    r = launch.run(script, nproc=2, timeout=300, log_dir=tmp_path, launcher_args=["--max-restarts", "1"],
                   env={"KILL_AT_STEP": "5", "KILL_RANK": "1"})
    assert r.code == 0, r.tail()
    assert r.first_mismatch(killed=[0]) is None, r.first_mismatch(killed=[0])
    assert {restart for restart, _ in r.logs} == {0, 1}  # it was killed and restarted
    assert "resumed from" in r.out and "weights identical on all 2 ranks" in r.out
    assert_same_weights(weights(full), weights(killed))
