"""eval_linear.py: the feature cache round trip and its invalidation; the head recipe separates
separable features and stays at chance on random labels; end to end on the synthetic videos with a
briefly pretrained and a random tiny encoder; the backbone stays frozen; released-layout loading
and refusal of a mismatched arch; distributed extraction equals single-process extraction."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import cli
import eval_linear
import launch
import probes
from data import SYNTHETIC_CLASSES, build_video_dataset, normalize, tube_mask
from eval_linear import cache_path, extract, load_features, main, predict, save_features, topk_accuracy, train_head
from model import build_model, load_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_args(ckpt, data, out, *extra, probes="none"):
    """A fast probe: 20 head epochs, no worker processes, no probes beside Table 9 unless asked (None: the
    default, all four on the built-in sets)."""
    return ["--ckpt", str(ckpt), "--dataset", "synthetic", "--data_root", str(data), "--out", str(out),
            "--epochs", "20", "--workers", "0", *extra] + (["--probes", probes] if probes else [])


def briefly_pretrained(data, path, steps=24, batch=4):
    """Our checkpoint format (as train.py writes it) after `steps` AdamW steps of SIGMA on synthetic clips."""
    torch.manual_seed(0)
    sigma = build_model("tiny", num_prototypes=64)
    cfg = sigma.cfg
    ds = build_video_dataset("synthetic", data, "train", num_frames=cfg.num_frames, size=cfg.img_size,
                             train=True, repeats=2)
    clips = normalize(torch.cat([ds[i][0] for i in range(len(ds))]))  # (2 * videos, 3, T, S, S): decoded once
    opt = torch.optim.AdamW(sigma.parameters(), lr=1e-3, weight_decay=0.05)
    for step in range(steps):
        videos = clips[torch.randint(len(clips), (batch,))]
        loss = sigma(videos, tube_mask(batch, cfg.grid, 0.9))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.save({"model": sigma.state_dict(), "model_config": asdict(cfg), "epoch": 0, "step": steps}, path)
    return sigma


@pytest.fixture(scope="module")
def pretrained_ckpt(tiny_synthetic, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pth"
    briefly_pretrained(tiny_synthetic, path)
    return path


# ============ feature cache ============

def test_feature_cache_round_trip_and_invalidation(tmp_path):
    key = dict(ckpt=dict(path="/x/ckpt.pth", size=10, mtime_ns=1), dataset="synthetic", split="train",
               views="centre+flip", encoder=dict(num_frames=8, img_size=64, proj_hidden=(512, 512)))
    feats, labels = torch.randn(5, 2, 7), torch.arange(5)
    path = cache_path(str(tmp_path), key)
    save_features(path, key, feats, labels, passes=10)
    entry = load_features(path, key)
    assert torch.equal(entry["feats"], feats) and torch.equal(entry["labels"], labels) and entry["passes"] == 10
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left behind
    for change in (dict(ckpt=dict(key["ckpt"], mtime_ns=2)), dict(split="val"), dict(views="2x3"),
                   dict(encoder=dict(key["encoder"], num_frames=16))):
        changed = {**key, **change}
        assert cache_path(str(tmp_path), changed) != path  # another file name ...
        assert load_features(path, changed) is None  # ... and the stored key is checked too


# ============ the head recipe ============

@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_head_separates_gaussian_blobs(norm):
    g = torch.Generator().manual_seed(0)
    C, D = 10, 32
    means = 4 * torch.randn(C, D, generator=g)

    def blobs(n):
        y = torch.randint(C, (n,), generator=g)
        return (means[y] + torch.randn(n, D, generator=g))[:, None], y  # (n, 1, D)

    (xtr, ytr), (xte, yte) = blobs(2000), blobs(1000)
    head = train_head(xtr, ytr, C, epochs=30, norm=norm, show=False)
    acc = topk_accuracy(predict(head, xte), yte)
    assert acc["top1"] >= 99.0 and acc["top5"] == 100.0


def test_head_on_random_labels_is_at_chance_on_held_out_data():
    g = torch.Generator().manual_seed(1)
    C, D = 10, 64
    x = torch.randn(4000, 1, D, generator=g)
    y = torch.randint(C, (4000,), generator=g)
    head = train_head(x[:2000], y[:2000], C, epochs=30, show=False)
    train_top1 = topk_accuracy(predict(head, x[:2000]), y[:2000])["top1"]
    test_top1 = topk_accuracy(predict(head, x[2000:]), y[2000:])["top1"]
    assert train_top1 > 14  # it does fit the noise a little ...
    assert 6 < test_top1 < 14  # ... which does not transfer: chance is 10 (std 0.7 at n=2000)


def test_multi_view_scores_are_averaged_softmax():
    head = train_head(torch.randn(64, 1, 8), torch.arange(64) % 4, 4, epochs=2, show=False)
    feats = torch.randn(5, 3, 8)  # 5 videos x 3 views
    expected = torch.stack([head(feats[:, v]).softmax(-1) for v in range(3)]).mean(0)
    torch.testing.assert_close(predict(head, feats), expected)
    scores, labels = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]]), torch.tensor([2, 0])
    assert topk_accuracy(scores, labels, ks=(1, 2, 5)) == {"top1": 50.0, "top2": 100.0, "top5": 100.0}


# ============ extraction ============

def test_extract_mean_pools_all_tokens_and_mirrors():
    encoder, cfg = load_encoder("random", "tiny")
    clips = torch.randint(0, 256, (3, 2, 3, cfg.num_frames, cfg.img_size, cfg.img_size), dtype=torch.uint8)  # 3 x 2 views
    loader = [(clips, torch.tensor([[4, 4], [5, 5], [6, 6]]))]
    feats, labels, passes = extract(encoder, loader, torch.device("cpu"), flip=True, show=False)
    assert feats.shape == (3, 4, cfg.enc_dim) and labels.tolist() == [4, 5, 6] and passes == 12
    with torch.no_grad():
        for v in range(2):  # columns: view 0, view 0 mirrored, view 1, view 1 mirrored
            torch.testing.assert_close(feats[:, 2 * v], encoder(normalize(clips[:, v])).mean(1), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(feats[:, 2 * v + 1], encoder(normalize(clips[:, v].flip(-1))).mean(1),
                                       rtol=1e-4, atol=1e-5)


# ============ end to end on the synthetic videos ============

def head_accuracy_by_hand(result, cache_dir):
    """Top-1 / top-5 of the Table 9 head recomputed from the cached features of `result`'s run (the only train
    and test view sets in cache_dir): the head trained with the run's settings, each test video's softmax
    scores averaged over its views by hand, its label looked up by hand."""
    def entry(prefix):
        (name,) = [f for f in os.listdir(cache_dir) if f.startswith(prefix)]
        return torch.load(os.path.join(cache_dir, name), weights_only=True)
    train, test = entry(f"synthetic_{result['args']['train_split']}_centre"), entry(
        f"synthetic_{result['args']['test_split']}_{result['test_views']}")
    a = result["args"]
    head = train_head(train["feats"], train["labels"], result["num_classes"], a["epochs"], a["lr"], a["weight_decay"],
                      a["batch_size"], a["head_norm"], a["warmup_epochs"], a["seed"], show=False)
    feats, labels = test["feats"], test["labels"]  # (M, V, D), (M,)
    with torch.no_grad():
        scores = sum(head(feats[:, v]).softmax(-1) for v in range(feats.shape[1])) / feats.shape[1]  # (M, C)
    ranked = scores.argsort(dim=1, descending=True)  # (M, C) classes, best first
    hit = lambda k: 100 * sum(int(labels[i]) in ranked[i, :k].tolist() for i in range(len(labels))) / len(labels)
    return hit(1), hit(5)


def test_pretrained_tiny_end_to_end_with_cache(pretrained_ckpt, tiny_synthetic, capsys):
    out = pretrained_ckpt.with_suffix(".linear_synthetic.json")  # the default: next to the checkpoint
    args = ["--ckpt", str(pretrained_ckpt), "--dataset", "synthetic", "--data_root", str(tiny_synthetic),
            "--epochs", "20", "--workers", "0", "--flip", "--probes", "none"]  # flip: off by default here
    first = main(args)
    saved = json.loads(out.read_text())
    assert saved["top1"] == first["top1"]
    by_hand = head_accuracy_by_hand(first, pretrained_ckpt.parent / "features")  # the test split, its labels
    assert (first["top1"], first["top5"]) == pytest.approx(by_hand, abs=1e-9)
    assert saved["num_train"] == 16 and saved["num_test"] == 8 and saved["num_classes"] == len(SYNTHETIC_CLASSES)
    assert saved["forward_passes_per_train_clip"] == 2.0  # the clip and its mirror, once
    assert saved["missing_keys"] == [] and saved["unexpected_keys"] == []
    assert first["extract_seconds"]["train"] > 0
    printed = capsys.readouterr().out
    assert "top-1" in printed
    # the number is labelled as a Table-9-protocol number, with the released probe's extras listed
    assert saved["protocol"] == eval_linear.PROTOCOL and printed.count("protocol: Table-9 protocol") == 1
    for extra in ("mixup 0.8", "cutmix 1.0", "label smoothing", "RandAugment", "random erasing", "/ 256",
                  "5 warmup epochs"):
        assert extra in printed and any(extra in d for d in saved["protocol"]["differences_from_released_probe"])

    again = main(args)  # every feature comes from the cache: no backbone pass, same numbers
    assert again["extract_seconds"] == {"train": 0.0, "test": 0.0} and again["top1"] == first["top1"]

    os.utime(pretrained_ckpt, ns=(0, os.stat(pretrained_ckpt).st_mtime_ns + 10 ** 9))  # "a new checkpoint"
    touched = main(args)
    assert touched["extract_seconds"]["train"] > 0 and touched["top1"] == first["top1"]


def test_random_tiny_end_to_end_backbone_frozen(tiny_synthetic, tmp_path, monkeypatch):
    seen = {}

    def load_and_watch(*a, **kw):
        encoder, cfg = load_encoder(*a, **kw)
        seen["encoder"], seen["before"] = encoder, {k: v.clone() for k, v in encoder.state_dict().items()}
        seen["calls"] = []
        encoder.register_forward_pre_hook(
            lambda m, inp: seen["calls"].append((m.training, torch.is_grad_enabled(),
                                                 any(p.requires_grad for p in m.parameters()))))
        return encoder, cfg

    monkeypatch.setattr(cli, "load_encoder", load_and_watch)
    res = main(run_args("random", tiny_synthetic, tmp_path / "r.json", "--arch", "tiny",
                        "--test_clips", "2", "--test_crops", "3"))
    assert res["test_views"] == "2x3"
    by_hand = head_accuracy_by_hand(res, tmp_path / "features")  # scores averaged over the 6 views of a video
    assert (res["top1"], res["top5"]) == pytest.approx(by_hand, abs=1e-9)
    assert res["forward_passes_per_train_clip"] == 1.0  # no mirror: synthetic labels name left / right
    # 16 train clips x 2 + 8 test videos x 6 views, each one backbone pass, all in eval mode without grad
    assert seen["calls"] and set(seen["calls"]) == {(False, False, False)}
    after = seen["encoder"].state_dict()
    assert after and all(torch.equal(v, seen["before"][k]) for k, v in after.items())
    test_cache = [f for f in os.listdir(tmp_path / "features") if f.startswith("synthetic_val_2x3")]
    assert len(test_cache) == 1
    entry = torch.load(tmp_path / "features" / test_cache[0], weights_only=True)
    assert entry["feats"].shape == (8, 6, 192) and entry["passes"] == 48


def test_missing_data_root_fails_before_any_encoding(tmp_path):
    with pytest.raises(FileNotFoundError, match="ucfTrainTestlist"):
        main(["--ckpt", "random", "--dataset", "ucf101", "--data_root", str(tmp_path / "nowhere"),
              "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "features").exists()


# ============ loading released checkpoints ============

def test_released_layout_loads_and_mismatched_arch_is_refused(tiny_synthetic, tmp_path):
    # A file as the released code writes it: released key names, an argparse.Namespace beside them.
    torch.manual_seed(1)
    sd = build_model("tiny", num_prototypes=64).state_dict()
    assert any(k.startswith("encoder.blocks.0.attn.q_bias") for k in sd) and "encoder_to_decoder.weight" in sd
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": sd, "optimizer": {}, "epoch": 799, "scaler": {},
                "args": argparse.Namespace(model="pretrain_videomae_tiny", mask_ratio=0.9)}, path)
    res = main(run_args(path, tiny_synthetic, tmp_path / "r.json", "--arch", "tiny", "--epochs", "1"))
    assert res["missing_keys"] == [] and res["unexpected_keys"] == []
    with pytest.raises(ValueError, match="preset 'tiny'"):
        main(run_args(path, tiny_synthetic, tmp_path / "r.json", "--arch", "vit_s"))
    with pytest.raises(ValueError, match="pass its arch"):
        main(run_args(path, tiny_synthetic, tmp_path / "r.json"))


# ============ distributed extraction: every rank decides alike, results equal one process ============

def torchrun(tmp_path, args, timeout=240):
    """eval_linear.py on 2 gloo ranks (tests/launch.py: a free port; ranks killed past `timeout`, so a hang fails the
    test). '{RANK}' in an argument becomes the rank's number, as a node-local path differs per node.
    -> (exit code, stderr)."""
    r = launch.run([launch.ROOT / "eval_linear.py", *args], nproc=2, timeout=timeout, log_dir=tmp_path)
    return r.code, r.err


def same_caches(single, multi):
    """Every cache file of the 1-process run exists in `multi` with the same labels, passes and features."""
    assert sorted(os.listdir(single)) == sorted(os.listdir(multi))  # same keys, nothing else written
    for name in os.listdir(single):
        a, b = (torch.load(d / name, weights_only=True) for d in (single, multi))
        assert torch.equal(a["labels"], b["labels"]) and a["passes"] == b["passes"], name
        torch.testing.assert_close(a["feats"], b["feats"], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.rehearsal  # torchrun on 2 ranks: `python -m pytest -q -m rehearsal` (CI runs it)
def test_torchrun_with_a_cache_folder_per_node_equals_one_process(tiny_synthetic, tmp_path):
    """Each rank gets its own --cache_dir, as on node-local disks. The features must reach rank 0 through the
    process group (rank 1's shard files would never appear in rank 0's folder) and rank 0 alone writes the
    cache. On the second run rank 0 finds the cache and rank 1 does not: every rank must follow rank 0's
    decision (a rank that extracts alone waits in a gather the others never join)."""
    common = run_args("random", tiny_synthetic, tmp_path / "r.json", "--arch", "tiny", "--epochs", "3")
    single = main(common + ["--cache_dir", str(tmp_path / "single")])
    for run in ("extracting", "from rank 0's cache"):
        code, err = torchrun(tmp_path, common + ["--cache_dir", str(tmp_path / "cache{RANK}")])
        assert code == 0, f"{run}: {err[-3000:]}"
        multi = json.loads((tmp_path / "r.json").read_text())
        assert (multi["top1"], multi["top5"]) == (single["top1"], single["top5"]), run
        same_caches(tmp_path / "single", tmp_path / "cache0")
        assert not (tmp_path / "cache1").exists(), run  # rank 1 writes no cache and no shard file
    assert multi["extract_seconds"] == {"train": 0.0, "test": 0.0}  # the second run encoded nothing


@pytest.mark.rehearsal  # torchrun on 2 ranks: `python -m pytest -q -m rehearsal` (CI runs it)
def test_torchrun_aug_views_and_fewer_test_videos_than_ranks_equal_one_process(tiny_synthetic, tmp_path):
    """--aug_views: each clip's random crops are drawn from (seed, clip index), so the cached crops do not
    depend on the world size (ranks drawing from their own RNG would give rank 1's first clip rank 0's first
    crop). One test video for 2 ranks: rank 1 holds no test clip and must still join the gather, with
    nothing to add (an empty shard must not reach torch.cat)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data)
    val = sorted((data / "val").glob("*/*.mp4"))
    for video in val[1:]:  # keep one test video; the class folders stay, so both splits have all classes
        video.unlink()
    common = run_args("random", data, tmp_path / "r.json", "--arch", "tiny", "--epochs", "3", "--aug_views", "1")
    single = main(common + ["--cache_dir", str(tmp_path / "single")])
    assert single["num_test"] == 1 and single["forward_passes_per_train_clip"] == 2.0  # centre + one crop
    code, err = torchrun(tmp_path, common + ["--cache_dir", str(tmp_path / "multi")])
    assert code == 0, err[-3000:]
    same_caches(tmp_path / "single", tmp_path / "multi")
    multi = json.loads((tmp_path / "r.json").read_text())
    assert (multi["top1"], multi["top5"]) == (single["top1"], single["top5"])


@pytest.mark.rehearsal  # torchrun on 2 ranks: `python -m pytest -q -m rehearsal` (CI runs it)
def test_torchrun_ranks_that_see_different_videos_stop_before_encoding(tiny_synthetic, tmp_path):
    """Rank 1's copy of the data lacks a training video: clip i would be another video on each rank, and rank
    0 would put rank 1's features in the wrong rows. Both ranks must stop, naming what differs."""
    (tmp_path / "data0").symlink_to(tiny_synthetic)
    shutil.copytree(tiny_synthetic, tmp_path / "data1")
    sorted((tmp_path / "data1" / "train").glob("*/*.mp4"))[-1].unlink()
    args = run_args("random", tmp_path / "data{RANK}", tmp_path / "r.json", "--arch", "tiny",
                    "--cache_dir", str(tmp_path / "cache"))
    code, err = torchrun(tmp_path, args)
    assert code != 0
    message = next((line for line in err.splitlines() if "ranks disagree on the train videos" in line), err[-3000:])
    assert "rank 0 sees 16 videos" in message and "rank 1 sees 15 videos" in message, message
    assert message.endswith("Give every node the same dataset (--data_root).")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "r.json").exists()  # nothing was encoded


def write_image_folder(root):
    """An ImageFolder (the IN-1K layout): train/ and val/, 4 images of 40x48 px per class 'red' and 'blue', the
    class being the dominant colour."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, colour in enumerate(("red", "blue")):
            (root / split / colour).mkdir(parents=True)
            for i in range(4):
                pixels = (torch.rand(40, 48, 3, generator=g) * 80).byte()
                pixels[..., 0 if c == 0 else 2] += 170  # the class is the dominant colour
                Image.fromarray(pixels.numpy()).save(root / split / colour / f"{i}.png")
    return root


def test_aug_view_crops_depend_on_the_seed_and_the_clip_only(tiny_synthetic, tmp_path):
    """The --aug_views crops of a clip (video or image) are the same whatever was read before it and whatever
    state torch's RNG is in -- what a rank or DataLoader worker of its own would change -- and follow --seed,
    which the cache key holds."""
    _, cfg = load_encoder("random", "tiny")
    for dataset, root in (("synthetic", tiny_synthetic), ("imagenet", write_image_folder(tmp_path))):
        def crops(seed, order):
            args = eval_linear.get_args(["--ckpt", "random", "--dataset", dataset, "--data_root", str(root),
                                         "--aug_views", "2", "--seed", str(seed)])
            views = {name: ds for name, _, _, _, ds in eval_linear.build_view_sets(args, cfg, print)[0]}
            torch.manual_seed(len(order))  # another global RNG state for each order
            return {i: views["train_aug"][i][0] for i in order}  # (2, 3, T, S, S) each
        first, shuffled, other_seed = crops(0, [0, 1, 2, 3]), crops(0, [3, 1, 2]), crops(1, [0, 1, 2, 3])
        assert all(torch.equal(shuffled[i], first[i]) for i in shuffled), dataset
        assert not torch.equal(first[0][0], first[0][1]), dataset  # two different crops of one clip
        assert not any(torch.equal(other_seed[i], first[i]) for i in first), dataset


def test_images_are_clips_of_one_repeated_frame(tmp_path):
    """An ImageFolder (the IN-1K layout) probes end to end; every frame of a clip is the image."""
    write_image_folder(tmp_path)
    args = eval_linear.get_args(["--ckpt", "random", "--arch", "tiny", "--dataset", "imagenet",
                                 "--data_root", str(tmp_path)])
    _, cfg = load_encoder("random", "tiny")
    clip, label = eval_linear.build_dataset(args, cfg, "val")[0]
    assert clip.shape == (3, cfg.num_frames, cfg.img_size, cfg.img_size) and label == 0
    assert all(torch.equal(clip[:, t], clip[:, 0]) for t in range(cfg.num_frames))
    res = main(["--ckpt", "random", "--arch", "tiny", "--dataset", "imagenet", "--data_root", str(tmp_path),
                "--out", str(tmp_path / "r.json"), "--workers", "0"])
    assert res["num_train"] == res["num_test"] == 8 and res["num_classes"] == 2
    assert res["args"]["epochs"] == 30 and res["forward_passes_per_train_clip"] == 2.0  # IN-1K preset, flip on
    assert res["top1"] == 100.0  # colour is linearly readable even from a random encoder
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        main(["--ckpt", "random", "--dataset", "cifar100", "--data_root", str(tmp_path),
              "--out", str(tmp_path / "c.json")])


def test_ssv2_defaults_to_the_released_segment_sampling_and_views(tmp_path):
    """SSv2: TSN-style segments and 2 temporal views x 3 crops, as the released SSv2 probe; stride sampling
    stays available; other datasets keep stride sampling and one view."""
    base = ["--ckpt", "random", "--data_root", str(tmp_path)]
    ssv2 = eval_linear.get_args(base + ["--dataset", "ssv2"])
    assert (ssv2.sampling, ssv2.test_clips, ssv2.test_crops) == ("segments", 2, 3)
    stride = eval_linear.get_args(base + ["--dataset", "ssv2", "--sampling", "stride"])
    assert (stride.sampling, stride.test_clips, stride.test_crops) == ("stride", 1, 1)
    ucf = eval_linear.get_args(base + ["--dataset", "ucf101", "--test_clips", "5"])
    assert (ucf.sampling, ucf.test_clips, ucf.test_crops) == ("stride", 5, 1)


# ============ probes beside Table 9 ============

def blobs(seed, n, dim, classes, spread, noise=0.0):
    """n points around `classes` random means (N(0, spread^2) per coordinate) + unit noise; a `noise`
    fraction of the labels is replaced by uniformly random ones. -> x (n, dim), labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(classes, dim, generator=g)
    y = torch.arange(n) % classes
    x = means[y] + torch.randn(n, dim, generator=g)
    relabel = torch.rand(n, generator=g) < noise
    return x, torch.where(relabel, torch.randint(classes, (n,), generator=g), y)


def test_converged_probe_separates_and_stops_at_a_stationary_point():
    x, y = blobs(0, 300, 20, 3, spread=3.0)
    res = probes.linear_converged_probe(x, y, x[:, None], y, 3)
    assert res["train_top1"] == 100.0 and res["top1"] == 100.0
    # The optimum of mean CE + lam/2 |W|^2 on standardised inputs: the gradient, written out by hand
    # (softmax minus one-hot), vanishes there -- and not at a point nearby.
    xs = ((x - x.mean(0)) / x.std(0)).double()
    lam = 1e-2
    W, b = probes.fit_logistic(xs, y, 3, lam)
    onehot = torch.nn.functional.one_hot(y, 3).double()

    def grad_norm(W, b):
        err = (xs @ W + b).softmax(1) - onehot  # (N, C)
        return torch.cat([(xs.T @ err / len(xs) + lam * W).flatten(), err.mean(0)]).norm().item()

    assert grad_norm(W, b) < 1e-5
    assert grad_norm(W * 1.05, b) > 100 * grad_norm(W, b)  # a 5% step off the optimum is visible


def test_held_out_lambda_is_larger_on_noisy_labels():
    """More parameters (200 x 4) than clips (400): with half the labels randomised, weak regularisation fits
    the noise and the held-out part must pick a strong one; with clean labels, a weak one."""
    x, y = blobs(3, 400, 200, 4, spread=0.5)
    _, noisy = blobs(3, 400, 200, 4, spread=0.5, noise=0.5)
    clean, dirty = (probes.converged_logistic(x, labels, 4) for labels in (y, noisy))
    assert clean["lam"] <= 1e-3 and dirty["lam"] >= 1.0
    assert set(clean["holdout_top1"]) == set(probes.LAMBDAS)


def test_knn_matches_a_per_sample_reference():
    g = torch.Generator().manual_seed(0)
    train_x, train_y = torch.randn(200, 16, generator=g), torch.randint(5, (200,), generator=g)
    test_x = torch.randn(37, 16, generator=g)
    votes = probes.knn_votes(train_x, train_y, test_x, 5, chunk=8)  # several chunks
    for i, q in enumerate(test_x):  # DINO's rule, one test clip at a time
        sims = torch.stack([torch.dot(q, t) / (q.norm() * t.norm()) for t in train_x])  # (N,) cosine
        top = sims.argsort(descending=True)[:20]
        ref = torch.zeros(5)
        for j in top:
            ref[train_y[j]] += torch.exp(sims[j] / 0.07)
        torch.testing.assert_close(votes[i], ref, rtol=1e-4, atol=0)
        assert votes[i].argmax() == ref.argmax()
    # Multi-view testing sums the views' votes; a training clip is its own nearest neighbour.
    res = probes.knn_probe(train_x, train_y, torch.stack([train_x, train_x], 1), train_y, 5)
    assert res["top1"] > 60 and res["k"] == 20


def test_probes_option_refuses_unknown_names(capsys):
    with pytest.raises(SystemExit):
        eval_linear.get_args(["--ckpt", "random", "--dataset", "ucf101", "--probes", "knn,linaer"])
    err = capsys.readouterr().err
    assert "linaer" in err and "linear_converged,knn,dense,attentive" in err
    ucf = ["--ckpt", "random", "--dataset", "ucf101", "--data_root", "data/ucf101"]
    assert eval_linear.get_args(ucf).probes == ("linear_converged", "knn")  # token probes: opt-in on real datasets
    assert eval_linear.get_args([*ucf, "--probes", "none"]).probes == ()


def write_dense_set(root, per_class=(6, 3), frames=40, size=64):
    """A tiny video set with dense-label sidecars (the layout synthetic.py writes): video classes 'blue' and
    'red' = the colour of a 16 px square that slides right 1 px per frame over grey noise; its dense class is
    1 (red) or 2 (blue). 40 frames, so the centred 8-frame clip at stride 2 starts at frame 4, not 0."""
    import av
    import numpy as np
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c, (name, colour) in enumerate((("blue", (40, 60, 230)), ("red", (230, 40, 40)))):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                grey = rng.integers(60, 120, (1, size, size, 1), dtype=np.uint8)
                video = np.repeat(np.repeat(grey, 3, -1), frames, 0)  # (T, S, S, 3) static noise
                masks = np.zeros((frames, size, size), np.uint8)  # (T, S, S)
                y0, x0 = rng.integers(0, size - 16), rng.integers(0, size - 16 - frames)
                for t in range(frames):
                    video[t, y0:y0 + 16, x0 + t:x0 + t + 16] = colour
                    masks[t, y0:y0 + 16, x0 + t:x0 + t + 16] = 2 - c  # red -> 1, blue -> 2
                path = root / split / name / f"{split}_{i}.mp4"
                with av.open(str(path), "w") as out:
                    stream = out.add_stream("mpeg4", rate=25, options={"qmin": "3", "qmax": "3"})
                    stream.height, stream.width, stream.pix_fmt = size, size, "yuv420p"
                    for img in video:
                        out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
                    out.mux(stream.encode())
                np.save(root / split / name / f"{split}_{i}.mask.npy", masks)
    (root / "meta.json").write_text(json.dumps({"dense_classes": ["background", "red", "blue"]}))
    return root


@pytest.fixture(scope="module")
def dense_set(tmp_path_factory):
    return write_dense_set(tmp_path_factory.mktemp("dense") / "set")


def test_token_labels_of_a_hand_built_mask():
    """2 x 2 x 2 tokens of 2 frames x 2 x 2 pixels; the clip reads frames 1-4 of 6 (frames 0 and 5 are all
    class 1: reading them would show)."""
    import numpy as np
    from types import SimpleNamespace
    cfg = SimpleNamespace(grid=(2, 2, 2), tubelet_size=2, patch_size=2)
    m = np.zeros((6, 4, 4), np.uint8)
    m[0] = m[5] = 1
    m[1, 0, :2] = m[2, 0, 0] = 1  # token (0, 0, 0): 3 of 8 pixels class 1 -> background
    m[1:3, :2, 2] = 2  # (0, 0, 1): 4 of 8 class 2, a tie with background -> the object
    m[1, 2:, :2] = m[2, 2, 0] = 1  # (0, 1, 0): 5 of 8 class 1 -> 1
    m[3, :2, :2], m[4, :2, :2] = 2, [[1, 1], [1, 0]]  # (1, 0, 0): 4 x class 2, 3 x class 1 -> 2
    m[3:5, :2, 2:] = 1  # (1, 0, 1): all class 1
    m[3, 2:, 2:], m[4, 2:, 2:] = [[1, 1], [1, 2]], [[2, 2], [0, 0]]  # (1, 1, 1): 3 / 3 / 2 -> the higher, 2
    labels = probes.token_labels(m, torch.tensor([1, 2, 3, 4]), cfg, 3)
    assert labels.tolist() == [0, 2, 1, 0, 2, 1, 0, 2]  # (t, h, w) row-major, the encoder's token order


def test_dense_labels_match_the_pixels_of_the_decoded_clip(dense_set):
    """The labels come from the sidecar at the frames data.py decodes: the decoded clip's own colours,
    reduced the same way, must give the same tokens -- and a clip read from frame 0 must not."""
    _, cfg = load_encoder("random", "tiny")
    ds = build_video_dataset("synthetic", dense_set, "val", num_frames=cfg.num_frames, size=cfg.img_size,
                             train=False)
    assert eval_linear.dense_problem(ds, cfg) is None
    labels = eval_linear.dense_labels(ds, cfg, 3)  # (N, 256)
    agree, shifted = [], []
    for i in range(len(ds)):
        rgb = ds[i][0].float()  # (3, T, S, S) pixel levels
        colourful = rgb.max(0).values - rgb.min(0).values > 100  # the square, not the grey noise
        pixels = torch.where(colourful, torch.where(rgb[0] > rgb[2], 1, 2), 0).byte()  # (T, S, S)
        seen = probes.token_labels(pixels.numpy(), torch.arange(cfg.num_frames), cfg, 3)
        agree.append((seen == labels[i]).float().mean())
        mask = torch.from_numpy(__import__("numpy").load(eval_linear.sidecar_path(ds.samples[i][0])))
        early = probes.token_labels(mask.numpy(), 2 * torch.arange(cfg.num_frames), cfg, 3)  # frames 0, 2, ..
        shifted.append((seen == early).float().mean())
    assert min(agree) > 0.99 and max(shifted) < min(agree) - 0.02


def test_dense_probe_on_oracle_and_random_token_features():
    g = torch.Generator().manual_seed(0)
    names = ["background", "a", "b"]
    labels = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), 40 * 64, replacement=True, generator=g).view(40, 64)
    oracle = torch.nn.functional.one_hot(labels, 3).half()  # (clips, tokens, 3): the answer itself
    res = probes.dense_probe(oracle[:30], labels[:30], oracle[30:], labels[30:], names)
    assert res["miou"] == 100.0 and res["token_accuracy"] == 100.0 and res["iou"]["b"] == 100.0
    noise = torch.randn(40, 64, 16, generator=g).half()
    res = probes.dense_probe(noise[:30], labels[:30], noise[30:], labels[30:], names)
    assert abs(res["miou"] - res["chance_miou"]) < 3 and abs(res["token_accuracy"] - res["chance_token_accuracy"]) < 3
    assert 20 < res["chance_miou"] < 27  # all background: IoU 70 for it, 0 for a and b


def marker_tokens(seed, n, tokens=16, noise_dims=15):
    """Tokens = one-hot position (as a position embedding) + a marker on one random token + noise; label =
    whether the marker sits in the first half. Every mean-pooled feature is the same up to noise."""
    g = torch.Generator().manual_seed(seed)
    where = torch.randint(tokens, (n,), generator=g)
    marker = torch.nn.functional.one_hot(where, tokens).float()[..., None]  # (n, tokens, 1)
    x = torch.cat([torch.eye(tokens).expand(n, -1, -1), marker, 0.5 * torch.randn(n, tokens, noise_dims, generator=g)], -1)
    return x.half(), (where < tokens // 2).long()


def test_attentive_probe_reads_what_mean_pooling_cannot():
    (xtr, ytr), (xte, yte) = marker_tokens(0, 1024), marker_tokens(1, 256)
    with probes.one_cpu_thread("cpu"):
        res = probes.attentive_probe(xtr, ytr, xte, yte, 2, heads=2)
    pooled = probes.linear_converged_probe(xtr.float().mean(1), ytr, xte.float().mean(1)[:, None], yte, 2)
    assert res["top1"] > 85 and res["train_top1"] > 95
    assert pooled["top1"] < 60  # chance is 50 (SE 3 on 256 clips)


def test_all_probes_end_to_end_on_a_set_with_dense_labels(dense_set, tmp_path, capsys):
    out = tmp_path / "r.json"
    main(run_args("random", dense_set, out, "--arch", "tiny", probes=None))
    found = json.loads(out.read_text())["probes"]
    assert set(found) == {"linear_converged", "knn", "dense", "attentive"}  # all four: the built-in default
    assert found["linear_converged"]["train_top1"] == 100.0 and found["knn"]["top1"] == 100.0  # colour
    assert found["dense"]["classes"] == ["background", "red", "blue"]
    assert found["dense"]["miou"] > 70 > found["dense"]["chance_miou"]  # random features still see colour
    assert found["attentive"]["top1"] == found["attentive"]["train_top1"] == 100.0  # colour, as k-NN reads it
    assert all(p["seconds"] > 0 for p in found.values())
    table = capsys.readouterr().out
    assert "linear_converged" in table and "mIoU" in table
    tokens = [f for f in os.listdir(tmp_path / "features") if "_tokens_" in f]
    assert len(tokens) == 2  # train and val token caches
    entry = torch.load(tmp_path / "features" / sorted(tokens)[0], weights_only=True)
    assert entry["feats"].dtype == torch.float16 and entry["feats"].shape == (12, 256, 192)


def test_dense_probe_refused_without_native_resolution_or_sidecars(dense_set, tiny_synthetic, tmp_path):
    with pytest.raises(ValueError, match="videos are 64x64 but the encoder's clips are 32x32"):
        main(run_args("random", dense_set, tmp_path / "r.json", "--arch", "tiny", "--img_size", "32",
                      probes="dense"))
    empty = tmp_path / "no_sidecars"
    shutil.copytree(dense_set, empty, ignore=shutil.ignore_patterns("*.npy"))
    with pytest.raises(ValueError, match="--probes dense: no dense-label sidecar"):
        main(run_args("random", empty, tmp_path / "r.json", "--arch", "tiny", probes="dense"))
    assert not (tmp_path / "features").exists()  # refused before any encoding


# ============ bad options stop at start ============

BASE = ["--ckpt", "random", "--dataset", "synthetic", "--workers", "0"]


@pytest.mark.parametrize("option, value", [("--batch_size", "0"), ("--lr", "-1"), ("--epochs", "0"),
                                           ("--test_clips", "0"), ("--weight_decay", "-0.1"), ("--fold", "4"),
                                           ("--extract_batch", "0"), ("--aug_views", "-1"), ("--arch", "vit_h"),
                                           ("--warmup_epochs", "100")])
def test_bad_option_stops_before_any_data_with_its_name(option, value, tmp_path, capsys, monkeypatch):
    """Each bad value exits 2 (argparse's code) naming the option, before a clip or weight is read."""
    monkeypatch.setattr(eval_linear, "build_dataset", lambda *a, **k: pytest.fail("data read before the check"))
    monkeypatch.setattr(cli, "load_encoder", lambda *a, **k: pytest.fail("weights read before the check"))
    with pytest.raises(SystemExit) as info:
        main(BASE + ["--data_root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json"), option, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"{option} {value}" in err and ("e.g." in err or "choose one of" in err)


def test_bad_options_from_the_command_line_are_listed_without_traceback(tmp_path):
    """Several bad values at once: one message each, the usage line, exit 2, no traceback."""
    cmd = [sys.executable, "eval_linear.py", *BASE, "--epochs", "0", "--lr", "-1", "--ckpt", str(tmp_path / "no.pth")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "usage:" in done.stderr
    for text in ("--epochs 0: must be >= 1", "--lr -1.0: must be > 0", "no.pth' does not exist"):
        assert text in done.stderr


def test_truncated_checkpoint_is_named(tmp_path):
    torch.save({"model": build_model("tiny").state_dict()}, tmp_path / "whole.pth")
    bad = tmp_path / "cut.pth"
    bad.write_bytes((tmp_path / "whole.pth").read_bytes()[:1000])
    with pytest.raises(cli.UsageError) as info:  # the command line prints the message alone (exit 2)
        main(["--ckpt", str(bad), "--dataset", "synthetic", "--data_root", str(tmp_path / "nowhere"),
              "--out", str(tmp_path / "r.json")])
    assert re.search(r"--ckpt: cannot read checkpoint .*cut\.pth.*truncated or corrupt", str(info.value))


class Payload:
    """Unpickling this calls print(): stands for code hidden in a checkpoint."""

    def __reduce__(self):
        return print, ("payload executed",)


def test_checkpoint_with_pickled_code_is_refused_as_such(tmp_path, capsys):
    torch.save({"model": build_model("tiny").state_dict(), "extra": Payload()}, tmp_path / "code.pth")
    with pytest.raises(cli.UsageError) as info:
        main(["--ckpt", str(tmp_path / "code.pth"), "--dataset", "synthetic", "--out", str(tmp_path / "r.json")])
    message = str(info.value)
    assert "refusing to load" in message and "pickled code" in message and "truncated" not in message
    assert "payload executed" not in capsys.readouterr().out


def test_attentive_probe_is_blind_to_the_scale_of_each_channel():
    """The attentive probe standardises every channel with the train tokens' statistics, so rescaling channels by
    powers of two (exact in floating point) changes nothing -- the last block of a pretrained encoder has channels
    of very different scales. Per-token LayerNorm alone would not make it so."""
    (xtr, ytr), (xte, yte) = marker_tokens(0, 256), marker_tokens(1, 64)
    scale = 2.0 ** torch.randint(-4, 8, (xtr.shape[-1],), generator=torch.Generator().manual_seed(0))  # (D,)
    with probes.one_cpu_thread("cpu"):
        a = probes.attentive_probe(xtr, ytr, xte, yte, 2, heads=2, epochs=5)
        b = probes.attentive_probe((xtr.float() * scale).half(), ytr, (xte.float() * scale).half(), yte, 2,
                                   heads=2, epochs=5)
    assert (a["top1"], a["train_top1"]) == (b["top1"], b["train_top1"])


def test_token_variance_shares_against_the_decomposition():
    """tokens = clip part + position part (each centred): the shares are their sums of squares over the total."""
    g = torch.Generator().manual_seed(0)
    clip, position = torch.randn(40, 1, 8, generator=g), 0.5 * torch.randn(1, 16, 8, generator=g)
    clip, position = clip - clip.mean(0), position - position.mean(1)
    tokens = clip + position  # (40, 16, 8)
    a, b = 16 * clip.pow(2).sum(), 40 * position.pow(2).sum()  # each summed over all 40 x 16 tokens
    shares = probes.token_variance_shares(tokens + 3.0, chunk=7)  # an offset and uneven chunks change nothing
    assert shares["clip"] == pytest.approx((a / (a + b)).item(), rel=1e-4)
    assert shares["position"] == pytest.approx((b / (a + b)).item(), rel=1e-4)


# ============ the command line tells the truth: help, device, datasets, user errors ============

def help_problems(parser, none_means):
    """What is wrong with a parser's --help: an option without help, or one that shows '(default: None)' although a
    recipe, the dataset or the checkpoint supplies its value. Only an option of `none_means` ({option: the words
    of its help that say what None means}) may show it, and only with those words."""
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0]
        shown = formatter._expand_help(action) if action.help else ""  # the text --help prints for it
        if not action.help:
            problems.append(f"{name}: no help")
        elif "(default: None)" in shown and not (name in none_means and none_means[name] in shown):
            problems.append(f"{name}: {shown!r}")
    return problems


# Options whose None is their genuine meaning: none here; each would be listed with the words saying what it means.
NONE_MEANS = {}


def test_help_explains_every_option_and_shows_no_none_default():
    parser = eval_linear.build_parser()
    assert help_problems(parser, NONE_MEANS) == []
    text = parser.format_help()
    assert "(default: None)" not in text
    # The values that come from elsewhere are written out: head epochs per dataset, the presets' clip lengths.
    for shown in ("100 (fashion, synthetic", "40 (k400)", "8 (tiny), 16 (vit_s, vit_b)", "--workers"):
        assert shown in " ".join(text.split()), shown


def test_device_default_and_torchrun_rank_and_bad_values(monkeypatch):
    resolve = lambda name: str(cli.resolve_device(name))  # what every script's --device resolves to
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve(None) == "cpu" and resolve("cpu") == "cpu"
    with pytest.raises(cli.UsageError, match="--device cuda: no CUDA device here; use --device cpu"):
        resolve("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve(None) == "cuda" and resolve("cuda:1") == "cuda:1"
    with pytest.raises(cli.UsageError, match="has 2 GPU"):
        resolve("cuda:2")
    for bad in ("tpu", "cuda:x", "mps", "cpu:0"):
        with pytest.raises(cli.UsageError, match="choose cpu, cuda or cuda:N"):
            resolve(bad)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun: each rank its own GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve(None) == "cuda:1" and resolve("cuda") == "cuda:1" and resolve("cpu") == "cpu"
    with pytest.raises(cli.UsageError, match="use --device cuda"):
        resolve("cuda:0")


def test_bad_device_stops_at_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_encoder", lambda *a, **k: pytest.fail("weights read before the check"))
    with pytest.raises(SystemExit) as info:
        main(BASE + ["--out", str(tmp_path / "r.json"), "--device", "gpu"])
    assert info.value.code == 2 and "--device 'gpu': choose cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_fashion(tmp_path_factory):
    """A few clips of moving Fashion-MNIST (synthetic.fashion_dataset): 8 train / 4 val videos, 4 classes."""
    from synthetic import fashion_dataset
    return fashion_dataset(tmp_path_factory.mktemp("fashion") / "set", num_train=8, num_val=4, num_vos=2)


def test_fashion_is_read_by_its_train_py_name_from_the_generated_root(small_fashion, tmp_path, monkeypatch):
    # Without --data_root the set comes from synthetic.fashion_dataset() (here: the small one), as in train.py.
    import data
    monkeypatch.setattr(data, "fashion_dataset", lambda root=None: small_fashion)
    args = eval_linear.get_args(["--ckpt", "random", "--dataset", "fashion"])
    assert args.data_root is None and not args.flip and args.probes == eval_linear.PROBES  # a built-in set's defaults
    res = main(["--ckpt", "random", "--dataset", "fashion", "--out", str(tmp_path / "r.json"), "--epochs", "2",
                "--workers", "0", "--probes", "knn"])
    assert (res["dataset"], res["num_train"], res["num_test"], res["num_classes"]) == ("fashion", 8, 4, 4)
    assert "knn" in res["probes"]


USER_ERRORS = [  # (extra arguments, words of the message)
    (["--ckpt", "random", "--img_size", "60"], "img_size 60 is not a multiple of patch_size 8"),
    (["--ckpt", "random", "--arch", "tiny", "--num_frames", "7"], "num_frames 7 is not a multiple of tubelet_size"),
    (["--ckpt", "{not_ours}"], "is not one of our checkpoints: pass its arch"),
    (["--ckpt", "{not_ours}", "--arch", "tiny"], "lacks encoder weights"),
    (["--ckpt", "{corrupt}"], "truncated or corrupt"),
]


@pytest.mark.parametrize("extra, words", USER_ERRORS)
def test_user_errors_reach_the_command_line_as_a_message(extra, words, tiny_synthetic, tmp_path):
    """A model setting the model refuses, a checkpoint that is not an encoder or cannot be read: exit 2 with the
    message naming the option, no traceback."""
    torch.save({"weights": torch.zeros(2)}, tmp_path / "not_ours.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    extra = [e.format(not_ours=tmp_path / "not_ours.pth", corrupt=tmp_path / "corrupt.pth") for e in extra]
    cmd = [sys.executable, "eval_linear.py", *extra, "--dataset", "synthetic", "--data_root", str(tiny_synthetic),
           "--out", str(tmp_path / "r.json"), "--device", "cpu", "--workers", "0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("eval_linear.py: error: --") and words in done.stderr, done.stderr
