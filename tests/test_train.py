"""train.py end to end on tiny data: a run writes a checkpoint and a log; 2 gloo processes stay
in sync; a resumed run equals an uninterrupted one; gradient accumulation equals a big batch;
a NaN loss stops cleanly; bad configurations fail before the first step."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from model import SIGMA, config_from_dict, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(data, out, *extra):
    """A fast config: tiny model, 8 clips per step, 2 steps per epoch on the 16-video set.
    `extra` flags ("--name", "value" pairs or lone switches) replace the defaults."""
    flags = {"--data_root": str(data), "--out": str(out), "--batch_size": "8", "--micro_batch": "8",
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


def test_resume_refuses_changed_settings(tiny_synthetic, tmp_path):
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--max_epochs_this_run", "1")) == 0
    with pytest.raises(ValueError, match="other settings"):
        train.main(tiny_args(tiny_synthetic, tmp_path, "--num_prototypes", "16"))


def test_gradient_accumulation_equals_big_batch(tiny_synthetic, tmp_path):
    # With the pixel loss the target of a clip does not depend on the rest of its batch, so two
    # micro-batches of 4 must give the update of one batch of 8 (same clips, same masks).
    common = ["--loss", "pixel", "--epochs", "1"]
    assert train.main(tiny_args(tiny_synthetic, tmp_path / "big", *common)) == 0
    assert train.main(tiny_args(tiny_synthetic, tmp_path / "acc", *common, "--micro_batch", "4")) == 0
    assert load_checkpoint(str(tmp_path / "acc" / "ckpt.pth"))["config"]["accum"] == 2
    a, b = weights(tmp_path / "big"), weights(tmp_path / "acc")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # equal up to summation order


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_synthetic, tmp_path, monkeypatch, capsys):
    assert train.main(tiny_args(tiny_synthetic, tmp_path, "--max_epochs_this_run", "1")) == 0
    before = weights(tmp_path)
    forward = SIGMA.forward
    def nan_forward(self, videos, mask):
        out = forward(self, videos, mask)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(SIGMA, "forward", nan_forward)
    assert train.main(tiny_args(tiny_synthetic, tmp_path)) == 1
    assert "loss is nan" in capsys.readouterr().err
    after = load_checkpoint(str(tmp_path / "ckpt.pth"))
    assert after["epoch"] == 1 and all(torch.equal(before[k], after["model"][k]) for k in before)


@pytest.mark.parametrize("extra,message", [
    (["--micro_batch", "3"], "not a multiple"),
    (["--num_frames", "7"], "multiple of tubelet_size"),
    (["--arch", "vit_h"], "unknown arch"),
    (["--precision", "fp8"], "--precision"),
])
def test_bad_configuration_fails_before_training(tiny_synthetic, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train.main(tiny_args(tiny_synthetic, tmp_path, *extra))
    assert not (tmp_path / "log.jsonl").exists()


def test_missing_data_root_fails_clearly(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="does not exist"):
        train.main(["--dataset", "k400", "--arch", "tiny", "--data_root", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "out"), "--micro_batch", "8", "--batch_size", "8"])


def test_torchrun_two_processes_stay_in_sync(tiny_synthetic, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *tiny_args(tiny_synthetic, tmp_path, "--epochs", "1", "--micro_batch", "4")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on all 2 ranks" in result.stdout
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pth"))
    # 8 clips per step = 2 ranks x 4: each rank sees half of the 16 videos -> 2 steps in the epoch.
    assert ckpt["config"]["world_size"] == 2 and ckpt["config"]["accum"] == 1 and ckpt["step"] == 2
