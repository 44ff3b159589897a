"""The evaluation scripts under torchrun (4 gloo ranks on the CPU) give the results of one process, and every rank
issues the same collectives (tests/launch.py logs them): eval_linear.py on a K400-layout set of real clips with a
train and a val split, eval_finetune.py for a one-step epoch (without the recipe's random augmentation, and with
it), eval_vos.py on the DAVIS sequences in tests/data/davis. The one-process runs are the plain `python <script>`
commands, on one thread as each rank is. `python -m pytest -q -m rehearsal tests/test_rehearsal_eval.py` (CI runs
it after the suite).
"""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

import eval_finetune
import launch

pytestmark = pytest.mark.rehearsal

WORLD = 4
DAVIS = launch.ROOT / "tests" / "data" / "davis"  # blackswan, car-shadow: 20 frames each, DAVIS-2016 layout


def one_process(script_args, timeout=240):
    """`python <script> <args>` in one process and one thread (the ranks' OMP_NUM_THREADS=1 too: the same kernels,
    so the same arithmetic per clip); killed with its DataLoader workers past `timeout`. -> stdout."""
    proc = subprocess.Popen([sys.executable, *map(str, script_args)], cwd=launch.ROOT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launch.kill_all([proc])
        raise AssertionError(f"one process still running after {timeout} s: {script_args}") from None
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    return out


def on_ranks(script_args, tmp_path, timeout=240):
    """The same command under torchrun on WORLD ranks: it must succeed, every rank issuing the same collectives."""
    r = launch.run(script_args, nproc=WORLD, timeout=timeout, log_dir=tmp_path)
    assert r.code == 0, r.tail()
    assert sorted(rank for _, rank in r.logs) == list(range(WORLD)), r.tail()
    mismatch = r.first_mismatch()
    assert mismatch is None, mismatch
    return r

# ============ eval_linear.py: features sharded over ranks, head and probes on rank 0 ============


def k400_train_val(root, videos_per_class=3, classes=4, val=(2, 1, 1, 1)):
    """launch.k400_tree's train split (its first video a broken file) plus a val split in the same official
    layout -- annotations/val.csv, val/<label>/<youtube_id>_000010_000020.<ext> -- made of the same real clips,
    val[c] videos in class c. Returns the root."""
    root = launch.k400_tree(root, videos_per_class=videos_per_class, classes=classes, broken=1)
    sources = sorted(launch.VIDEOS.iterdir())
    rows = ["label,youtube_id,time_start,time_end,split"]
    for c, count in enumerate(val):
        label = f"class {c}"
        (root / "val" / label).mkdir(parents=True)
        for i in range(count):
            youtube_id, src = f"val{c:02d}x{i:03d}", sources[(c + i + 2) % len(sources)]
            launch.link_or_copy(src, root / "val" / label / f"{youtube_id}_000010_000020{src.suffix}")
            rows.append(f"{label},{youtube_id},10,20,val")
    (root / "annotations" / "val.csv").write_text("\n".join(rows) + "\n")
    return root


def linear_args(data, out):
    """Random tiny encoder; the K400 defaults (flip: a mirrored view per clip; k-NN and converged linear probes),
    one random crop per training clip (--aug_views, drawn from (seed, clip)), 2 clips x 3 crops per test video
    (the 340x256 K400 clip has 3 distinct crops), a short head. Batches of 2 clips: a shard of 3 clips ends in a
    partial batch."""
    return [launch.ROOT / "eval_linear.py", "--ckpt", "random", "--arch", "tiny", "--dataset", "k400",
            "--data_root", data, "--out", out / "linear.json", "--epochs", "5", "--batch_size", "4",
            "--aug_views", "1", "--test_clips", "2", "--test_crops", "3", "--extract_batch", "2",
            "--workers", "1"]


def same_features(single, multi):
    """Every feature cache file of the 1-process run, with the same labels and passes and features equal to
    rounding (a batch of other clips may take other kernel paths), and nothing else."""
    assert sorted(os.listdir(single)) == sorted(os.listdir(multi))
    assert len(os.listdir(single)) == 3  # train centre (+ mirror), train random crops, test 2x3
    for name in os.listdir(single):
        a, b = (torch.load(d / name, weights_only=True) for d in (single, multi))
        assert torch.equal(a["labels"], b["labels"]) and a["passes"] == b["passes"], name
        torch.testing.assert_close(a["feats"], b["feats"], rtol=1e-4, atol=1e-5, msg=name)


def test_eval_linear_on_4_ranks_equals_one_process(tmp_path):
    # 12 train videos (3 per rank; the broken one is replaced by its successor, on whichever rank holds it),
    # 5 val videos (2 on rank 0, 1 on each other rank).
    data = k400_train_val(tmp_path / "k400")
    r = on_ranks(linear_args(data, tmp_path / "ranks"), tmp_path)
    assert "skipping unreadable video" in r.err and "vid00x000" in r.err  # the broken file, on rank 0
    # The features reach rank 0 through one gather_object per view set (after the cache decision, broadcast).
    assert sum(line.startswith("gather_object") for line in r.logs[(0, 0)]) == 3, r.logs[(0, 0)]
    one_process(linear_args(data, tmp_path / "one"))
    same_features(tmp_path / "one" / "features", tmp_path / "ranks" / "features")
    single, multi = (json.loads((tmp_path / d / "linear.json").read_text()) for d in ("one", "ranks"))
    assert (single["num_train"], single["num_test"], single["num_classes"]) == (12, 5, 4)
    for key in ("top1", "top5", "train_top1", "num_train", "num_test", "forward_passes_per_train_clip"):
        assert multi[key] == single[key], key
    assert sorted(multi["probes"]) == sorted(single["probes"]) == ["knn", "linear_converged"]
    for name, result in single["probes"].items():  # accuracies and the chosen L2, not timings or gradient sizes
        for key in ("top1", "top5", "train_top1", "weight_decay", "holdout_top1", "k"):
            assert multi["probes"][name].get(key) == result.get(key), (name, key)

# ============ eval_finetune.py: one epoch of DDP, the test sharded over ranks ============
# The release's augmentation cannot give one process's weights on 4 ranks: each rank draws its crops, RandAugment
# ops, erased boxes, MixUp / CutMix and drop path from torch's RNG seeded by (seed, epoch, rank) (train_epoch), so a
# clip is augmented otherwise on another rank, and the DistributedSampler's order is not the one process's shuffle.
# So the weights are compared on a run without that randomness, and the recipe's run (augmentation on) is held to
# what must hold whatever the draws: its sharded test scores its checkpoint as one process does.


def finetune_args(data, out, batch_size, *extra):
    """Random tiny encoder on the 16 synthetic training videos, one epoch without warmup; batch_size clips per step
    over all ranks."""
    return [launch.ROOT / "eval_finetune.py", "--ckpt", "random", "--arch", "tiny", "--dataset", "synthetic",
            "--data_root", data, "--out", out, "--epochs", "1", "--warmup_epochs", "0", "--batch_size",
            str(batch_size), *extra]


# One step of 16 clips -- every training video -- so that one process and 4 ranks (4 clips each) step on the same
# clips; the crop keeps the whole 64x64 frame (scale and ratio 1), and --stride 3 makes a clip span more than the 16
# frames (start 0 always). Label smoothing stays: it is arithmetic.
NO_RANDOMNESS = ("--randaug", "0", "0", "0", "--crop_scale", "1", "1", "--crop_ratio", "1", "1", "--no-flip",
                 "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--drop_path", "0", "--stride", "3",
                 "--workers", "0")


def test_eval_finetune_on_4_ranks_equals_one_process(tiny_synthetic, tmp_path):
    on_ranks(finetune_args(tiny_synthetic, tmp_path / "ranks", 16, *NO_RANDOMNESS), tmp_path)  # 4 clips per rank
    one_process(finetune_args(tiny_synthetic, tmp_path / "one", 16, *NO_RANDOMNESS))
    single, multi = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "ranks"))
    assert multi["config"]["total_batch"] == single["config"]["total_batch"] == 16
    assert multi["config"]["lr_abs"] == single["config"]["lr_abs"]  # lr x clips per step / 256
    assert (multi["config"]["micro_batch"], single["config"]["micro_batch"]) == (16 // WORLD, 16)
    # The step: DDP averages the 4 ranks' gradients, each the mean over 4 clips, i.e. the mean over the 16 clips of
    # the one process (the model has no batch statistics: LayerNorm only), summed in another order. The logged loss
    # is the ranks' mean and the gradient norm the averaged gradient's: both equal the one process's to rounding
    # (a sum of the ranks' gradients instead of their mean would show in the norm: AdamW's step itself is blind
    # to a constant gradient scale).
    (a,), (b,) = ([json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
                  for d in ("one", "ranks"))
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert b["lr"] == a["lr"]
    # The weights: AdamW's first step moves each weight by lr_abs (6.25e-4) x g / (|g| + 1e-8), so gradients equal
    # to rounding give weights equal to far less than a step (measured: 1.2e-7 at most; a rank stepping on its own
    # gradient, or an lr missing its x world, puts them 1e-4 or more apart).
    ws, wm = (torch.load(tmp_path / d / "ckpt.pth", weights_only=True)["model"] for d in ("one", "ranks"))
    assert ws.keys() == wm.keys()
    for k in ws:
        torch.testing.assert_close(wm[k], ws[k], rtol=0, atol=1e-6, msg=k)
    # The test: rank r scores videos r, r + 4, ... (2 clips each), gathered. Weights equal to 1e-7 are far inside
    # the test scores' margins, so the accuracy is the one process's exactly.
    assert (multi["top1"], multi["top5"], multi["num_test"]) == (single["top1"], single["top5"], single["num_test"])


def test_eval_finetune_recipe_on_4_ranks_tests_its_checkpoint_as_one_process(tiny_synthetic, tmp_path):
    # The synthetic recipe as it is (RandAugment, crops, flip, erasing, MixUp / CutMix, drop path, 2 DataLoader
    # workers per rank), 4 clips per rank: one step of 16.
    argv = finetune_args(tiny_synthetic, tmp_path / "ranks", 16, "--micro_batch", "4")
    r = on_ranks(argv, tmp_path)
    assert "fine-tuned synthetic" in r.out
    multi = json.loads((tmp_path / "ranks" / "results.json").read_text())
    assert multi["config"]["world_size"] == WORLD and multi["num_test"] == 8
    # The 4 ranks' checkpoint, scored in this process by the same function on the whole test split.
    args = eval_finetune.get_args([str(a) for a in argv[1:]])
    data = eval_finetune.build_data(args, world=1)
    model, _, _ = eval_finetune.build_classifier(args, data.source, data.num_classes)
    model.load_state_dict(torch.load(tmp_path / "ranks" / "ckpt.pth", weights_only=True)["model"])
    alone = eval_finetune.evaluate(model, data.test_set, args.micro_batch, 0, torch.device("cpu"),
                                   contextlib.nullcontext)
    assert (alone["top1"], alone["top5"], alone["num_test"]) == (multi["top1"], multi["top5"], multi["num_test"])

# ============ eval_vos.py: clips sharded over ranks, the report gathered ============


def vos_args(out, *extra):
    return [launch.ROOT / "eval_vos.py", "--ckpt", "random", "--arch", "tiny", "--dataset", "davis2016",
            "--data_root", DAVIS, "--device", "cpu", "--workers", "1", "--out", out, *extra]


@pytest.mark.parametrize("extra, clips", [
    ((), 2),  # the protocol's one 16-frame clip per sequence: ranks 2 and 3 hold no clip, and still gather
    (("--num_frames", "4", "--sampling", "consecutive", "--vis", "2"), 10),  # 5 clips per sequence: 3, 3, 2, 2
])
def test_eval_vos_on_4_ranks_equals_one_process(tmp_path, extra, clips):
    on_ranks(vos_args(tmp_path / "ranks" / "vos.json", *extra), tmp_path)
    one_process(vos_args(tmp_path / "one" / "vos.json", *extra))
    single, multi = (json.loads((tmp_path / d / "vos.json").read_text()) for d in ("one", "ranks"))
    assert single["num_clips"] == multi["num_clips"] == clips
    assert multi["config"]["world_size"] == WORLD and single["config"]["world_size"] == 1
    # Every clip's frames and mIoU of both protocols (k-means seeded by seed + clip index, not by rank), and the means.
    assert multi["clips"] == single["clips"] and multi["mean"] == single["mean"]
    if "--vis" in extra:  # clip 0 is drawn by rank 0, clip 1 by rank 1: the same pictures
        pictures = sorted(p.name for p in (tmp_path / "one" / "vos_vis").iterdir())
        assert pictures == ["0000_blackswan_clusters.png", "0001_blackswan_clusters.png"]
        for name in pictures:
            ranks_png, one_png = (tmp_path / d / "vos_vis" / name for d in ("ranks", "one"))
            assert ranks_png.read_bytes() == one_png.read_bytes(), name
