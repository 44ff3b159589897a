"""Tests for synthetic.py: the built-in datasets are deterministic, atomic, balanced, and their masks and
labels say what the videos show.

    python -m pytest -q tests/test_synthetic.py      # CPU, ~10 s
"""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import synthetic  # noqa: E402


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    sizes = dict(num_train=16, num_val=8, num_frames=12, size=32, num_vos=4)
    return synthetic.synthetic_dataset(tmp_path_factory.mktemp("syn") / "a", seed=3, **sizes), sizes


# ============ the procedural motion set ============

def test_synthetic_is_deterministic(synthetic_set, tmp_path):
    root, sizes = synthetic_set
    again = synthetic.synthetic_dataset(tmp_path / "b", seed=3, **sizes)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) == 16 + 8 + 4 * 12 * 2 + 2  # videos, DAVIS frames + masks, val.txt, meta.json
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = synthetic.synthetic_dataset(tmp_path / "c", seed=4, **sizes)
    first = synthetic.SYNTHETIC_CLASSES[0] + "/val_00000.mp4"  # video 0 has label 0 in every seed
    assert (other / "val" / first).read_bytes() != (root / "val" / first).read_bytes()


def test_synthetic_dataset_layout_and_labels(synthetic_set):
    root, sizes = synthetic_set
    train = data.build_video_dataset("synthetic", root, "train", num_frames=8, size=32)
    assert train.classes == synthetic.SYNTHETIC_CLASSES and len(train) == 16 and train.stride == 2
    assert sorted(y for _, y in train.samples) == sorted(list(range(4)) * 4)  # balanced
    clip, label = train[0]
    assert clip.shape == (3, 8, 32, 32)
    assert len(data.build_video_dataset("synthetic", root, "val")) == 8
    with pytest.raises(ValueError, match="delete it"):
        synthetic.synthetic_dataset(root, seed=3, **{**sizes, "num_train": 17})  # other parameters: not reused


def test_synthetic_masks_follow_labels(synthetic_set):
    """The main object (id 1) moves as its label says: slides, rotates or scales, and nothing else."""
    root, sizes = synthetic_set
    ds = data.VOSDataset(root / "davis", "davis2017", clip_len=12, size=32)
    assert len(ds) == 4
    seen = set()
    for item in (ds[i] for i in range(len(ds))):
        label = next(synthetic.SYNTHETIC_CLASSES.index(p.parent.name) for p in (root / "val").rglob(item["name"] + ".mp4"))
        seen.add(synthetic.SYNTHETIC_CLASSES[label])
        main = (item["masks"] == 1).float()  # (T, S, S)
        area = main.sum((1, 2))  # (T,)
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        cx, cy = (main * xs).sum((1, 2)) / area, (main * ys).sum((1, 2)) / area  # (T,) centroid
        dx, dy = (cx[-1] - cx[0]).abs().item(), (cy[-1] - cy[0]).abs().item()
        # orientation of the (elongated) object from its second moments, compared with the first frame mod pi
        mxx, myy = (main * (xs - cx[:, None, None]) ** 2).sum((1, 2)), (main * (ys - cy[:, None, None]) ** 2).sum((1, 2))
        mxy = (main * (xs - cx[:, None, None]) * (ys - cy[:, None, None])).sum((1, 2))
        theta = 0.5 * torch.atan2(2 * mxy, mxx - myy)  # (T,)
        turn = ((theta - theta[0] + math.pi / 2) % math.pi - math.pi / 2).abs().max().item()
        grow = (area.max() / area.min()).item()
        moves = {"horizontal": dx > 8 and dy < 2, "vertical": dy > 8 and dx < 2,
                 "rotating": turn > 0.8 and dx < 2 and dy < 2, "scaling": grow > 3 and dx < 2 and dy < 2}
        assert [k for k, v in moves.items() if v] == [synthetic.SYNTHETIC_CLASSES[label]], (item["name"], dx, dy, turn, grow)
        # The DAVIS frames are the frames of the video file (so masks align with what the model sees): each
        # decoded frame is far closer to its own JPEG than to the same frame of another sequence.
        video = next((root / "val").rglob(item["name"] + ".mp4"))
        decoded = data.decode_frames(video, range(12)).float()  # (T, S, S, 3)
        error = [(decoded - jpeg_frames(root, name)).abs().mean() for name in (item["name"], "val_00000", "val_00001")]
        assert error[0] < 12 and error[0] < 0.5 * max(error[1:])


def jpeg_frames(root, name):
    return torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in
                                      sorted((root / "davis/JPEGImages/480p" / name).glob("*.jpg"))])).float()


def test_synthetic_generation_is_atomic(tmp_path, monkeypatch):
    calls = []

    def failing_render(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted mid-way
        return real_render(*args)

    real_render = synthetic._render
    monkeypatch.setattr(synthetic, "_render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        synthetic.synthetic_dataset(tmp_path / "s", num_train=8, num_val=8, num_frames=4, size=16, num_vos=1)
    assert list(tmp_path.iterdir()) == []  # neither a root nor a leftover partial folder
    monkeypatch.setenv("SIGMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "_render", real_render)
    root = synthetic.synthetic_dataset(seed=5, num_train=8, num_val=8, num_frames=4, size=16, num_vos=1)
    assert root == tmp_path / "cache" / f"synthetic-v{synthetic.SYNTHETIC_VERSION}-seed5" and (root / "meta.json").is_file()
