"""train.py end to end on tiny data: a run writes a checkpoint and a log; 2 gloo processes stay
in sync; a resumed run equals an uninterrupted one; gradient accumulation equals a big batch;
a NaN loss and a collapse stop cleanly; bad options fail before anything is read; bf16 and fp16 steps
and an fp16 resume from bf16; ranks that see different checkpoints stop; a stuck loader worker stops;
unreadable videos are listed; DDP, torch.compile and the memory estimate."""
import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
import launch
import monitor
import train
from model import SIGMA, config_from_dict, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(data, out, *extra):
    """A fast config: tiny model, 8 clips per step, 2 steps per epoch on the 16-video set.
    `extra` flags ("--name", "value" pairs or lone switches) replace the defaults."""
    flags = {"--dataset": "synthetic", "--data_root": str(data), "--out": str(out), "--batch_size": "8", "--micro_batch": "8",
             "--epochs": "2", "--warmup_epochs": "1", "--num_prototypes": "32", "--workers": "0", "--seed": "0"}
    extra, switches = list(extra), []
    while extra:
        name = extra.pop(0)
        if extra and not extra[0].startswith("--"):
            flags[name] = extra.pop(0)
        else:
            switches.append(name)
    return [x for kv in flags.items() for x in kv] + switches


def weights(out):
    return load_checkpoint(os.path.join(out, "ckpt.pth"))["model"]


def test_run_writes_checkpoint_and_log(tiny_synthetic, tmp_path, capsys):
    assert train.main(tiny_args(tiny_synthetic, tmp_path)) == 0
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pth"))
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4 and ckpt["config"]["batch_size"] == 8
    # The saved weights are the unwrapped model in the released layout: they load strictly.
    SIGMA(config_from_dict(ckpt["model_config"])).load_state_dict(ckpt["model"], strict=True)
    lines = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    for key in ("loss", "loss_phi", "loss_psi", "lr", "grad_norm", "protos_used", "assign_entropy",
                "clips_per_s", "data_wait", "peak_mem_gb"):
        assert all(key in l for l in lines), key
    assert lines[0]["lr"] == 0.0 and lines[-1]["lr"] < lines[2]["lr"]  # warmup from 0, then cosine
    out = capsys.readouterr().out
    assert "done: epoch 2/2" in out and "python eval_linear.py --ckpt" in out
    # Running the same command again finds the finished run and does nothing.
    assert train.main(tiny_args(tiny_synthetic, tmp_path)) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_resume_equals_uninterrupted(tiny_synthetic, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert train.main(tiny_args(tiny_synthetic, full, "--workers", "1")) == 0
    # Interrupted after epoch 1 (as a time-limited job would be), then the same command again.
    assert train.main(tiny_args(tiny_synthetic, split, "--workers", "1", "--max_epochs_this_run", "1")) == 0
    assert load_checkpoint(str(split / "ckpt.pth"))["epoch"] == 1
    assert train.main(tiny_args(tiny_synthetic, split, "--workers", "1")) == 0
    a, b = weights(full), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(tiny_synthetic, tmp_path, capsys):
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--max_epochs_this_run", "1")) == 0
    # An allow-list: anything not listed as harmless is refused, among them the settings a deny-list forgets
    # (lr, eps, tau, soft codes, mask ratio, stride, and micro_batch, which sets Sinkhorn's batch).
    for changed in (["--num_prototypes", "16"], ["--lr", "1e-3"], ["--sk_eps", "0.03"], ["--temperature", "0.2"],
                    ["--soft_codes"], ["--mask_ratio", "0.75"], ["--stride", "1"], ["--micro_batch", "4"]):
        with pytest.raises(ValueError, match="other settings"):
            train.main(tiny_args(tiny_synthetic, tmp_path, *changed))
    # What may change between restarts does not block the resume.
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--workers", "1", "--log_every", "1")) == 0
    assert "done: epoch 2/2" in capsys.readouterr().out


def step_gradients(monkeypatch):
    """Records every parameter's gradient at each AdamW step of train.py (the accumulated one)."""
    seen, step = [], torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    return seen


def test_gradient_accumulation_equals_big_batch(tiny_synthetic, tmp_path, monkeypatch):
    # With the pixel loss the target of a clip does not depend on the rest of its batch, so two micro-batches of
    # 4 must give the gradient of one batch of 8 (same clips, same masks). The gradients are compared, not the
    # weights after AdamW, which hardly react to a gradient's scale (a missing / accum would pass that check).
    common = ["--loss", "pixel", "--epochs", "1", "--warmup_epochs", "0"]
    seen = step_gradients(monkeypatch)
    assert train.main(tiny_args(tiny_synthetic, tmp_path / "big", *common)) == 0
    big = seen[:]
    seen.clear()
    assert train.main(tiny_args(tiny_synthetic, tmp_path / "acc", *common, "--micro_batch", "4")) == 0
    acc = seen
    assert load_checkpoint(str(tmp_path / "acc" / "ckpt.pth"))["config"]["accum"] == 2
    assert len(big) == len(acc) == 2 and len(big[0]) == len(acc[0]) > 0
    for a, b in zip(big[0], acc[0]):  # the first step: the same initial weights, so the gradients must agree
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()


def test_the_model_is_trained_on_masks_that_hide_mask_ratio_of_each_slice(tiny_synthetic, tmp_path, monkeypatch):
    # The loop draws the masks (True = hidden from the encoder, predicted): 90% of the 8 x 8 positions of every
    # tube slice, int(0.9 * 64) = 57, the same positions in every slice of a clip (tube masking), different clips.
    seen, forward = [], SIGMA.forward

    def spy(self, videos, mask, **kwargs):
        seen.append((mask.clone(), kwargs.get("n_masked")))
        return forward(self, videos, mask, **kwargs)
    monkeypatch.setattr(SIGMA, "forward", spy)
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--epochs", "1", "--warmup_epochs", "0")) == 0
    assert len(seen) == 2
    for mask, n_masked in seen:
        slices = mask.view(len(mask), 4, 64)  # (B, t, h*w) on the tiny grid (4, 8, 8)
        assert (slices.sum(-1) == 57).all() and n_masked == 4 * 57
        assert (slices == slices[:, :1]).all()  # a tube: one spatial mask for all slices
        assert len({tuple(m.tolist()) for m in slices[:, 0]}) > 1  # not one mask for the whole batch


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_synthetic, tmp_path, monkeypatch, capsys):
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--max_epochs_this_run", "1")) == 0
    before = weights(tmp_path)
    forward = SIGMA.forward
    def nan_forward(self, videos, mask, **kwargs):
        out = forward(self, videos, mask, **kwargs)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(SIGMA, "forward", nan_forward)
    assert train.main(tiny_args(tiny_synthetic, tmp_path)) == 1
    assert "loss is nan" in capsys.readouterr().err
    after = load_checkpoint(str(tmp_path / "ckpt.pth"))
    assert after["epoch"] == 1 and all(torch.equal(before[k], after["model"][k]) for k in before)


@pytest.mark.parametrize("extra,message", [
    (["--micro_batch", "3"], "not a multiple"),
    (["--mask_ratio", "1.0"], "--mask_ratio"),
    (["--mask_ratio", "0.01"], "--mask_ratio"),  # masks 0 of the 64 positions of the tiny grid
    (["--sk_eps", "0"], "--sk_eps"),
    (["--temperature", "-0.1"], "--temperature"),
    (["--sk_iters", "0"], "--sk_iters"),
    (["--num_prototypes", "1"], "--num_prototypes"),
    (["--epochs", "0"], "--epochs"),
    (["--warmup_epochs", "2"], "--warmup_epochs"),  # as long as the run: the lr never peaks
    (["--lr", "0"], "--lr"),
    (["--min_lr", "1"], "--min_lr"),
    (["--repeats", "3"], "--repeats"),
    (["--workers", "-1"], "--workers"),
    (["--betas", "0.9", "1.0"], "--betas"),
    (["--dataset", "kinetics"], "--dataset"),
    (["--loss", "l1"], "--loss"),
    (["--loss", "l2", "--soft_codes"], "--soft_codes"),
    (["--dino_weights", "dino.pth"], "--dino_weights"),
    (["--log_every", "0"], "--log_every"),
    (["--num_frames", "7"], "multiple of tubelet_size"),
    (["--arch", "vit_h"], "unknown arch"),
    (["--precision", "fp8"], "--precision"),
    (["--clip_loss", "0.5"], "--repeats 2"),  # the clip-level term needs two views of each video
    (["--clip_loss", "-1", "--repeats", "2"], "clip_loss"),
    (["--color_jitter", "-0.1"], "--color_jitter"),
    (["--decoder_depth", "-1"], "dec_depth"),
    (["--decoder_depth", "0", "--predict_share", "0"], "predict_share"),
])
def test_bad_configuration_fails_before_training(tmp_path, extra, message):
    # The data root does not exist: an option that is not caught at start would fail on it instead.
    with pytest.raises(ValueError, match=message) as err:
        train.main(tiny_args(tmp_path / "no_data", tmp_path / "out", *extra))
    assert "e.g." in str(err.value) or "use --" in str(err.value) or "choose" in str(err.value) \
        or "drop" in str(err.value)  # a valid value is named
    assert not (tmp_path / "out").exists()


def test_bad_option_from_the_command_line_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--precision", "fp8", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode != 0 and "--precision" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--img_size", "60"], "img_size 60 is not a multiple of patch_size 8"),  # only the model's own check sees it
    (["--target", "dino", "--dino_weights", "/no/such/dino.pth"], "does not exist"),
])
def test_options_rejected_by_the_model_config_stop_without_a_traceback(tmp_path, flags, message):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--arch", "tiny", *flags, "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_corrupt_checkpoint_in_out_stops_with_the_choices_and_no_traceback(tiny_synthetic, tmp_path):
    (tmp_path / "ckpt.pth").write_bytes(b"PK\x03\x04 cut short by a full disk")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *tiny_args(tiny_synthetic, tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "truncated or corrupt" in done.stderr and "Move it away" in done.stderr
    assert (tmp_path / "ckpt.pth").read_bytes().startswith(b"PK")  # nothing was overwritten


def test_dry_run_prints_the_plan_and_trains_nothing(tiny_synthetic, tmp_path, capsys):
    args = tiny_args(tiny_synthetic, tmp_path / "out", "--micro_batch", "4", "--epochs", "3", "--dry_run")
    assert train.main(args) == 0
    out = capsys.readouterr().out
    # 16 videos, 8 clips per step from 1 rank x 4 clips x 2 accumulation steps: 2 steps per epoch, 6 in 3 epochs.
    assert "batch: 1 ranks x 4 clips x 2 accumulation = 8 clips per step" in out
    assert "data: 16 videos -> 2 steps per epoch, 6 steps in 3 epochs" in out
    assert "memory per rank for 4 clips per forward" in out and "note: 2 accumulation steps" in out
    assert not (tmp_path / "out").exists()


def test_missing_data_root_fails_clearly(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="does not exist"):
        train.main(["--dataset", "k400", "--arch", "tiny", "--data_root", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "out"), "--micro_batch", "8", "--batch_size", "8"])


@pytest.mark.rehearsal  # torchrun on 2 ranks: `python -m pytest -q -m rehearsal` (CI runs it)
def test_torchrun_two_processes_stay_in_sync(tiny_synthetic, tmp_path):
    # Compiled (aot_eager) under DDP, as GPU runs use it: Sinkhorn's all-reduces inside the compiled forward.
    code, out, err = run_torchrun([os.path.join(ROOT, "train.py"), *tiny_args(
        tiny_synthetic, tmp_path, "--epochs", "1", "--warmup_epochs", "0", "--micro_batch", "4", "--compile",
        "aot_eager")], timeout=300)
    assert code == 0, err[-3000:]
    assert "weights identical on all 2 ranks" in out
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pth"))
    # 8 clips per step = 2 ranks x 4: each rank sees half of the 16 videos -> 2 steps in the epoch.
    assert ckpt["config"]["world_size"] == 2 and ckpt["config"]["accum"] == 1 and ckpt["step"] == 2


# ------------------------------------------------------------------ precision: full optimizer steps on CPU

def test_bf16_and_fp16_steps_and_fp16_resumes_from_bf16(tiny_synthetic, tmp_path):
    # A full optimizer step under bf16 autocast, then the same run continued under fp16 + GradScaler from the
    # bf16 checkpoint, whose scaler state is empty (CPU autocast supports fp16 and GradScaler in torch 2.x).
    common = ("--epochs", "2", "--warmup_epochs", "0", "--log_every", "1")
    train.main(tiny_args(tiny_synthetic, tmp_path, *common, "--precision", "bf16",
                         "--max_epochs_this_run", "1"))
    bf16 = load_checkpoint(str(tmp_path / "ckpt.pth"))
    assert bf16["config"]["precision"] == "bf16" and bf16["scaler"] == {}
    assert train.main(tiny_args(tiny_synthetic, tmp_path, *common, "--precision", "fp16")) == 0
    fp16 = load_checkpoint(str(tmp_path / "ckpt.pth"))
    assert fp16["epoch"] == 2 and fp16["config"]["precision"] == "fp16" and fp16["scaler"]["scale"] > 0
    lines = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [l["step"] for l in lines] == [1, 2, 3, 4] and all(l["loss"] == l["loss"] for l in lines)  # finite
    # Both precisions moved the weights (fp16 steps with an overflowing scale would be skipped by the scaler,
    # but at least one of the two is taken after the scale backs off).
    torch.manual_seed(0)  # train.py's initial weights for --seed 0
    fresh = SIGMA(config_from_dict(bf16["model_config"])).state_dict()
    assert any(not torch.equal(fresh[k], bf16["model"][k]) for k in fresh)
    assert any(not torch.equal(bf16["model"][k], fp16["model"][k]) for k in fresh)
    assert all(torch.isfinite(v).all() for v in fp16["model"].values())


# -------------------------------------------------------------------- a run that cannot silently go wrong

def test_collapse_alarm_stops_sigma_and_keeps_checkpoint(tiny_synthetic, tmp_path, monkeypatch, capsys):
    forward = SIGMA.forward
    def collapsed(self, videos, mask, **kwargs):  # what a collapsed phi looks like to the monitor
        out = forward(self, videos, mask, **kwargs)
        return {**out, "protos_used": torch.ones((), dtype=torch.long)}
    monkeypatch.setattr(SIGMA, "forward", collapsed)
    # 3 collapsed steps in a row stop the run: epoch 1 (steps 1-2) ends with a checkpoint, step 3 stops.
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--collapse_patience", "3", "--save_every", "1",
                                "--log_every", "1")) == 1
    err = capsys.readouterr().err
    assert "collapse: for 3 steps up to step 3" in err and "--lr" in err and str(tmp_path / "ckpt.pth") in err
    assert load_checkpoint(str(tmp_path / "ckpt.pth"))["epoch"] == 1


def test_l2_ablation_collapses_by_design_and_runs_to_the_end(tiny_synthetic, tmp_path, monkeypatch, capsys):
    forward = SIGMA.forward
    def constant_phi(self, videos, mask, **kwargs):
        return {**forward(self, videos, mask, **kwargs), "target_std": torch.zeros(())}
    monkeypatch.setattr(SIGMA, "forward", constant_phi)
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--loss", "l2", "--collapse_patience", "1",
                                "--epochs", "1", "--warmup_epochs", "0")) == 0
    captured = capsys.readouterr()
    assert "as expected for --loss l2" in captured.err and "done: epoch 1/1" in captured.out


class SlowVideos(torch.utils.data.Dataset):
    """A dataset whose every read hangs (as FFmpeg can on a pathological file)."""
    def __init__(self, dataset):
        self.dataset, self.bad_list = dataset, None
    def __len__(self):
        return len(self.dataset)
    def __getitem__(self, i):
        import time
        time.sleep(60)
        return self.dataset[i]


def test_stuck_loader_worker_stops_with_a_message(tiny_synthetic, tmp_path, monkeypatch):
    build = train.build_video_dataset
    monkeypatch.setattr(train, "build_video_dataset", lambda *a, **k: SlowVideos(build(*a, **k)))
    with pytest.raises(RuntimeError, match=r"rank 0: no batch .* for 2 s \(--loader_timeout\)"):
        train.main(tiny_args(tiny_synthetic, tmp_path, "--workers", "1", "--loader_timeout", "2"))


def test_unreadable_videos_are_listed_in_the_summary(tiny_synthetic, tmp_path, capsys):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data)
    broken = sorted((data / "train").rglob("*.mp4"))[0]
    broken.write_bytes(b"not a video")
    assert train.main(tiny_args(data, tmp_path / "out", "--epochs", "1", "--warmup_epochs", "0")) == 0
    listed = (tmp_path / "out" / "bad_videos.txt").read_text().split()
    assert set(listed) == {str(broken)}
    assert f"unreadable videos skipped: 1, listed in {tmp_path / 'out' / 'bad_videos.txt'}" in capsys.readouterr().out


def run_torchrun(args, timeout):
    """torchrun with 2 CPU processes (tests/launch.py: the ranks are killed too if it runs past `timeout`, so a
    hang fails the test instead of blocking CI). -> (exit code, stdout, stderr)."""
    r = launch.run(args, nproc=2, timeout=timeout)
    return r.code, r.out, r.err


def test_ranks_that_see_different_checkpoints_stop_instead_of_hanging(tiny_synthetic, tmp_path):
    # Each rank gets its own --out (<out>/<RANK>), as two nodes with node-local disks would: after one epoch
    # only rank 0's folder holds a checkpoint. The restart must stop with a message on both ranks.
    wrapper = tmp_path / "per_rank_out.py"
    wrapper.write_text("import os, runpy, sys\n"
                       "i = sys.argv.index('--out') + 1\n"
                       "sys.argv[i] = os.path.join(sys.argv[i], os.environ['RANK'])\n"
                       f"sys.path.insert(0, {ROOT!r})\n"
                       f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')\n")
    args = [str(wrapper), *tiny_args(tiny_synthetic, tmp_path / "out", "--micro_batch", "4")]
    code, _, err = run_torchrun([*args, "--max_epochs_this_run", "1"], timeout=240)
    assert code == 0, err[-3000:]
    assert (tmp_path / "out" / "0" / "ckpt.pth").exists() and not (tmp_path / "out" / "1" / "ckpt.pth").exists()
    code, _, err = run_torchrun(args, timeout=240)
    assert code != 0 and "rank 1 would resume from epoch 0, step 0" in err and "every node sees" in err, err[-3000:]


# ------------------------------------------------------------------------------------------- GPU-path speed

def test_ddp_does_not_resync_buffers_every_forward(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        args = train.get_args([])
        wrapped = train.wrap_model(SIGMA(config_from_dict(load_tiny_config())), args, 2, torch.device("cpu"))
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not wrapped.forward_sync_buffers
    finally:
        dist.destroy_process_group()


def load_tiny_config():
    from dataclasses import asdict
    from model import build_config
    return asdict(build_config("tiny", num_prototypes=32))


@pytest.mark.parametrize("loss", ["pixel", "sigma"])
def test_compiled_training_step_runs_on_cpu(tiny_synthetic, tmp_path, loss):
    # A whole run with the model under torch.compile (aot_eager: dynamo + AOTAutograd, the graph capture that
    # inductor uses, without generating C++). It must match the eager run closely; the SIGMA loss (Sinkhorn,
    # fixed-size gathers) is captured in one graph too (tests/test_model.py counts the breaks).
    args = ("--epochs", "1", "--warmup_epochs", "0", "--loss", loss)
    assert train.main(tiny_args(tiny_synthetic, tmp_path / "compiled", *args, "--compile", "aot_eager")) == 0
    assert train.main(tiny_args(tiny_synthetic, tmp_path / "eager", *args)) == 0
    a, b = weights(tmp_path / "compiled"), weights(tmp_path / "eager")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_memory_estimate_does_not_scale_weights_by_the_batch():
    # Under bf16 autocast the saved tensors include bf16 copies of the weights, which do not grow with the
    # batch. The estimate for 3 clips (extrapolated from 1 and 2) must equal what autograd saves for 3 clips.
    from model import build_model
    model = build_model("tiny", num_prototypes=32)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    _, saved, _ = bench.estimate_memory_gb(model, model.cfg, 3, autocast, 0.9)
    direct, _ = bench.saved_for_backward_bytes(model, model.cfg, 3, autocast, 0.9)
    one, _ = bench.saved_for_backward_bytes(model, model.cfg, 1, autocast, 0.9)
    assert abs(saved * 2 ** 30 - direct) < 1e-3 * direct
    assert 3 * one > 1.02 * direct  # the plain "one clip x batch" of before overcounts


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_follows_compute_capability(monkeypatch, capability, expected):
    # V100 (7.0) and T4 (7.5) emulate bf16 (torch.cuda.is_bf16_supported() still says True): fp16 + GradScaler
    # there, as released; bf16 from A100 (8.0) on. The evaluation scripts' autocast follows the same rule.
    import warnings
    from model import inference_autocast
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch warns that the autocast / scaler are disabled
        precision, _, _ = train.choose_precision(train.get_args(["--precision", "auto"]), torch.device("cuda"))
        assert precision == expected
        assert inference_autocast(torch.device("cuda")).fast_dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[expected]
    assert train.choose_precision(train.get_args([]), torch.device("cpu"))[0] == "fp32"


def test_accumulation_note_says_whether_the_released_batch_fits():
    # 8 GPUs with the K400 recipe's 40 clips per forward accumulate 2 steps: Sinkhorn then balances 320 clips, not
    # the released 640. The note names the option that restores it when the memory estimate fits the GPU.
    from model import build_model
    model = build_model("tiny", num_prototypes=32)
    args = train.get_args(["--dataset", "k400", "--arch", "tiny", "--batch_size", "640", "--micro_batch", "40"])
    note = bench.accumulation_note(model, model.cfg, args, 8, contextlib.nullcontext, memory_gib=80)
    assert "balances 320 clips" in note and "all 640" in note and "--micro_batch 80" in note
    note = bench.accumulation_note(model, model.cfg, args, 8, contextlib.nullcontext, memory_gib=0.1)
    assert "do not fit" in note and "16 GPUs" in note


def test_memory_estimate_runs_on_one_rank_alone_without_collectives_or_changes(monkeypatch):
    # Rank 0 alone prints the estimate: two forwards of the model whose Sinkhorn would all-reduce (~13 calls per
    # forward) with partners that never come, and whose prototypes are renormalised in place. Here the process
    # poses as one of 2 ranks; the estimate must issue no collective and leave every weight bit-identical.
    import torch.distributed as dist
    from model import build_model
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append("all_reduce"))
    torch.manual_seed(0)
    model = build_model("tiny", num_prototypes=32)
    with torch.no_grad():
        model.prototypes.mul_(3.0)  # off the unit sphere, as after an optimizer step: a forward renormalises them
    before = {k: v.clone() for k, v in model.state_dict().items()}
    static, saved, scores = bench.estimate_memory_gb(model, model.cfg, 4, contextlib.nullcontext, 0.9)
    assert calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert static > 0 and saved > 0 and scores > 0


def test_a_data_bound_run_says_so_with_the_remedies(tiny_synthetic, tmp_path, monkeypatch, capsys):
    # A loader that takes 0.3 s per video against a ~0.1 s step: waiting for data dominates the steps of the
    # window (here steps 1-3 instead of 20-100), and the run says so once, naming the store, --repeats, --workers.
    import time as clock
    build = train.build_video_dataset

    class SlowVideos(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset, self.samples = dataset, dataset.samples
        def __len__(self):
            return len(self.dataset)
        def __getitem__(self, i):
            clock.sleep(0.3)
            return self.dataset[i]
    monkeypatch.setattr(train, "build_video_dataset", lambda *a, **k: SlowVideos(build(*a, **k)))
    monkeypatch.setattr(monitor, "DATA_BOUND_STEPS", (1, 3))
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--micro_batch", "4", "--batch_size", "4",
                                "--epochs", "1", "--warmup_epochs", "0")) == 0
    err = capsys.readouterr().err
    assert err.count("data-bound: over steps 1-3") == 1, err
    assert "store.py --prepare" in err and "--repeats" in err and "--workers" in err


def test_a_failed_checkpoint_write_stops_the_run_at_the_next_log_interval(tiny_synthetic, tmp_path, monkeypatch,
                                                                          capsys):
    # The background write of epoch 1's checkpoint fails (a full disk). The run stops at step 3, the first log
    # interval after it -- not at the next save one epoch later, which on other ranks would meet an all-reduce.
    def full_disk(path, obj):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train, "save_checkpoint", full_disk)
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--epochs", "3", "--save_every", "1",
                                "--log_every", "1")) == 1
    assert "could not write the checkpoint" in capsys.readouterr().err
    assert [json.loads(l)["step"] for l in open(tmp_path / "log.jsonl")] == [1, 2]


def test_checkpoint_write_syncs_the_folder_and_a_run_removes_stale_temporaries(tiny_synthetic, tmp_path,
                                                                               monkeypatch):
    import stat
    synced, fsync = [], os.fsync
    def record(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return fsync(fd)
    monkeypatch.setattr(os, "fsync", record)
    train.save_checkpoint(str(tmp_path / "ckpt.pth"), {"w": torch.ones(3)})
    assert synced == ["file", "folder"]  # the data, then the rename itself
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pth.tmp.4242").write_bytes(b"half of a checkpoint from a killed write")
    assert train.main(tiny_args(tiny_synthetic, out, "--epochs", "1", "--warmup_epochs", "0")) == 0
    assert sorted(p.name for p in out.iterdir() if "ckpt" in p.name) == ["ckpt.pth"]


# ------------------------------------------------------------------ checkpoints written in the background

def test_background_checkpoint_is_a_bit_exact_snapshot_and_does_not_block(tmp_path, monkeypatch):
    import threading
    path = str(tmp_path / "ckpt.pth")
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    obj = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "config": {"a": [1, 2]}}
    expected = train.host_copy(obj)
    release, plain = threading.Event(), train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda p, o: release.wait(30) and plain(p, o))
    writer = train.CheckpointWriter()
    writer.save(path, obj)  # returns at once: the write waits for `release` in the background
    assert not os.path.exists(path)
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on, changing the weights in place
    optimizer.state_dict()["state"][0]["exp_avg"].zero_()
    release.set()
    writer.wait()
    loaded = load_checkpoint(path)  # the snapshot taken at save(), bit for bit
    assert loaded["epoch"] == 1 and loaded["config"] == {"a": [1, 2]}
    for k, v in expected["model"].items():
        assert loaded["model"][k].dtype == v.dtype and torch.equal(loaded["model"][k], v)
    for k, v in expected["optimizer"]["state"][0].items():
        assert torch.equal(loaded["optimizer"]["state"][0][k], v)
    assert not torch.equal(loaded["model"]["weight"], model.weight.detach())


def test_kill_during_background_checkpoint_leaves_the_previous_one(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    script = f"""
import time, torch, train
writer = train.CheckpointWriter()
writer.save({path!r}, {{"w": torch.arange(1000.)}})
writer.wait()
plain = torch.save
def slow(obj, f):
    plain(obj, f)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)  # killed here: the new checkpoint is complete in its temporary file, not yet renamed
torch.save = slow
writer.save({path!r}, {{"w": -torch.arange(1000.)}})
writer.wait()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(1000.))


def test_bench_reports_step_time_ceiling_share_and_bytes_copied(capsys):
    # tiny preset, 2 clips of 8 x 64 x 64: 2 x 3 x 8 x 64 x 64 uint8 values + the (2, 256) bool mask per step.
    assert train.main(["--bench", "--bench_steps", "1", "--num_prototypes", "32"]) == 0
    out = capsys.readouterr().out
    assert "process CPU time" in out and "fp32 matmul ceiling" in out
    assert f"host-to-device per step: {(2 * 3 * 8 * 64 * 64 + 2 * 256) / 2 ** 20:.1f} MiB" in out


def test_a_run_resumes_after_an_option_was_added_to_train_py(tiny_synthetic, tmp_path):
    # A checkpoint written before an option existed has no value for it: the option counts as left at its default
    # (what that run did), not as a changed setting. Here the checkpoint's config loses two default-off options.
    full, split = tmp_path / "full", tmp_path / "split"
    assert train.main(tiny_args(tiny_synthetic, full)) == 0
    assert train.main(tiny_args(tiny_synthetic, split, "--max_epochs_this_run", "1")) == 0
    ckpt = load_checkpoint(str(split / "ckpt.pth"))
    for option in ("clip_loss", "color_jitter"):
        del ckpt["config"][option]
    torch.save(ckpt, split / "ckpt.pth")
    assert train.main(tiny_args(tiny_synthetic, split)) == 0
    a, b = weights(full), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A value other than the default is still a changed setting.
    with pytest.raises(ValueError, match="other settings.*color_jitter"):
        train.main(tiny_args(tiny_synthetic, split, "--color_jitter", "0.4"))


def test_color_jitter_changes_each_views_colours_and_nothing_else(tiny_synthetic, tmp_path):
    def views(jitter):
        args = train.get_args(tiny_args(tiny_synthetic, tmp_path, "--repeats", "2", "--color_jitter", str(jitter)))
        dataset, _ = train.build_loader(args, train.check_args(args, 1), {"bad_videos.txt": tmp_path / "bad.txt"})
        return dataset[3][0]  # (2, 3, T, S, S) uint8

    plain, jittered = views(0), views(0.4)
    # The same crops and frames (jitter is drawn after them), different colours, and differently per view:
    # per-channel means of a view move, and the two views move apart.
    shift = (jittered.float() - plain.float()).mean(dim=(2, 3, 4))  # (2 views, 3 channels)
    assert shift.abs().max() > 2 and (shift[0] - shift[1]).abs().max() > 1
    edges = lambda v: (v.float().mean(1).diff(dim=-1).abs() > 8).float()  # where the picture has edges, per view
    assert (edges(plain) == edges(jittered)).float().mean() > 0.9
    with_zero = train.get_args(tiny_args(tiny_synthetic, tmp_path, "--repeats", "2"))
    assert with_zero.color_jitter == 0


# ------------------------------------------------------------------------ the command line tells the truth

def listed_values(help_text, marker):
    """'... <marker> 1 (a, b), 1024 1024 512 (c)' -> {'a': '1', 'b': '1', 'c': '1024 1024 512'}."""
    listing = " ".join(help_text.split()).split(marker, 1)[1]
    return {name: value.strip() for value, names in re.findall(r"([^,()]+) \(([^)]*)\)", listing)
            for name in names.split(", ")}


def test_help_shows_each_recipes_and_presets_value_and_never_default_none():
    from model import PRESETS, build_config
    parser = train.build_parser()
    assert "(default: None)" not in parser.format_help()
    helps = {a.dest: a.help for a in parser._actions}
    assert all(helps.values()), [dest for dest, text in helps.items() if not text]
    # An option left at None gets its value elsewhere: its help says where.
    assert all("default" in a.help for a in parser._actions if a.default is None), \
        [a.dest for a in parser._actions if a.default is None and "default" not in a.help]
    for name, recipe in train.RECIPES.items():
        for key, value in recipe.items():
            shown = listed_values(helps[key], "default per recipe:")[name]
            assert (tuple(map(int, shown.split())) if isinstance(value, tuple) else type(value)(shown)) == value, \
                (key, name, shown)
    for option, field in [("num_frames", "num_frames"), ("img_size", "img_size"), ("decoder_depth", "dec_depth"),
                          ("proj_hidden", "proj_hidden")]:
        shown = listed_values(helps[option], "default per --arch:")
        assert shown.keys() == PRESETS.keys()
        for arch in PRESETS:
            value = getattr(build_config(arch), field)
            assert (tuple(map(int, shown[arch].split())) if isinstance(value, tuple) else int(shown[arch])) == value


def test_the_shared_modules_import_no_script():
    # cli.py (the command line), monitor.py (what the loop reports), bench.py (what a step costs), ranks.py (what
    # ranks exchange) and augment.py (the fine-tuning augmentation) sit below the scripts: a script imports them,
    # never the other way round, so that every script can use them without importing another one.
    import ast
    scripts = {"train", "eval_linear", "eval_finetune", "eval_vos", "study"}
    for name in ("cli.py", "monitor.py", "bench.py", "ranks.py", "augment.py"):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.module}
        assert not imported & scripts, (name, imported & scripts)


def test_device_cpu_trains_and_is_recorded(tiny_synthetic, tmp_path):
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--device", "cpu", "--epochs", "1",
                                "--warmup_epochs", "0")) == 0
    assert load_checkpoint(str(tmp_path / "ckpt.pth"))["config"]["device"] == "cpu"
    assert "device" in train.RESUME_MAY_CHANGE  # a run may move between machines: the recipe stays


def not_a_train_checkpoint(tmp_path):
    """An --out holding a ckpt.pth that torch reads but train.py did not write (e.g. a DINO file)."""
    (tmp_path / "out").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "out" / "ckpt.pth")
    return []


@pytest.mark.parametrize("flags, message", [
    (["--device", "tpu"], "--device 'tpu': choose cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA device here; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    (["--out", "{tmp}/a_file"], "is a file: give a folder"),
    (["--out", "{tmp}/a_file/run"], "cannot create this folder"),
    (["--target", "dino", "--dino_weights", "{tmp}/a_file"], "--dino_weights {tmp}/a_file: cannot read checkpoint"),
    (["--target", "dino", "--dino_weights", "{tmp}/other.pth"], "give a DINO ViT-B/16 checkpoint"),
    (["--compile", "no_such_backend"], "--compile no_such_backend: unknown backend"),
    (["--motion_objects", "2", "--motion_objects_dir", "{tmp}"], "no folder of *.png files"),
    (not_a_train_checkpoint, "is not a checkpoint of train.py"),
])
def test_a_users_mistake_stops_at_start_with_the_message_alone(tiny_synthetic, tmp_path, flags, message):
    (tmp_path / "a_file").write_text("not a checkpoint")
    torch.save({"w": torch.ones(2)}, tmp_path / "other.pth")  # readable, but not DINO weights
    flags = flags(tmp_path) if callable(flags) else [f.format(tmp=tmp_path) for f in flags]
    argv = tiny_args(tiny_synthetic, tmp_path / "out", "--arch", "tiny", *flags)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert message.format(tmp=tmp_path) in done.stderr, done.stderr


def test_a_checkpoint_of_another_model_in_out_stops_with_the_message_alone(tiny_synthetic, tmp_path):
    # Same settings, other weights (e.g. written by other code): refused before any state is loaded.
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--max_epochs_this_run", "1")) == 0
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pth"))
    ckpt["model"]["mask_token"] = torch.zeros(1, 1, 7)
    torch.save(ckpt, tmp_path / "ckpt.pth")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *tiny_args(tiny_synthetic, tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "holds weights of another model" in done.stderr
