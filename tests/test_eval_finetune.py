"""eval_finetune.py: drop path (0 = bit-identical, > 0 only in train mode, expectation kept); layer-wise lr
decay and weight-decay groups against the released formula; MixUp / CutMix targets against the timm formula
(rows sum to 1, with smoothing); RandAugment draws once per clip; the released head init; bad settings fail at
start naming the option; end to end on tiny synthetic videos; a resumed run equals an uninterrupted one bitwise."""
import json
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from eval_finetune import (Classifier, RandAugmentClips, build_mixer, finetune_param_groups, get_args, main,
                           mix_batch)
from model import Block, Encoder, build_config, build_model, drop_path
from train import lr_at


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


class _Clips(torch.utils.data.Dataset):
    num_classes = 2

    def __init__(self, clip):
        self.clip = clip

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.clip, 0


def test_randaugment_draws_once_per_clip():
    g = torch.Generator().manual_seed(0)
    frame = torch.randint(0, 256, (3, 1, 32, 32), generator=g, dtype=torch.uint8)
    clip = frame.expand(-1, 6, -1, -1)  # (3, T, S, S) uint8, as data.py's clips: six identical frames
    assert torch.equal(RandAugmentClips(_Clips(clip), 0, 9, 0.5)[0][0], clip)  # no op: exact
    aug = RandAugmentClips(_Clips(clip), 2, 9, 0.5)
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = aug[0][0]
        assert out.shape == clip.shape
        assert torch.equal(out, out[:, :1].expand_as(out))  # every frame got the same ops and magnitude
        changed += not torch.allclose(out, clip, atol=1e-5)
    assert changed >= 4

# ============ command line, end to end, resume ============


@pytest.mark.parametrize("bad, option", [(["--drop_path", "1.5"], "--drop_path"),
                                         (["--layer_decay", "0"], "--layer_decay"),
                                         (["--warmup_epochs", "200"], "--warmup_epochs"),
                                         (["--randaug", "2", "12", "0.5"], "--randaug"),
                                         (["--batch_size", "3", "--repeats", "2"], "--batch_size")])
def test_bad_settings_fail_at_start_naming_the_option(bad, option, capsys):
    with pytest.raises(SystemExit):
        get_args(["--ckpt", "random", "--dataset", "synthetic", *bad])
    assert option in capsys.readouterr().err


def run(ckpt, data, out, *extra):
    """4 clips per step, 4 steps per epoch on the 16 tiny videos; 2 x 1 test views of the 8 val videos."""
    return main(["--ckpt", str(ckpt), "--dataset", "synthetic", "--data_root", str(data), "--out", str(out),
                 "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "4", "--num_workers", "0", *extra])


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
    assert main(["--bench", "--arch", "tiny", "--dataset", "synthetic", "--batch_size", "2"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP per training clip" in out and "estimated memory per GPU at --batch_size 2" in out
