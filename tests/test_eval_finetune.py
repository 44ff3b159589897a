"""eval_finetune.py: drop path (0 = bit-identical, > 0 only in train mode, expectation kept); layer-wise lr
decay and weight-decay groups against the released formula; MixUp / CutMix targets against the timm formula
(rows sum to 1, with smoothing); the release's augmentation (one crop, flip, RandAugment draw and erased box per
clip; crop and erasing boxes distributed as the release's samplers; RandAugment's op set, levels, per-op
probability); the presets against the released scripts' values; the released head init; bad settings stop at
start naming the option; end to end on tiny synthetic videos; a resumed run equals an uninterrupted one bitwise;
the loss is read from the device once per --log_every steps and a non-finite one still stops before a checkpoint;
under torchrun (2 gloo ranks) ranks that see different checkpoints or different videos stop with one message
instead of hanging, and fewer test videos than ranks give the 1-process result."""
import json
import math
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

import eval_finetune
import launch
from augment import AugmentedClips, ClipErasing, ClipRandAugment, ClipTransform, build_mixer, erase_clips, mix_batch
from data import DEFAULT_STRIDE, build_video_dataset, open_video
from eval_finetune import Classifier, finetune_param_groups, get_args, main, train_step
from model import Block, Encoder, build_config, build_model, drop_path
from train import choose_precision, lr_at


@pytest.fixture(scope="module")
def tiny_cfg():
    return build_config("tiny", target="pixel", loss="pixel")

# ============ drop path (model.py) ============


def test_drop_path_zero_is_bit_identical_and_draws_nothing(tiny_cfg):
    torch.manual_seed(0)
    plain = Encoder(tiny_cfg)
    torch.manual_seed(0)
    zero = Encoder(tiny_cfg, drop_path=0.0)
    videos = torch.randn(2, 3, tiny_cfg.num_frames, tiny_cfg.img_size, tiny_cfg.img_size)
    plain.train(), zero.train()
    state = torch.get_rng_state()
    out = zero(videos)
    assert torch.equal(torch.get_rng_state(), state)  # no random draw: pretraining's RNG stream is unchanged
    assert torch.equal(out, plain(videos))


def test_drop_path_only_in_train_mode_and_keeps_the_expectation(tiny_cfg):
    torch.manual_seed(0)
    enc = Encoder(tiny_cfg, drop_path=0.3)
    assert [b.drop_path for b in enc.blocks] == pytest.approx(torch.linspace(0, 0.3, tiny_cfg.enc_depth).tolist())
    ref = Encoder(tiny_cfg)
    ref.load_state_dict(enc.state_dict())
    videos = torch.randn(2, 3, tiny_cfg.num_frames, tiny_cfg.img_size, tiny_cfg.img_size)
    assert torch.equal(enc.eval()(videos), ref.eval()(videos))  # eval: no drop path at all
    assert not torch.equal(enc.train()(videos), ref.train()(videos))
    # The branch of each sample is either dropped (0) or kept and scaled by 1 / (1 - p).
    x = torch.ones(20000, 3, 4)
    y = drop_path(x, 0.25, training=True)
    kept = y[:, 0, 0] > 0
    assert torch.all(y[kept] == 1 / 0.75) and torch.all(y[~kept] == 0)  # whole samples, not elements
    assert abs((~kept).float().mean().item() - 0.25) < 0.02 and abs(y.mean().item() - 1) < 0.03
    block = Block(16, 2, drop_path=0.5).train()
    torch.manual_seed(1)
    h = torch.randn(64, 5, 16)
    residual_only = (block(h) - h).abs().flatten(1).amax(1) == 0  # both branches dropped: output = input
    assert residual_only.any() and not residual_only.all()

# ============ the head, layer-wise lr decay, weight decay ============


def test_head_init_and_layer_decay_groups(tiny_cfg):
    torch.manual_seed(0)
    model = Classifier(Encoder(tiny_cfg), num_classes=7)
    assert model.head.bias.abs().max() == 0
    # trunc-normal(std 0.02) x init_scale 0.001; the truncation bounds are absolute (+-2, as timm's), so at
    # this std it is a plain normal
    assert 1.6e-5 < model.head.weight.std().item() < 2.4e-5
    depth = tiny_cfg.enc_depth
    groups = finetune_param_groups(model, weight_decay=0.05, layer_decay=0.75)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # every parameter exactly once
    for g in groups:
        for name, p in zip(g["names"], g["params"]):
            # The formula, independently: 0 = tube embedding, block i -> i + 1, fc_norm / head -> depth + 1.
            layer = (0 if name.startswith("encoder.patch_embed") else
                     int(name.split(".")[2]) + 1 if name.startswith("encoder.blocks.") else depth + 1)
            assert g["lr_scale"] == pytest.approx(0.75 ** (depth + 1 - layer)), name
            decayed = name.endswith("weight") and p.ndim >= 2  # Linear / Conv weights only
            assert g["weight_decay"] == (0.05 if decayed else 0.0), name
    scales = {g["layer"]: g["lr_scale"] for g in groups}
    assert scales[depth + 1] == 1.0 and scales[1] == pytest.approx(0.75 ** depth)
    assert scales[0] == pytest.approx(0.75 ** (depth + 1)) and len(scales) == depth + 2

# ============ augmentation ============


@pytest.mark.parametrize("which", ["mixup", "cutmix"])
def test_mixed_targets_follow_the_mixing_and_sum_to_one(which):
    C, s = 5, 0.1
    torch.manual_seed(0)
    x = torch.rand(6, 3, 4, 8, 8) + 1  # (B, 3, T, H, W), positive
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    mixer = build_mixer(0.8 if which == "mixup" else 0, 1.0 if which == "cutmix" else 0, C)
    for _ in range(5):
        mixed, targets = mix_batch(x, labels, mixer, C, s)
        assert mixed.shape == x.shape
        assert torch.allclose(targets.sum(1), torch.ones(6)) and targets.min() >= s / C - 1e-7
        other = x.roll(1, 0)
        if which == "mixup":  # mixed = lam x + (1 - lam) x_rolled: recover lam from one pixel
            lam = ((mixed - other) / (x - other)).flatten()[0].item()
            assert torch.allclose(mixed, lam * x + (1 - lam) * other, atol=1e-5)
        else:  # the share of pixels still from the clip itself, the same box in every frame
            own = (mixed == x).all(dim=(1, 2))  # (B, H, W)
            assert torch.equal(own, own[:1].expand_as(own))
            assert torch.all((mixed == x) | (mixed == other))
            lam = own[0].float().mean().item()
        # timm's mixup_target: smooth each one-hot (off s/C, on 1 - s + s/C), then mix with the rolled batch.
        one_hot = F.one_hot(labels, C).float() * (1 - s) + s / C
        assert torch.allclose(targets, lam * one_hot + (1 - lam) * one_hot.roll(1, 0), atol=1e-5)
    _, plain = mix_batch(x, labels, None, C, s)
    assert torch.allclose(plain, F.one_hot(labels, C) * (1 - s) + s / C)


# ============ the release's training augmentation: one draw per clip, the release's bounds ============

# The release's RandAugment op set for 'inc1' (its rand_augment.py), spelled out here independently.
RELEASED_INCREASING_OPS = {"AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                           "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
                           "TranslateY"}


def _still_clip(T=6, H=48, W=64, seed=0):
    """T identical random frames, uint8 (T, H, W, 3): any per-frame draw would make them differ."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, H, W, 3), generator=g, dtype=torch.uint8).expand(T, -1, -1, -1).contiguous()


def test_every_frame_gets_the_same_crop_flip_and_randaugment():
    frames = _still_clip()
    transform = ClipTransform(32, randaug=(4, 7.0, 0.5), crop_scale=(0.25, 1.0), crop_ratio=(0.75, 1.3333))
    outputs = []
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(frames)  # (3, T, S, S)
        assert out.shape == (3, 6, 32, 32) and out.dtype == torch.uint8  # normalised later, on the device
        assert torch.equal(out, out[:, :1].expand_as(out)), seed  # one crop, flip and op draw for all frames
        outputs.append(out[:, 0])
    assert len({o.sum().item() for o in outputs}) == 12  # and the draw changes from clip to clip
    # The test has teeth: drawing per frame (T calls) gives frames that differ.
    torch.manual_seed(0)
    per_frame = torch.cat([transform(frames[t:t + 1]) for t in range(6)], dim=1)  # (3, T, S, S)
    assert not torch.equal(per_frame, per_frame[:, :1].expand_as(per_frame))


def test_randaugment_draws_ops_levels_and_signs_as_released(monkeypatch):
    aug = ClipRandAugment(4, 7.0, 0.5)
    assert set(aug._AUGMENTATION_SPACE) == RELEASED_INCREASING_OPS
    # Each op's value at level m = 7 on a 100 x 200 frame, from the release's level -> argument rules.
    value = {name: fn(7.0, 100, 200) for name, (fn, _) in aug._AUGMENTATION_SPACE.items() if fn is not None}
    assert value == pytest.approx(dict(Rotate=21.0, Posterize=2, Solarize=77, SolarizeAdd=77, Color=0.63,
                                       Contrast=0.63, Brightness=0.63, Sharpness=0.63, ShearX=0.21, ShearY=0.21,
                                       TranslateX=0.315 * 200, TranslateY=0.315 * 100))
    torch.manual_seed(0)
    levels = torch.tensor([aug.level() for _ in range(4000)])
    assert abs(levels.mean() - 7) < 0.03 and abs(levels.std() - 0.5) < 0.03  # N(7, 0.5) per op
    # Which ops run: 4 drawn per clip with replacement, each applied with probability 1/2, random signs.
    calls = []
    monkeypatch.setattr(aug, "apply_op", lambda clip, name, v: calls.append((name, v)) or clip)
    clip = tv_tensors.Video(_still_clip(T=2, H=20, W=20).permute(0, 3, 1, 2))
    for _ in range(1500):
        aug(clip)
    assert abs(len(calls) / 1500 - 2.0) < 0.1  # Binomial(4, 1/2): mean 2, SE 0.026
    counts = {name: sum(n == name for n, _ in calls) for name in RELEASED_INCREASING_OPS}
    assert min(counts.values()) > 0.7 * len(calls) / 15 and max(counts.values()) < 1.3 * len(calls) / 15
    rotations = [v for n, v in calls if n == "Rotate"]
    assert min(rotations) < -17 and max(rotations) > 17 and all(abs(v) <= 30 for v in rotations)


def test_solarize_ops_on_pixel_values():
    aug = ClipRandAugment()
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, -1, -1)  # (T, 3, 16, 16)
    added = aug.apply_op(x, "SolarizeAdd", 77)
    expect = torch.where(x < 128, (x.int() + 77).clamp(max=255), x.int())
    assert torch.equal(added.int(), expect)
    assert torch.equal(aug.apply_op(x, "Solarize", 256), x)  # level 0: nothing inverted
    assert torch.equal(aug.apply_op(x, "Solarize", 77).int(), torch.where(x >= 77, 255 - x.int(), x.int()))


def _released_box(height, width, scale, ratio, tries, accept, rng):
    """The release's box sampler (its random-resized crop and random erasing), written from its description:
    area uniform in scale, log-uniform aspect, sides rounded, first box that fits -> (h, w) or None."""
    for _ in range(tries):
        area = rng.uniform(*scale) * height * width
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if accept(h, w):
            return h, w
    return None


def test_crop_area_and_aspect_stay_within_the_released_bounds():
    from scipy.stats import ks_2samp
    torch.manual_seed(0)
    crop = ClipTransform(224).crop  # the v2.RandomResizedCrop the training clips go through
    clip = tv_tensors.Video(torch.zeros(2, 3, 240, 320, dtype=torch.uint8))
    boxes = [crop.make_params([clip]) for _ in range(3000)]
    area = torch.tensor([b["height"] * b["width"] / (240 * 320) for b in boxes])
    aspect = torch.tensor([b["width"] / b["height"] for b in boxes])
    assert area.min() >= 0.25 - 0.01 and area.max() <= 1 and area.min() < 0.27 and area.max() > 0.9
    assert aspect.min() >= 0.75 - 0.01 and aspect.max() <= 1.3333 + 0.01
    rng = random.Random(0)  # the release's crop sampler: w from area x aspect, fits if w <= W and h <= H
    ref = [_released_box(240, 320, (0.25, 1.0), (0.75, 1.3333), 10, lambda h, w: 0 < w <= 320 and 0 < h <= 240, rng)
           for _ in range(3000)]
    ref_area = [w * h / (240 * 320) for w, h in ref if w is not None]
    assert ks_2samp(area.numpy(), ref_area).pvalue > 1e-3


def test_erasing_probability_box_sizes_and_noise_match_the_release():
    from scipy.stats import ks_2samp
    torch.manual_seed(0)
    videos = torch.zeros(3000, 3, 2, 32, 32)  # (B, 3, T, H, W), normalised zeros
    erase_clips(videos, ClipErasing(0.25))
    erased = videos != 0  # (B, 3, T, H, W)
    hit = erased.flatten(1).any(1)
    assert abs(hit.float().mean().item() - 0.25) < 0.03  # p = 0.25; SE 0.008
    masks = erased[hit].any(1)  # (N, T, H, W)
    assert torch.equal(masks[:, 0], masks[:, 1])  # the same box in every frame ...
    inside = videos[hit].permute(0, 2, 3, 4, 1)[masks]  # (n, 3) values inside the boxes
    assert abs(inside.mean().item()) < 0.02 and abs(inside.std().item() - 1) < 0.02  # ... filled with N(0, 1)
    frame0, frame1 = videos[hit][:, :, 0], videos[hit][:, :, 1]
    assert not torch.equal(frame0, frame1)  # ... drawn afresh per frame
    rows, cols = masks[:, 0].any(2).sum(1), masks[:, 0].any(1).sum(1)  # (N,) box heights and widths
    assert torch.equal(masks[:, 0].flatten(1).sum(1), rows * cols)  # one rectangle
    area = (rows * cols).float() / 1024
    assert area.min() >= 0.02 - 0.01 and area.max() <= 1 / 3 + 0.02
    assert (rows / cols).min() >= 0.3 - 0.1 and (rows / cols).max() <= 1 / 0.3 + 0.4
    rng = random.Random(0)  # the release's erasing: aspect = h / w, fits if h < H and w < W, 100 tries
    ref = [_released_box(32, 32, (0.02, 1 / 3), (0.3, 1 / 0.3), 100, lambda h, w: h < 32 and w < 32, rng)
           for _ in range(3000)]
    assert ks_2samp(area.numpy(), [h * w / 1024 for h, w in ref]).pvalue > 1e-3


def test_training_clips_come_from_the_decoded_frames(tiny_synthetic):
    """AugmentedClips reads the frames data.VideoClips reads and returns (3, T, S, S) clips, one draw each."""
    parsed = build_video_dataset("synthetic", tiny_synthetic, "train", num_frames=4, size=32, train=True, repeats=2)
    clips = AugmentedClips(parsed, ClipTransform(32, randaug=(0, 0, 0), crop_scale=(1, 1), crop_ratio=(1, 1),
                                                 flip=False))
    torch.manual_seed(0)
    views, labels = clips[0]
    assert views.shape == (2, 3, 4, 32, 32) and labels.tolist() == [parsed.samples[0][1]] * 2
    # Crop = the whole 64 x 64 frame resized to 32: the frames data.py decodes (uint8; normalised on the device).
    with open_video(parsed.samples[0][0]) as video:
        frames = video.read(list(range(video.num_frames)))  # (N, H, W, 3)
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) / 255  # (N, 3, 32, 32)
    assert views.dtype == torch.uint8
    first = views[0, :, 0].float() / 255  # (3, 32, 32) in [0, 1]
    assert min((first - xi).abs().max().item() for xi in x) <= 1 / 255 + 1e-6  # one of the video's frames


# ============ presets: the released scripts, value by value ============

# Copied from the released scripts (scripts_finetune/finetune_kinetics.sh, finetune_ssv2.sh) and the defaults of
# run_class_finetuning.py they keep. lr, min_lr are per 256 clips; the scripts' --batch_size 4 is clips per GPU
# (--micro_batch here) on 8 GPUs with update_freq 1: 32 clips per step (--batch_size here, the total).
RELEASED = dict(lr=1e-3, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.75,
                drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1, randaug=(4, 7.0, 0.5),
                crop_scale=(0.25, 1.0), crop_ratio=(0.75, 1.3333), reprob=0.25, batch_size=32, micro_batch=4,
                repeats=1, test_crops=3)
RELEASED_K400 = dict(RELEASED, epochs=100, test_clips=7, flip=True, sampling="stride")  # --sampling_rate 4
RELEASED_SSV2 = dict(RELEASED, epochs=40, test_clips=2, flip=False, sampling="segments")  # 16 segments


@pytest.mark.parametrize("dataset, released", [("k400", RELEASED_K400), ("ssv2", RELEASED_SSV2)])
def test_presets_equal_the_released_scripts(dataset, released, monkeypatch):
    args = get_args(["--ckpt", "random", "--dataset", dataset, "--data_root", "/data"])
    assert {k: getattr(args, k) for k in released} == released
    assert args.stride is None and DEFAULT_STRIDE["k400"] == 4  # K400: data.py's stride 4 = --sampling_rate 4
    assert args.lr * args.batch_size / 256 == pytest.approx(1.25e-4)  # the released lr_abs, on any number of GPUs
    monkeypatch.setenv("WORLD_SIZE", "8")  # under torchrun on the release's 8 GPUs: 8 x 4 clips, no accumulation
    on_8 = get_args(["--ckpt", "random", "--dataset", dataset, "--data_root", "/data"])
    assert (on_8.batch_size, on_8.micro_batch) == (32, 4)
    monkeypatch.setenv("WORLD_SIZE", "16")  # 16 GPUs: the default micro-batch is lowered to keep 32 clips per step
    assert get_args(["--ckpt", "random", "--dataset", dataset, "--data_root", "/data"]).micro_batch == 2
    monkeypatch.delenv("WORLD_SIZE")  # (the --recipe paper checks below: one process)
    paper = get_args(["--ckpt", "random", "--dataset", dataset, "--data_root", "/data", "--recipe", "paper"])
    assert paper.randaug == (2, 9.0, 0.5) and paper.epochs == {"k400": 75, "ssv2": 50}[dataset]
    assert get_args(["--ckpt", "random", "--dataset", dataset, "--data_root", "/data", "--recipe", "paper",
                     "--epochs", "30"]).epochs == 30
# ============ command line, end to end, resume ============


@pytest.mark.parametrize("bad, option", [(["--drop_path", "1.5"], "--drop_path"),
                                         (["--layer_decay", "0"], "--layer_decay"),
                                         (["--warmup_epochs", "200"], "--warmup_epochs"),
                                         (["--randaug", "2", "12", "0.5"], "--randaug"),
                                         (["--batch_size", "3", "--repeats", "2"], "--batch_size"),
                                         (["--batch_size", "16", "--micro_batch", "5"], "--micro_batch 4"),
                                         (["--micro_batch", "3", "--repeats", "2"], "--micro_batch"),
                                         (["--epochs", "0"], "--epochs"),
                                         (["--batch_size", "0"], "--batch_size"),
                                         (["--lr", "-1"], "--lr"),
                                         (["--repeats", "0"], "--repeats"),
                                         (["--reprob", "1.5"], "--reprob"),
                                         (["--crop_scale", "0", "1"], "--crop_scale"),
                                         (["--randaug", "2.5", "7", "0.5"], "--randaug"),
                                         (["--fold", "4"], "--fold"),
                                         (["--workers", "-1"], "--workers"),
                                         (["--device", "tpu"], "--device")])
def test_bad_settings_stop_at_start_naming_the_option(bad, option, capsys, monkeypatch):
    monkeypatch.setattr("eval_finetune.open_encoder", lambda *a, **k: pytest.fail("read a checkpoint"))
    with pytest.raises(SystemExit) as stop:  # argparse's exit: no exception escapes, no traceback
        main(["--ckpt", "random", "--dataset", "synthetic", "--data_root", "/nonexistent", *bad])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and option in err and ("e.g." in err or "must be 1, 2 or 3" in err)


def run(ckpt, data, out, *extra):
    """4 clips per step, 4 steps per epoch on the 16 tiny videos; 2 x 1 test views of the 8 val videos."""
    return main(["--ckpt", str(ckpt), "--dataset", "synthetic", "--data_root", str(data), "--out", str(out),
                 "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "4", "--workers", "0", *extra])


@pytest.fixture(scope="module")
def our_ckpt(tmp_path_factory):
    """A checkpoint in train.py's format (not trained: this checks the plumbing, not the gain)."""
    torch.manual_seed(0)
    sigma = build_model("tiny", num_prototypes=64)
    path = tmp_path_factory.mktemp("pre") / "ckpt.pth"
    torch.save({"model": sigma.state_dict(), "model_config": asdict(sigma.cfg), "epoch": 1, "step": 1}, path)
    return path


def test_end_to_end_and_resume_equals_uninterrupted(tiny_synthetic, our_ckpt, tmp_path):
    full = run(our_ckpt, tiny_synthetic, tmp_path / "full")
    assert full["num_test"] == 8 and 0 <= full["top1"] <= 100 and full["num_classes"] == 4
    assert full["missing_keys"] == [] and sorted(full["unexpected_keys"]) == ["norm.bias", "norm.weight"]
    saved = json.loads((tmp_path / "full" / "results.json").read_text())
    assert saved["top1"] == full["top1"] and saved["config"]["lr_abs"] == pytest.approx(1e-2 * 4 / 256)
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 9))  # 2 epochs x 4 steps
    assert log[0]["lr"] == 0 and max(e["lr"] for e in log) == pytest.approx(1e-2 * 4 / 256)  # warmup, then cosine
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log)

    first = run(our_ckpt, tiny_synthetic, tmp_path / "resumed", "--max_epochs_this_run", "1")
    assert first == 0 and not (tmp_path / "resumed" / "results.json").exists()
    resumed = run(our_ckpt, tiny_synthetic, tmp_path / "resumed")
    a = torch.load(tmp_path / "full" / "ckpt.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pth", weights_only=True)
    assert a["step"] == b["step"] == 8
    # The lr each layer trained with at the last step (step index 7 of 8, 4 warmup steps): the schedule x
    # 0.75^(depth + 1 - layer), depth 6.
    rate = lr_at(7, 8, 4, 1e-2 * 4 / 256, 1e-6 * 4 / 256)
    for g in a["optimizer"]["param_groups"]:
        assert g["lr"] == pytest.approx(rate * 0.75 ** (6 + 1 - g["layer"]))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise
    assert resumed["top1"] == full["top1"] and resumed["top5"] == full["top5"]
    with pytest.raises(ValueError, match="other settings"):
        run(our_ckpt, tiny_synthetic, tmp_path / "resumed", "--seed", "1")


def test_random_init_runs_and_weights_move(tiny_synthetic, tmp_path):
    out = run("random", tiny_synthetic, tmp_path / "random", "--arch", "tiny", "--epochs", "1", "--warmup_epochs", "0")
    assert out["missing_keys"] == [] and out["unexpected_keys"] == [] and out["ckpt"] == "random"
    sd = torch.load(tmp_path / "random" / "ckpt.pth", weights_only=True)["model"]
    assert sd["head.weight"].std() > 10 * 0.02 * 0.001  # trained far from its init (std 2e-5)


def test_bench_counts_flops_and_memory(capsys):
    assert main(["--bench", "--arch", "tiny", "--dataset", "synthetic", "--micro_batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP per training clip" in out and "estimated memory per GPU at --micro_batch 2" in out
    assert "ms CPU per 8x256x340 clip" in out


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflow():
    """--precision fp16 (what auto picks on GPUs without bf16, forced here on CPU): the loss is scaled before
    backward, the logged gradient norm is the unscaled one, and a step whose scaled fp16 gradients overflow leaves
    the weights alone and halves the scale (unscaled fp16 gradients below 6e-8 would flush to zero instead)."""
    precision, autocast, scaler = choose_precision(SimpleNamespace(precision="fp16"), torch.device("cpu"))
    assert precision == "fp16" and scaler.is_enabled()
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 3)
    run = SimpleNamespace(model=net, raw_model=net, scaler=scaler, accum=1,
                          optimizer=torch.optim.AdamW([dict(params=list(net.parameters()), lr_scale=1.0)]))
    targets = F.one_hot(torch.arange(8) % 3, 3).float()
    big = 1e3 * torch.randn(8, 16)  # x 65536 (the initial scale): weight gradients far past fp16's 65504
    before = net.weight.detach().clone()
    loss, _ = train_step(run, [(big, targets)], 1e-2, autocast)
    assert math.isfinite(loss.item()) and torch.equal(net.weight, before) and scaler.get_scale() == 2.0 ** 15
    small = torch.randn(8, 16)
    true = torch.func.grad(lambda w, b: F.cross_entropy(small @ w.T + b, targets), argnums=(0, 1))(
        net.weight.detach(), net.bias.detach())
    loss, grad_norm = train_step(run, [(small, targets)], 1e-2, autocast)
    true_norm = torch.cat([g.flatten() for g in true]).norm().item()
    assert grad_norm.item() == pytest.approx(true_norm, rel=0.02)  # the true gradient's norm, not x 32768
    assert not torch.equal(net.weight, before)  # this step was taken


# ============ host syncs, the NaN stop ============


def test_training_reads_the_loss_from_the_device_once_per_log_interval(tiny_synthetic, tmp_path, monkeypatch):
    """Each read of a device value (.item(), float(), .tolist()) makes the host wait until the GPU has finished,
    so that no further step is queued meanwhile: one read per step (loss, then gradient norm) costs a stall per
    step. The training loop reads only in StepLog.flush (monitor.py): 4 steps at --log_every 2 -> 2 reads."""
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        def counted(self, *args, _real=getattr(torch.Tensor, name)):
            caller = sys._getframe(1).f_code
            if os.path.basename(caller.co_filename) in ("eval_finetune.py", "augment.py", "monitor.py"):
                reads.append(caller.co_name)
            return _real(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    # No augmentation drawn (augment.py's RandAugment / erasing draw on the host, not from the GPU).
    out = run("random", tiny_synthetic, tmp_path / "reads", "--arch", "tiny", "--epochs", "1", "--warmup_epochs",
              "0", "--log_every", "2", "--randaug", "0", "0", "0", "--reprob", "0")
    assert reads == ["flush", "flush"]
    log = [json.loads(line) for line in (tmp_path / "reads" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4] and all(math.isfinite(e["loss"]) for e in log)
    assert out["num_test"] == 8


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_synthetic, tmp_path, monkeypatch,
                                                                       capsys):
    """The loss is read every --log_every steps, so the weights may go on changing for a few steps after a
    non-finite loss: the run must still report the first bad step and stop before writing another checkpoint."""
    forward, calls = Classifier.forward, []

    def nan_from_step_6(self, videos):
        calls.append(1)
        logits = forward(self, videos)
        return logits * float("nan") if len(calls) >= 6 else logits

    monkeypatch.setattr(Classifier, "forward", nan_from_step_6)
    out = tmp_path / "nan"
    assert run("random", tiny_synthetic, out, "--arch", "tiny") == 1  # 4 steps per epoch, read at steps 4 and 8
    assert "loss is nan at step 6 (epoch 1); stopping. The last good checkpoint is " + str(out / "ckpt.pth") in \
        capsys.readouterr().err
    ckpt = torch.load(out / "ckpt.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6] and math.isnan(log[-1]["loss"])

# ============ under torchrun: ranks that read different files ============


def torchrun_args(out, data, *extra):
    """eval_finetune.py on 2 ranks: 4 clips per rank and step, 2 steps per epoch on the 16 tiny videos."""
    return [launch.ROOT / "eval_finetune.py", "--ckpt", "random", "--arch", "tiny", "--dataset", "synthetic",
            "--data_root", data, "--out", out, "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "8",
            "--workers", "0", *extra]


@pytest.mark.rehearsal  # torchrun on 2 ranks: `python -m pytest -q -m rehearsal` (CI runs it)
def test_ranks_that_see_different_checkpoints_stop_instead_of_hanging(tiny_synthetic, tmp_path):
    # Each rank gets its own --out (<out>/<RANK>), as nodes with node-local disks would: after one epoch only rank
    # 0's folder holds a checkpoint. Resuming, rank 0 would train from epoch 1 and rank 1 from epoch 0, with
    # other optimizer states, until their collectives no longer pair up; instead both stop before any step.
    args = torchrun_args(tmp_path / "out" / "{RANK}", tiny_synthetic)
    r = launch.run([*args, "--max_epochs_this_run", "1"], timeout=240, log_dir=tmp_path)
    assert r.code == 0 and r.first_mismatch() is None, r.tail()
    assert (tmp_path / "out" / "0" / "ckpt.pth").exists() and not (tmp_path / "out" / "1" / "ckpt.pth").exists()
    r = launch.run(args, timeout=240, log_dir=tmp_path)
    assert r.code != 0, r.tail()
    assert ("ranks disagree on the checkpoint to resume from" in r.err and "every node sees" in r.err
            and f"rank 0 sees epoch 1, step 2 in {tmp_path / 'out' / '0' / 'ckpt.pth'}" in r.err
            and f"rank 1 sees no {tmp_path / 'out' / '1' / 'ckpt.pth'}" in r.err), r.tail()


@pytest.mark.rehearsal  # torchrun on 2 ranks: `python -m pytest -q -m rehearsal` (CI runs it)
def test_ranks_that_see_different_videos_stop_with_one_message(tiny_synthetic, tmp_path):
    # Node-local copies of the dataset (<root>/<RANK>); rank 1's copy lacks one training video. Both ranks would
    # otherwise train, each on its own list (the sampler's index i meaning different clips on the two ranks).
    for rank in (0, 1):
        shutil.copytree(tiny_synthetic, tmp_path / "data" / str(rank), copy_function=launch.link_or_copy)
    next((tmp_path / "data" / "1" / "train").rglob("*.mp4")).unlink()
    r = launch.run(torchrun_args(tmp_path / "out", tmp_path / "data" / "{RANK}"), timeout=240, log_dir=tmp_path)
    assert r.code != 0, r.tail()
    assert ("ranks disagree on the train videos: " in r.err and "rank 1 sees 15 videos" in r.err
            and "rank 0 sees 16 videos" in r.err and "Give every node the same dataset" in r.err), r.tail()
    assert not (tmp_path / "out" / "ckpt.pth").exists()


EVALUATE_ONE_VIDEO = """
import contextlib, os, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from eval_finetune import evaluate
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 4 * 4, 5))  # the same on both ranks
videos = [(torch.randint(0, 256, (3, 2, 4, 4), dtype=torch.uint8), 3)]  # one test video (3, T, H, W)
alone = evaluate(model, videos, 4, 0, torch.device("cpu"), contextlib.nullcontext)
shared = evaluate(model, videos, 4, 0, torch.device("cpu"), contextlib.nullcontext, dist.get_rank(), 2)
# One write of the whole line: the ranks share one pipe, and print() writes the text and its newline separately
# when stdout is unbuffered (PYTHONUNBUFFERED), so two ranks' lines could interleave. A pipe write this short is atomic.
os.write(1, f"rank {{dist.get_rank()}}: alone {{alone}}, shared {{shared}}\\n".encode())
dist.destroy_process_group()
"""


@pytest.mark.rehearsal  # torchrun on 2 ranks: `python -m pytest -q -m rehearsal` (CI runs it)
def test_fewer_test_videos_than_ranks_give_the_one_process_result(tmp_path):
    # Rank r tests videos r, r + 2, ...: with one video rank 1 has none, and must add nothing instead of failing
    # on an empty concatenation while rank 0 waits for its share.
    script = tmp_path / "evaluate_one_video.py"
    script.write_text(EVALUATE_ONE_VIDEO.format(root=str(launch.ROOT)))
    r = launch.run([script], timeout=120, log_dir=tmp_path)
    assert r.code == 0 and r.first_mismatch() is None, r.tail()
    lines = sorted(line for line in r.out.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, r.tail()
    for line in lines:
        alone, shared = line.split(": alone ")[1].split(", shared ")
        assert alone == shared and "'num_test': 1" in shared, line

# ============ the command line: help, accumulation, datasets by train.py's names, user errors ============

from test_eval_linear import help_problems  # noqa: E402

# Options whose None is their genuine meaning: none here; each would be listed with the words saying what it means.
NONE_MEANS = {}


def test_help_explains_every_option_and_shows_no_none_default():
    parser = eval_finetune.build_parser()
    assert help_problems(parser, NONE_MEANS) == []
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text
    # The recipe's values, written out per dataset (and where --recipe paper changes them).
    for shown in ("default: 16 (fashion, synthetic), 32 (k400, ssv2, list)", "4 (k400, ssv2, list)",
                  "40 (ssv2); --recipe paper: 75 (k400), 50 (ssv2)", "default: on (fashion, synthetic, k400"):
        assert shown in text, shown


NO_RANDOMNESS_HERE = ["--randaug", "0", "0", "0", "--crop_scale", "1", "1", "--crop_ratio", "1", "1", "--no-flip",
                      "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--drop_path", "0", "--stride", "3"]


def test_accumulated_micro_batches_step_as_one_batch(tiny_synthetic, tmp_path):
    """--batch_size 16 as 4 micro-batches of 4 (accumulation) or one of 16: the same step. Without the random
    augmentation (as in the 4-rank rehearsal) the gradient is the mean over the same 16 clips either way (LayerNorm
    only, no batch statistics), summed in another order: the weights agree to far less than a step (AdamW's first
    step moves each weight by lr_abs = 6.25e-4; a loss not divided by the accumulation count would still move
    them alike, but logs a 4x loss)."""
    outs = {}
    for micro in (4, 16):
        outs[micro] = run("random", tiny_synthetic, tmp_path / str(micro), "--arch", "tiny", "--epochs", "1",
                          "--warmup_epochs", "0", "--batch_size", "16", "--micro_batch", str(micro),
                          *NO_RANDOMNESS_HERE)
    assert outs[4]["config"]["accum"] == 4 and outs[16]["config"]["accum"] == 1
    assert outs[4]["config"]["lr_abs"] == outs[16]["config"]["lr_abs"] == pytest.approx(1e-2 * 16 / 256)
    (a,), (b,) = ([json.loads(line) for line in (tmp_path / str(m) / "log.jsonl").read_text().splitlines()]
                  for m in (4, 16))
    assert a["step"] == b["step"] == 1
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa, wb = (torch.load(tmp_path / str(m) / "ckpt.pth", weights_only=True)["model"] for m in (4, 16))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


def test_fashion_is_read_by_its_train_py_name_from_the_generated_root(tmp_path, monkeypatch):
    # Without --data_root the set comes from synthetic.fashion_dataset() (here: a small one), as in train.py.
    import data
    from synthetic import fashion_dataset
    small = fashion_dataset(tmp_path / "fashion", num_train=8, num_val=4, num_vos=2)
    monkeypatch.setattr(data, "fashion_dataset", lambda root=None: small)
    args = get_args(["--ckpt", "random", "--dataset", "fashion"])
    assert (args.epochs, args.batch_size, args.lr, args.test_clips) == (5, 16, 1e-2, 2)  # the built-in recipe
    out = main(["--ckpt", "random", "--dataset", "fashion", "--out", str(tmp_path / "out"), "--epochs", "1",
                "--warmup_epochs", "0", "--batch_size", "4", "--workers", "0"])
    assert (out["dataset"], out["num_train"], out["num_test"], out["num_classes"]) == ("fashion", 8, 4, 4)


@pytest.mark.parametrize("extra, words", [
    (["--ckpt", "random", "--img_size", "60"], "img_size 60 is not a multiple of patch_size 8"),
    (["--ckpt", "{not_ours}"], "is not one of our checkpoints: pass its arch"),
    (["--ckpt", "{corrupt}"], "truncated or corrupt"),
    (["--bench", "--arch", "tiny", "--num_frames", "7"], "num_frames 7 is not a multiple of tubelet_size"),
])
def test_user_errors_reach_the_command_line_as_a_message(extra, words, tiny_synthetic, tmp_path):
    """A model setting the model refuses, a checkpoint that is not an encoder or cannot be read: exit 2 with the
    message naming the option, no traceback."""
    torch.save({"weights": torch.zeros(2)}, tmp_path / "not_ours.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    extra = [e.format(not_ours=tmp_path / "not_ours.pth", corrupt=tmp_path / "corrupt.pth") for e in extra]
    cmd = [sys.executable, "eval_finetune.py", *extra, "--dataset", "synthetic", "--data_root", str(tiny_synthetic),
           "--out", str(tmp_path / "out"), "--device", "cpu", "--workers", "0"]
    done = subprocess.run(cmd, cwd=launch.ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("eval_finetune.py: error: --") and words in done.stderr, done.stderr
