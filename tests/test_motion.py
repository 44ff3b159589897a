"""Tests for SMILE's synthetic object motion (synthetic.MotionObjects, train.py --motion_objects) and the
no-natural-video set (--dataset noise): alpha compositing against the formula, exact placement, rotation and
transparency of a pasted cut-out, determinism per (seed, epoch, index), the epoch reaching DataLoader workers,
a resumed run equal to an uninterrupted one, and bad options.

    python -m pytest -q tests/test_motion.py
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from model import load_checkpoint  # noqa: E402
from test_train import tiny_args  # noqa: E402


# ============ compositing ============

def test_composite_is_the_over_formula():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=g)
    rgb = torch.rand(5, 7, 3, generator=g) * 255
    alpha = torch.rand(5, 7, 1, generator=g)
    alpha[0], alpha[1] = 0, 1  # fully transparent / opaque rows
    want = (alpha.double() * rgb.double() + (1 - alpha.double()) * frames.double()).round()
    got = synthetic.composite(frames, alpha * rgb, alpha)  # premultiplied colour
    assert got.dtype == torch.uint8 and (got.double() - want).abs().max() <= 1  # float32 vs float64 at .5
    assert torch.equal(got[0], frames[0]) and torch.equal(got[1], rgb[1].round().to(torch.uint8))


def square(h=10, w=10, alpha=1.0):
    """A (4, h, w) cut-out: white, left half of the R channel 0 (so rotation is visible), given alpha."""
    cut = torch.ones(4, h, w)
    cut[0, :, :w // 2] = 0
    cut[3] = alpha
    return cut


def test_paste_puts_the_cut_out_exactly_where_and_as_opaque_as_asked():
    frames = torch.full((2, 40, 50, 3), 100, dtype=torch.uint8)
    centre = torch.tensor([[20.0, 15.0], [33.0, 25.0]])  # (x, y) per frame; side 10 = the cut-out's own size
    synthetic.paste(frames, square(), centre, torch.tensor([10.0, 10.0]), torch.zeros(2), torch.tensor([200.0] * 3))
    for t, (x, y) in enumerate(centre.long().tolist()):
        box = frames[t, y - 5:y + 5, x - 5:x + 5].long()  # (10, 10, 3)
        assert (box[:, 5:] == 200).all() and (box[:, :5, 0] == 0).all() and (box[:, :5, 1:] == 200).all()
        outside = torch.ones(40, 50, dtype=torch.bool)
        outside[y - 5:y + 5, x - 5:x + 5] = False
        assert (frames[t][outside] == 100).all()  # nothing else touched
    half = torch.full((1, 40, 50, 3), 100, dtype=torch.uint8)
    synthetic.paste(half, square(alpha=0.5), centre[:1], torch.tensor([10.0]), torch.zeros(1),
                    torch.tensor([200.0] * 3))
    assert (half[0, 10:20, 20:25] == 150).all() and (half[0, 10:20, 15:20, 0] == 50).all()  # 0.5 over 100


def test_edges_blend_towards_the_frame_not_black():
    """A white object on a white frame, off the pixel grid and turned: its blended edge pixels stay white
    (resampling with premultiplied alpha; straight alpha would darken them towards the zero padding)."""
    frames = torch.full((1, 30, 30, 3), 255, dtype=torch.uint8)
    synthetic.paste(frames, torch.ones(4, 10, 10), torch.tensor([[15.3, 14.6]]), torch.tensor([13.0]),
                    torch.tensor([0.4]), torch.tensor([255.0] * 3))
    assert (frames == 255).all()


def test_paste_rotates_and_scales():
    frames = torch.zeros(1, 40, 40, 3, dtype=torch.uint8)
    synthetic.paste(frames, square(), torch.tensor([[20.0, 20.0]]), torch.tensor([20.0]),
                    torch.tensor([np.pi / 2]), torch.tensor([255.0] * 3))
    red = frames[0, 10:30, 10:30, 0].float() / 255  # (20, 20): the cut-out at twice its size, turned
    want = torch.rot90(square()[0], k=-1).repeat_interleave(2, 0).repeat_interleave(2, 1)  # clockwise on screen
    # Bilinear sampling at 2x blends values across an edge of the pattern: compare where the 3x3 neighbourhood
    # of the wanted image is uniform (away from the red edge and from the cut-out's border).
    pool = torch.nn.functional.max_pool2d
    w4 = want[None, None]
    uniform = (pool(w4, 3, 1, 1) == -pool(-w4, 3, 1, 1))[0, 0]
    uniform[[0, -1]], uniform[:, [0, -1]] = False, False
    assert uniform.sum() > 200 and (red - want)[uniform].abs().max() < 0.01
    assert frames[0, :10].sum() == 0 and frames[0, 30:].sum() == 0


# ============ MotionObjects ============

def clip(seed=0):
    return torch.randint(0, 256, (2, 8, 48, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_motion_objects_are_deterministic_per_seed_epoch_and_index():
    motion = synthetic.MotionObjects(2, seed=0)
    a = motion(clip(), index=5, epoch=1)
    assert a.shape == (2, 8, 48, 64, 3) and a.dtype == torch.uint8
    assert torch.equal(a, motion(clip(), 5, 1))  # same key, same pixels
    assert not torch.equal(a, clip())  # something was drawn
    for other in (motion(clip(), 6, 1), motion(clip(), 5, 2), synthetic.MotionObjects(2, seed=1)(clip(), 5, 1)):
        assert not torch.equal(a, other)
    assert not torch.equal(a[0] != clip()[0], a[1] != clip()[1])  # each view has its own objects
    changed = (a != clip()).any(-1)  # (V, T, H, W): where objects are
    assert not torch.equal(changed[0, 0], changed[0, -1])  # they move


def test_cut_outs_from_a_folder_of_rgba_pngs(tmp_path):
    rgba = np.zeros((6, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    (cut,) = synthetic.load_cutouts(tmp_path)
    assert cut.shape == (4, 6, 4) and np.allclose(cut[0], 1) and np.allclose(cut[3], 128 / 255)
    with pytest.raises(ValueError, match="--motion_objects_dir .*no \\*.png"):
        synthetic.load_cutouts(tmp_path / "empty")
    default = synthetic.load_cutouts()
    assert len(default) >= 100 and default[0].shape == (4, 28, 28) and default[0][3].max() == 1


def test_the_epoch_reaches_loader_workers(tiny_synthetic):
    """The overlay sees (index, epoch) in worker processes too: here it paints them into the frames."""
    ds = data.build_video_dataset("synthetic", tiny_synthetic, "train", num_frames=2, size=16)
    ds.overlay = lambda frames, index, epoch: torch.full_like(frames, 10 * epoch + index)
    loader = data.make_loader(ds, batch_size=4, num_workers=1, shuffle=False)
    data.set_epoch(loader, 3)
    clips, _ = next(iter(loader))  # (4, 3, T, S, S) uint8
    grey = clips[:, 0, 0, 0, 0].float()
    assert torch.allclose(grey, torch.tensor([30.0, 31, 32, 33]), atol=0.01)


# ============ training ============

def test_resume_with_motion_objects_equals_uninterrupted(tiny_synthetic, tmp_path):
    full, split, plain = tmp_path / "full", tmp_path / "split", tmp_path / "plain"
    motion = ("--workers", "1", "--motion_objects", "2")
    assert train.main(tiny_args(tiny_synthetic, full, *motion)) == 0
    assert train.main(tiny_args(tiny_synthetic, split, *motion, "--max_epochs_this_run", "1")) == 0
    with pytest.raises(ValueError, match="other settings"):  # a resume may not switch the objects off
        train.main(tiny_args(tiny_synthetic, split, "--workers", "1"))
    assert train.main(tiny_args(tiny_synthetic, split, *motion)) == 0
    a, b = load_checkpoint(str(full / "ckpt.pth"))["model"], load_checkpoint(str(split / "ckpt.pth"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train.main(tiny_args(tiny_synthetic, plain, "--workers", "1", "--epochs", "2")) == 0
    c = load_checkpoint(str(plain / "ckpt.pth"))["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the objects did change the training data


@pytest.mark.parametrize("extra, message", [(["--motion_objects", "-1"], "--motion_objects -1: must be >= 0"),
                                            (["--motion_objects", "2", "--motion_objects_dir", "/no/such/dir"],
                                             "--motion_objects_dir /no/such/dir: no folder of")])
def test_bad_motion_options_stop_before_training(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train.main(tiny_args(tmp_path / "no_data", tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_noise_set_is_static_images_and_its_recipe_moves_objects(tmp_path):
    root = synthetic.noise_dataset(tmp_path / "noise", num_train=3, num_val=1, num_frames=4, size=32)
    ds = data.build_video_dataset("noise", root, "train", num_frames=4, size=32, train=False)
    assert len(ds) == 3 and ds.classes == ["noise"]
    with data.open_video(ds.samples[0][0]) as video:
        frames = video.read(range(4))  # (4, 32, 32, 3)
    assert (frames.float() - frames[0].float()).abs().max() <= 2  # one still image (codec noise only)
    assert frames.float().std() > 20  # and not a flat one
    args = train.get_args(["--dataset", "noise"])
    assert args.motion_objects == 2 and args.arch == "tiny"
    assert train.get_args(["--dataset", "noise", "--motion_objects", "0"]).motion_objects == 0
    assert train.get_args([]).motion_objects == 0
