"""
Built-in datasets that need no download, written as real video files (and DAVIS-layout masks) so that every
script reads them through the same decoding and layouts as Kinetics (data.py).

    python synthetic.py [--root DIR] [--seed 0]   # generate the procedural motion set (cached), print where / how long

The procedural motion set (synthetic_dataset): 4 motion classes, 64x64, 800 videos, generated in ~14 s on a
2-core CPU; same seed and sizes -> byte-identical files.
"""
import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

# ============ defaults ============
SYNTHETIC_VERSION = 3  # bump when the generator changes: cached copies of older versions are not reused
SYNTHETIC_DEFAULTS = dict(num_train=600, num_val=200, num_frames=32, size=64, num_vos=20)


# ============ synthetic dataset ============
# 4 classes = how the main object moves: sliding horizontally, sliding vertically, rotating in place, or
# scaling in place (each either way, with equal probability). Appearance is drawn the same way in every class
# (background, shape, texture, colours, aspect, size, 0-2 distractors moving between two random points), so a
# single frame says (almost) nothing about the label: motion has to be seen. Every class is closed under time
# reversal (left <-> right, clockwise <-> counter-clockwise, grow <-> shrink), so the label needs no arrow of
# time: a first design that did (direction x approach / recede, 8 classes) left every tiny model at chance
# under the linear probe after minutes of CPU pretraining, which made the set useless for comparing methods.
# The main object (instance id 1) is elongated so that rotation is visible and is drawn on top.

# Alphabetical, so that the folder-per-class parser's sorted class ids are these indices.
SYNTHETIC_CLASSES = ["horizontal", "rotating", "scaling", "vertical"]
_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (256 * 3 - 12)  # DAVIS colours of ids 0-3
def _texture(rng, u, v):
    """A random procedural texture at coordinates u, v (pixels, float32, any shape) -> float32 (..., 3).

    Random phases make its distribution translation-invariant, so a panned background looks the same either
    way in time (the class symmetry above).
    """
    colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    angle, freq, kind = rng.uniform(0, np.pi), rng.uniform(0.3, 1.2), rng.integers(3)
    pa, pb = rng.uniform(0, 2 * np.pi, 2).tolist()
    a = freq * (u * math.cos(angle) + v * math.sin(angle)) + pa  # phase along / across the pattern
    b = freq * (v * math.cos(angle) - u * math.sin(angle)) + pb
    if kind == 0:
        weight = np.sin(a) > 0  # stripes
    elif kind == 1:
        weight = np.sin(a) * np.sin(b) > 0  # checkerboard
    else:
        weight = 0.5 + 0.5 * np.sin(a + 2 * np.sin(0.5 * b))  # smooth waves
    return colours[0] + weight[..., None] * (colours[1] - colours[0])


def _render(rng, label, num_frames, size):
    """One synthetic video -> frames uint8 (T, S, S, 3), masks uint8 (T, S, S) (0 = background, 1 = main)."""
    # float32 throughout (half the time of float64); scalars from rng are Python floats and keep it float32.
    t = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)[:, None, None]  # (T, 1, 1) time
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # (S, S) pixel centres
    pan_x, pan_y = rng.uniform(-0.15, 0.15, 2).tolist()  # background drift over the video (camera pan)
    frames = _texture(rng, x - pan_x * size * t, y - pan_y * size * t)  # (T, S, S, 3) float32
    masks = np.zeros(frames.shape[:3], np.uint8)  # (T, S, S)
    travel, turn, growth = 0.5 * size, math.pi, 2.5  # over the whole video: slide, rotation, size ratio
    num_objects = rng.integers(1, 4)
    for k in reversed(range(num_objects)):  # distractors first: the main object (k = 0) is drawn on top
        angle, shape = rng.uniform(0, np.pi), rng.integers(3)
        if k == 0:
            kind, sign = SYNTHETIC_CLASSES[label], float(rng.choice([-1.0, 1.0]))  # sign: which way; same class
            radius, aspect = rng.uniform(0.13, 0.19) * size, rng.uniform(0.35, 0.6)
            x0, y0 = rng.uniform(0.3 * size, 0.7 * size, 2).tolist()
            cx = x0 + sign * travel * (t - 0.5) if kind == "horizontal" else x0 + 0 * t  # (T, 1, 1) centre
            cy = y0 + sign * travel * (t - 0.5) if kind == "vertical" else y0 + 0 * t
            angle = angle + sign * turn * t if kind == "rotating" else angle + 0 * t  # (T, 1, 1)
            r = radius * growth ** (sign * (t - 0.5)) if kind == "scaling" else radius + 0 * t  # (T, 1, 1)
        else:  # distractor: smaller, constant size, straight between two random points
            (x0, y0), (x1, y1) = rng.uniform(0.1 * size, 0.9 * size, (2, 2)).tolist()
            cx, cy = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t  # (T, 1, 1) centre
            radius, aspect = rng.uniform(0.07, 0.11) * size, rng.uniform(0.6, 1.0)
            angle, r = angle + 0 * t, radius + 0 * t
        cos, sin = np.cos(angle), np.sin(angle)  # (T, 1, 1)
        u = ((x - cx) * cos + (y - cy) * sin) / r  # (T, S, S) object coordinates
        v = ((y - cy) * cos - (x - cx) * sin) / (r * aspect)
        if shape == 0:
            inside = u ** 2 + v ** 2 <= 1  # ellipse
        elif shape == 1:
            inside = np.maximum(abs(u), abs(v)) <= 1  # rectangle
        else:
            inside = abs(u) + abs(v) <= 1  # diamond
        colour = _texture(rng, u * radius, v * radius)  # (T, S, S, 3): moves and scales with the object
        frames = np.where(inside[..., None], colour, frames)
        masks[inside] = k + 1
    return frames.round().astype(np.uint8), masks


def _write_video(path, frames, fps=25):
    """uint8 (T, H, W, 3) -> MP4 (MPEG-4 Part 2, as the Xvid/DivX of UCF101 / HMDB51, fixed quantiser 3).

    Not H.264: the bundled libx264 is not bit-reproducible here (identical input gave different bytes in
    repeated runs, even single-threaded), while FFmpeg's own mpeg4 encoder is.
    """
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps, options={"qmin": "3", "qmax": "3", "threads": "1"})
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())


def _generate(root, seed, num_train, num_val, num_frames, size, num_vos):
    davis = root / "davis"
    for split, count in (("train", num_train), ("val", num_val)):
        for c in SYNTHETIC_CLASSES:
            (root / split / c).mkdir(parents=True)
        for i in range(count):
            label = i % len(SYNTHETIC_CLASSES)  # balanced classes
            rng = np.random.default_rng([seed, int(split == "val"), i])  # one stream per video: order-independent
            frames, masks = _render(rng, label, num_frames, size)
            _write_video(root / split / SYNTHETIC_CLASSES[label] / f"{split}_{i:05d}.mp4", frames)
            if split == "val" and i < num_vos:  # DAVIS-2017 layout for eval_vos (frames as rendered)
                seq = f"val_{i:05d}"
                for sub in ("JPEGImages", "Annotations"):
                    (davis / sub / "480p" / seq).mkdir(parents=True)
                for j, (img, mask) in enumerate(zip(frames, masks)):
                    Image.fromarray(img).save(davis / "JPEGImages" / "480p" / seq / f"{j:05d}.jpg", quality=95)
                    png = Image.fromarray(mask, mode="P")
                    png.putpalette(_PALETTE)
                    png.save(davis / "Annotations" / "480p" / seq / f"{j:05d}.png")
    (davis / "ImageSets" / "2017").mkdir(parents=True)
    (davis / "ImageSets" / "2017" / "val.txt").write_text("".join(f"val_{i:05d}\n" for i in range(num_vos)))


def synthetic_dataset(root=None, seed=0, **size_kwargs):
    """Generate (once) the synthetic video set -> its root (folder-per-class layout, see LAYOUTS).

    root defaults to $SIGMA_CACHE/synthetic-v<version>-seed<seed> ($SIGMA_CACHE defaults to ~/.cache/sigma).
    size_kwargs override SYNTHETIC_DEFAULTS (num_train, num_val, num_frames, size, num_vos). Written to a
    temporary folder beside root and renamed into place when complete, so an interrupted run leaves no
    half-finished root (and concurrent ranks simply keep the first finished copy). Same seed and sizes ->
    byte-identical files. An existing root made with other parameters is an error, not silently reused.
    """
    sizes = {**SYNTHETIC_DEFAULTS, **size_kwargs}
    params = dict(version=SYNTHETIC_VERSION, seed=seed, **sizes)
    if root is None:
        cache = Path(os.environ.get("SIGMA_CACHE", Path.home() / ".cache" / "sigma"))
        root = cache / f"synthetic-v{SYNTHETIC_VERSION}-seed{seed}"
    root = Path(root).expanduser()
    if root.exists():
        meta = root / "meta.json"
        found = json.loads(meta.read_text()) if meta.is_file() else "no meta.json"
        if found != params:
            raise ValueError(f"{root} exists but was not generated with {params} (found: {found}); "
                             f"delete it or pass another root")
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{root.name}.partial-", dir=root.parent))
    try:
        _generate(tmp, seed, **sizes)
        (tmp / "meta.json").write_text(json.dumps(params))
        try:
            os.rename(tmp, root)  # atomic on one file system
        except OSError:
            if not root.exists():
                raise  # (else another process finished first: use its copy)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there if something failed
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="where to write (default: $SIGMA_CACHE/synthetic-v*-seed*)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args()
    t0 = time.perf_counter()
    where = synthetic_dataset(args.root, args.seed)
    print(f"synthetic dataset at {where} ({time.perf_counter() - t0:.1f} s; cached runs take ~0 s)")
