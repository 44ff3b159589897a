"""Tests for synthetic.py: the built-in datasets are deterministic, atomic, balanced, and their masks and
labels say what the videos show.

    python -m pytest -q tests/test_synthetic.py      # CPU, ~10 s
"""
import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import eval_vos  # noqa: E402
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
    assert len(files) == 2 * (16 + 8) + 4 * 12 * 2 + 2  # videos + sidecars, DAVIS frames + masks, val.txt, meta
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
    ds = eval_vos.VOSDataset(root / "davis", "davis2017", clip_len=12, size=32)
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
        # The dense-label sidecar says the same as the DAVIS masks: main object = 1 + its class, distractors last.
        dense = torch.from_numpy(np.load(video.with_suffix(".mask.npy")))
        assert dense.shape == (12, 32, 32) and dense.dtype == torch.uint8
        expected = torch.where(item["masks"] == 1, 1 + label, torch.where(item["masks"] > 1, 5, 0))
        assert torch.equal(dense.long(), expected.long())
    assert seen == set(synthetic.SYNTHETIC_CLASSES)
    assert json.loads((root / "meta.json").read_text())["dense_classes"] == synthetic.SYNTHETIC_DENSE_CLASSES


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


# ============ moving Fashion-MNIST ============
FASHION_SIZES = dict(num_train=8, num_val=8, num_frames=6, size=32, num_vos=2)


@pytest.fixture(scope="module")
def fashion_set(tmp_path_factory):
    return synthetic.fashion_dataset(tmp_path_factory.mktemp("fashion") / "a", seed=1, **FASHION_SIZES)


def test_fashion_is_deterministic_balanced_and_labelled(fashion_set, tmp_path):
    root = fashion_set
    again = synthetic.fashion_dataset(tmp_path / "b", seed=1, **FASHION_SIZES)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) == 2 * (8 + 8) + 2 * 6 * 2 + 2  # videos + sidecars, DAVIS frames + masks, val.txt, meta
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = synthetic.fashion_dataset(tmp_path / "c", seed=2, **FASHION_SIZES)
    assert (other / "val/bag/val_00000.mp4").read_bytes() != (root / "val/bag/val_00000.mp4").read_bytes()
    classes, _ = synthetic.fashion_classes("coarse")
    meta = json.loads((root / "meta.json").read_text())
    assert meta["dense_classes"] == ["background", *classes]
    for split in ("train", "val"):
        ds = data.build_video_dataset("synthetic", root, split, num_frames=4, size=32)
        assert ds.classes == classes and sorted(y for _, y in ds.samples) == sorted(list(range(4)) * 2)  # balanced
        for path, label in ds.samples:  # the sidecar: (T, S, S) uint8, the video's class where the item is
            dense = np.load(Path(path).with_suffix(".mask.npy"))
            assert dense.shape == (6, 32, 32) and dense.dtype == np.uint8
            assert set(np.unique(dense)) == {0, 1 + label} and 0.05 < (dense > 0).mean() < 0.6


def test_fashion_masks_align_with_the_decoded_frames(tmp_path):
    """On a flat background (background=0) the decoded frames differ from the background colour exactly
    where the mask says the item is (a mask shifted by 3 px fails this)."""
    root = synthetic.fashion_dataset(tmp_path / "flat", seed=0, **FASHION_SIZES, background=0.0)
    for path in sorted((root / "val").rglob("*.mp4")):
        frames = data.decode_frames(path, range(6)).float()  # (T, S, S, 3)
        mask = torch.from_numpy(np.load(path.with_suffix(".mask.npy"))).bool()  # (T, S, S)
        bg = frames[~mask].median(0).values  # (3,) the flat background colour
        diff = (frames - bg).abs().mean(-1)  # (T, S, S)
        grown = F.max_pool2d(mask[:, None].float(), 3, 1, 1)[:, 0].bool()  # the mask and its 1-px rim
        assert diff[mask].mean() > 25 and diff[~grown].mean() < 4, path
        shifted = torch.roll(mask, 3, dims=2)
        assert diff[shifted & ~mask].mean() < 0.5 * diff[mask].mean()


def test_fashion_items_from_idx_files_and_missing_files(tmp_path):
    subset = synthetic.load_fashion_mnist()
    assert subset["train"][0].shape == (1500, 28, 28) and np.bincount(subset["val"][1]).tolist() == [50] * 10
    folder = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout under the root the user names
    folder.mkdir(parents=True)
    for split, (images, labels) in subset.items():
        names = synthetic._IDX[split]
        idx_file(folder / (names[0] + ".gz"), images, gz=True)
        idx_file(folder / names[1], labels, gz=False)
    loaded = synthetic.load_fashion_mnist(tmp_path)
    for split in subset:
        assert all(np.array_equal(a, b) for a, b in zip(loaded[split], subset[split]))
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*--fashion_source"):
        synthetic.load_fashion_mnist(tmp_path / "nowhere")


def idx_file(path, array, gz):
    """Write an IDX file (the format of the Fashion-MNIST downloads): magic, dims (big-endian), uint8 data."""
    raw = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_fashion_generation_is_atomic(tmp_path, monkeypatch):
    calls, real_render = [], synthetic._render_fashion

    def failing_render(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted mid-way
        return real_render(*args)

    monkeypatch.setattr(synthetic, "_render_fashion", failing_render)
    with pytest.raises(KeyboardInterrupt):
        synthetic.fashion_dataset(tmp_path / "f", **FASHION_SIZES)
    assert list(tmp_path.iterdir()) == []  # neither a root nor a leftover partial folder
    with pytest.raises(ValueError, match="coarse"):
        synthetic.fashion_classes("medium")


# ============ study.py's bookkeeping on this benchmark ============

def test_vos_chance_is_the_all_background_miou(fashion_set):
    """study.py's "chance" for the headline: the mIoU of calling every pixel background, from the VOS clips' masks."""
    names = (fashion_set / "davis/ImageSets/2017/val.txt").read_text().split()
    pngs = sorted((fashion_set / "davis/Annotations/480p").rglob("*.png"))
    background = np.mean([[(np.asarray(Image.open(p)) == 0).mean() for p in pngs if p.parent.name == name]
                          for name in names])
    assert synthetic.vos_chance(fashion_set) == pytest.approx(100 * background / 2, abs=1e-6)

