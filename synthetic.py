"""
Built-in datasets that need no download, written as real video files (and DAVIS-layout masks) so that every
script reads them through the same decoding and layouts as Kinetics (data.py).

    python synthetic.py [--root DIR] [--seed 0]   # generate the procedural motion set (cached), print where / how long
    python synthetic.py --set fashion              # moving Fashion-MNIST from the shipped subset (~30 s)
    python synthetic.py --set fashion --fashion_source full   # ... from the full IDX files (dataset-fashion-mnist)
    python synthetic.py --set noise                # SMILE's "no natural video" set: static random images

Also here: MotionObjects, SMILE's synthetic object motion, which data.VideoClips overlays on training clips
(train.py --motion_objects N; docs/motion.md).

The procedural motion set (synthetic_dataset): 4 motion classes, 64x64, 800 videos, generated in ~14 s on a
2-core CPU. Moving Fashion-MNIST (fashion_dataset): one real Fashion-MNIST item per clip, 4 coarse categories,
2000 + 500 videos of 16 frames, 64x64: the benchmark of study.py. Both: same seed and sizes -> byte-identical
files; beside every video its dense per-pixel labels (<video>.mask.npy, classes in meta.json "dense_classes").
"""
import argparse
import gzip
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ============ defaults ============
SYNTHETIC_VERSION = 4  # bump when the generator changes: cached copies of older versions are not reused
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
# Per-pixel classes of the dense-label sidecars (<video>.mask.npy): the main object carries its motion class,
# distractors their own class.
SYNTHETIC_DENSE_CLASSES = ["background", *SYNTHETIC_CLASSES, "distractor"]
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


def _write_set(root, seed, classes, render, num_train, num_val, num_vos):
    """Write a folder-per-class video set: <root>/{train,val}/<class>/<split>_<i>.mp4, beside each video its
    dense labels <name>.mask.npy (uint8 (T, H, W), 0 = background, k = dense class k), and the first num_vos
    val videos again in the DAVIS-2017 layout (<root>/davis) for eval_vos.py.

    render(rng, split, i) -> (label, frames uint8 (T, S, S, 3), instance masks uint8 (T, S, S), dense labels or
    None for no sidecar).
    Each video has its own random stream (seed, split, i), so no video depends on the order of the others.
    """
    davis = root / "davis"
    for split, count in (("train", num_train), ("val", num_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
        for i in range(count):
            rng = np.random.default_rng([seed, int(split == "val"), i])
            label, frames, masks, dense = render(rng, split, i)
            path = root / split / classes[label] / f"{split}_{i:05d}.mp4"
            _write_video(path, frames)
            if dense is not None:
                np.save(path.with_suffix(".mask.npy"), dense)
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


def _cached(root, default_name, params, generate):
    """Generate a set once into root (default $SIGMA_CACHE/<default_name>, $SIGMA_CACHE defaulting to
    ~/.cache/sigma) -> root. Written to a temporary folder beside root and renamed into place when complete, so
    an interrupted run leaves no half-finished root (and concurrent ranks simply keep the first finished copy).
    An existing root made with other parameters (meta.json) is an error, not silently reused.
    """
    if root is None:
        root = Path(os.environ.get("SIGMA_CACHE", Path.home() / ".cache" / "sigma")) / default_name
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
        generate(tmp)
        (tmp / "meta.json").write_text(json.dumps(params))
        try:
            os.rename(tmp, root)  # atomic on one file system
        except OSError:
            if not root.exists():
                raise  # (else another process finished first: use its copy)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there if something failed
    return root


def synthetic_dataset(root=None, seed=0, **size_kwargs):
    """Generate (once) the procedural motion set -> its root (folder-per-class layout, see data.LAYOUTS).

    root defaults to $SIGMA_CACHE/synthetic-v<version>-seed<seed>. size_kwargs override SYNTHETIC_DEFAULTS
    (num_train, num_val, num_frames, size, num_vos). Same seed and sizes -> byte-identical files.
    """
    sizes = {**SYNTHETIC_DEFAULTS, **size_kwargs}
    params = dict(version=SYNTHETIC_VERSION, seed=seed, **sizes, dense_classes=SYNTHETIC_DENSE_CLASSES)

    def render(rng, split, i):
        label = i % len(SYNTHETIC_CLASSES)  # balanced classes
        frames, masks = _render(rng, label, sizes["num_frames"], sizes["size"])
        dense = np.where(masks == 1, 1 + label, np.where(masks > 1, len(SYNTHETIC_DENSE_CLASSES) - 1, 0))
        return label, frames, masks, dense.astype(np.uint8)

    generate = lambda tmp: _write_set(tmp, seed, SYNTHETIC_CLASSES, render, sizes["num_train"], sizes["num_val"],
                                      sizes["num_vos"])
    return _cached(root, f"synthetic-v{SYNTHETIC_VERSION}-seed{seed}", params, generate)


# ============ moving Fashion-MNIST ============
# Real image content at laptop scale: one Fashion-MNIST item (28x28 grey, from the shipped subset or the full
# IDX files) per video, enlarged, tinted with a random colour and moving in a straight line over a drifting,
# low-contrast procedural texture. The label is the item's category, so a single frame suffices and what is
# measured is how well the features describe an object's shape against clutter and motion.

# The ten Fashion-MNIST categories in the order of their IDX label ids.
FASHION_MNIST_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                       "ankle-boot"]
# Coarse labels (the default): the five upper-body garments differ in details
# (sleeves, collars) that a tiny model pretrained for minutes is unlikely to resolve. "fine" keeps all ten.
FASHION_COARSE = {"bag": ["bag"], "footwear": ["sandal", "sneaker", "ankle-boot"], "trouser": ["trouser"],
                  "upper-body": ["t-shirt", "pullover", "dress", "coat", "shirt"]}
FASHION_VERSION = 2  # bump when the generator changes (2: 200 DAVIS-layout val clips instead of 20)
FASHION_DEFAULTS = dict(num_train=2000, num_val=500, num_frames=16, size=64, num_vos=200, labels="coarse",
                        scale=(0.55, 0.8), background=0.35)
FASHION_SUBSET = Path(__file__).resolve().parent / "assets" / "fashion_mnist_subset.npz"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def fashion_classes(labels):
    """Class names (sorted, = folder-per-class ids) and, per Fashion-MNIST label id, its class index."""
    if labels == "fine":
        names = sorted(FASHION_MNIST_NAMES)
        return names, [names.index(n) for n in FASHION_MNIST_NAMES]
    if labels == "coarse":
        names = sorted(FASHION_COARSE)
        return names, [next(i for i, c in enumerate(names) if n in FASHION_COARSE[c]) for n in FASHION_MNIST_NAMES]
    raise ValueError(f"labels={labels!r}: choose 'coarse' or 'fine'")


def _read_idx(path):
    """An IDX file (raw or .gz) -> uint8 array; the header's dimension count sets the shape."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(source=None):
    """Fashion-MNIST items -> {"train": (images (N, 28, 28) uint8, labels (N,)), "val": (...)}; val = its test set.

    source None: the 2000-item subset shipped in assets/ (no install). Otherwise the four IDX files (raw or .gz)
    from: a folder you name (or its FashionMNIST/raw, torchvision's layout), or with source="full" the folder of
    Debian's dataset-fashion-mnist package, then ./data/FashionMNIST/raw (torchvision's usual root).
    """
    if source is None:
        with np.load(FASHION_SUBSET) as f:
            return {s: (f[f"{s}_images"], f[f"{s}_labels"]) for s in ("train", "val")}
    folders = [DEBIAN_FASHION_MNIST, Path("data/FashionMNIST/raw")] if source == "full" else \
        [Path(source).expanduser(), Path(source).expanduser() / "FashionMNIST" / "raw"]
    for folder in folders:
        files = {s: [next((folder / (n + ext) for ext in ("", ".gz") if (folder / (n + ext)).is_file()), None)
                     for n in names] for s, names in _IDX.items()}
        if all(p is not None for ps in files.values() for p in ps):
            return {s: (_read_idx(im), _read_idx(lb)) for s, (im, lb) in files.items()}
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files ({', '.join(n for ns in _IDX.values() for n in ns)}, raw or .gz) not found in "
        f"{', '.join(map(str, folders))}. Get them with `sudo apt-get install dataset-fashion-mnist` (installs "
        f"{DEBIAN_FASHION_MNIST}) or torchvision.datasets.FashionMNIST('data', download=True), and pass "
        f"fashion_source='full' (--fashion_source full) or the folder; or leave fashion_source unset to use the "
        f"subset shipped in assets/")


def _sample(image, u, v):
    """Bilinear lookup of a (28, 28) image at float pixel coordinates u (column), v (row), zero outside."""
    padded = np.pad(image.astype(np.float32), 1)  # (30, 30): the zero border is what lies outside the item
    u, v = np.clip(u + 1, 0, 29 - 1e-3), np.clip(v + 1, 0, 29 - 1e-3)
    u0, v0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    wu, wv = u - u0, v - v0
    top = padded[v0, u0] * (1 - wu) + padded[v0, u0 + 1] * wu
    bottom = padded[v0 + 1, u0] * (1 - wu) + padded[v0 + 1, u0 + 1] * wu
    return top * (1 - wv) + bottom * wv


def _render_fashion(rng, item, num_frames, size, scale, background):
    """One moving item -> frames uint8 (T, S, S, 3), masks uint8 (T, S, S) (1 where the item is)."""
    t = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)[:, None, None]  # (T, 1, 1)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # (S, S)
    pan_x, pan_y = rng.uniform(-0.15, 0.15, 2).tolist()
    texture = _texture(rng, x - pan_x * size * t, y - pan_y * size * t)  # (T, S, S, 3)
    mean = texture.mean((0, 1, 2))
    frames = mean + background * (texture - mean)  # low contrast: clutter that does not drown the item
    side = rng.uniform(*scale) * size  # the item's 28 px span this many pixels
    (x0, y0), (x1, y1) = rng.uniform(side / 2, size - side / 2, (2, 2)).tolist()  # stays inside the frame
    cx, cy = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t  # (T, 1, 1) centre, a straight line
    alpha = _sample(item, (x - cx) * 28 / side + 13.5, (y - cy) * 28 / side + 13.5) / 255  # (T, S, S)
    colour = (mean + 128 + rng.uniform(-64, 64, 3).astype(np.float32)) % 256  # >= 64 levels from the mean, per channel
    frames = frames * (1 - alpha[..., None]) + colour * alpha[..., None]
    return frames.round().clip(0, 255).astype(np.uint8), (alpha > 0.25).astype(np.uint8)


def fashion_dataset(root=None, seed=0, fashion_source=None, **kwargs):
    """Generate (once) the moving Fashion-MNIST set -> its root (folder-per-class, read as --dataset synthetic).

    Train videos use Fashion-MNIST training items, val videos its test items, so the val split shows unseen
    items. Labels are balanced; within a class the category and the item are drawn at random. kwargs override
    FASHION_DEFAULTS. root defaults to $SIGMA_CACHE/fashion-v<version>-<subset|full>-<labels>-seed<seed>.
    Same seed, items and settings -> byte-identical files.
    """
    cfg = {**FASHION_DEFAULTS, **kwargs}
    items = load_fashion_mnist(fashion_source)
    classes, class_of = fashion_classes(cfg["labels"])
    params = dict(version=FASHION_VERSION, seed=seed, items="subset" if fashion_source is None else "full",
                  **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                  dense_classes=["background", *classes])
    by_class = {s: [np.flatnonzero(np.asarray(class_of)[lb] == c) for c in range(len(classes))]
                for s, (_, lb) in items.items()}

    def render(rng, split, i):
        label = i % len(classes)  # balanced classes
        item = items[split][0][rng.choice(by_class[split][label])]
        frames, masks = _render_fashion(rng, item, cfg["num_frames"], cfg["size"], cfg["scale"], cfg["background"])
        return label, frames, masks, masks * np.uint8(1 + label)

    generate = lambda tmp: _write_set(tmp, seed, classes, render, cfg["num_train"], cfg["num_val"], cfg["num_vos"])
    name = f"fashion-v{FASHION_VERSION}-{params['items']}-{cfg['labels']}-seed{seed}"
    return _cached(root, name, params, generate)



def vos_chance(root):
    """mIoU (%) of the trivial segmentation "all background" on a built-in set's VOS clips (<root>/davis):
    per clip (background IoU = its share, object IoU = 0) / 2, averaged over clips."""
    root = Path(root)
    names = (root / "davis" / "ImageSets" / "2017" / "val.txt").read_text().split()
    shares = [(np.load(next((root / "val").rglob(f"{name}.mask.npy"))) == 0).mean() for name in names]
    return 100 * float(np.mean(shares)) / 2


# ============ synthetic object motion (SMILE) ============
# SMILE (Thoker et al., CVPR 2025, Sec. 3) overlays segmented objects (RGBA cut-outs) that move along random
# smooth trajectories onto the pretraining clips, so that a clip always holds motion the model must predict.
# MotionObjects does that to the decoded frames, before crop and masking: each object follows a quadratic
# Bezier path between random points (centre positions anywhere in the frame, partly outside allowed), with
# its size changing geometrically and its angle linearly over the clip. The cut-outs come from a folder of
# RGBA PNGs, or by default from the Fashion-MNIST items shipped in assets/ (grey items: alpha = intensity,
# tinted with a random colour per object).

MOTION_SIDE = (0.2, 0.45)  # an object's longer side at the clip's start, as a fraction of the frame's short side
MOTION_GROWTH = (0.7, 1.4)  # its size at the end / at the start
MOTION_TURN = np.pi / 3  # its rotation over the clip: uniform in [-turn, turn] radians


def load_cutouts(folder=None):
    """RGBA cut-outs -> list of float32 (4, h, w) in [0, 1]: every *.png of `folder` (converted to RGBA), or
    with folder=None the Fashion-MNIST training items of the shipped subset (RGB = the grey shading, alpha =
    twice the intensity, clipped: the item opaque, its dark background transparent)."""
    if folder is None:
        with np.load(FASHION_SUBSET) as f:
            grey = f["train_images"].astype(np.float32) / 255  # (N, 28, 28)
        return [np.stack([g, g, g, np.minimum(2 * g, 1)]) for g in grey]
    paths = sorted(Path(folder).expanduser().glob("*.png"))
    if not paths:
        raise ValueError(f"--motion_objects_dir {folder}: no *.png files there; give a folder of RGBA PNG "
                         f"cut-outs, or leave it unset to use the Fashion-MNIST items shipped in assets/")
    return [np.asarray(Image.open(p).convert("RGBA"), np.float32).transpose(2, 0, 1) / 255 for p in paths]


def composite(frames, premultiplied, alpha):
    """Alpha compositing ("over"): uint8 frames (..., 3), float premultiplied colour alpha * rgb (..., 3) with
    rgb in [0, 255], alpha (..., 1) in [0, 1] -> uint8 alpha * rgb + (1 - alpha) * frames, rounded."""
    f = frames.float()
    return f.sub_(alpha * f).add_(premultiplied).round_().to(torch.uint8)  # within [0, 255]


def paste(frames, cutout, centre, side, angle, colour):
    """Draw one cut-out into every frame, in place. frames: uint8 (T, H, W, 3); cutout: float (4, h, w) RGBA in
    [0, 1]; centre (T, 2) as (x, y) in pixels, side (T,) = the cut-out's longer side in pixels, angle (T,) in
    radians; colour (3,) multiplies its RGB (0-255). Only each frame's bounding box of the object is touched.
    Resampled with premultiplied alpha, so the object's edge blends towards the frame, not towards black."""
    T, H, W, _ = frames.shape
    h, w = cutout.shape[1:]
    source = torch.cat([cutout[:3] * colour.view(3, 1, 1) * cutout[3:], cutout[3:]])[None]  # (1, 4, h, w)
    scale = side / max(h, w)  # (T,) frame pixels per cut-out pixel
    cos, sin = torch.cos(angle), torch.sin(angle)  # (T,)
    half = torch.stack([cos.abs() * w + sin.abs() * h, sin.abs() * w + cos.abs() * h], 1) * scale[:, None] / 2
    low = (centre - half).floor().clamp(min=0).long()  # (T, 2) the object's box in each frame, (x, y), clipped
    high = torch.minimum((centre + half).ceil(), torch.tensor([W, H])).long()  # (T, 2)
    # Per frame (the box moves and changes size): cut-out coordinates of the box's pixel centres, rotated back
    # by -angle and scaled to grid_sample's [-1, 1]; then one bilinear sampling and one blend.
    k = (cos / scale * 2 / w, sin / scale * 2 / w, cos / scale * 2 / h, sin / scale * 2 / h)  # 4 x (T,)
    for t, (x0, y0, x1, y1, cx, cy, cu, su, cv, sv) in enumerate(zip(*low.T.tolist(), *high.T.tolist(),
                                                                    *centre.T.tolist(), *(q.tolist() for q in k))):
        if x1 <= x0 or y1 <= y0:
            continue  # outside the frame
        dy = torch.arange(y0 + 0.5 - cy, y1 - cy, dtype=torch.float32)[:, None]  # (bh, 1) offsets from the centre
        dx = torch.arange(x0 + 0.5 - cx, x1 - cx, dtype=torch.float32)[None, :]  # (1, bw)
        grid = torch.empty(1, y1 - y0, x1 - x0, 2)  # (1, bh, bw, 2)
        grid[..., 0], grid[..., 1] = cu * dx + su * dy, cv * dy - sv * dx
        rgba = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)[0].permute(1, 2, 0)  # (bh, bw, 4), alpha 0 outside the cut-out
        box = frames[t, y0:y1, x0:x1]  # (bh, bw, 3) view
        box.copy_(composite(box, rgba[..., :3], rgba[..., 3:]))


class MotionObjects:
    """Overlay `num_objects` moving cut-outs on clips: frames uint8 (V, T, H, W, 3), drawn into in place (the
    freshly decoded clip) and returned.

    Randomness comes only from (seed, epoch, index, view), so an epoch replays identically after a restart
    and does not depend on which worker loads which clip. folder: RGBA PNGs (None = shipped Fashion-MNIST).
    """

    def __init__(self, num_objects, folder=None, seed=0):
        self.num_objects, self.seed, self.cutouts = num_objects, seed, load_cutouts(folder)
        self.tinted = folder is None  # grey items get a random colour; real cut-outs keep theirs

    def __call__(self, frames, index, epoch):
        V, T, H, W, _ = frames.shape
        t = torch.linspace(0, 1, T)[:, None]  # (T, 1)
        for view in range(V):
            rng = np.random.default_rng([self.seed, epoch, index, view])
            for _ in range(self.num_objects):
                p0, p1, p2 = torch.tensor(rng.uniform(0, 1, (3, 2)) * [W, H], dtype=torch.float32)  # (2,) each
                centre = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # (T, 2) quadratic Bezier
                side = rng.uniform(*MOTION_SIDE) * min(H, W) * rng.uniform(*MOTION_GROWTH) ** t[:, 0]  # (T,)
                angle = rng.uniform(-np.pi, np.pi) + rng.uniform(-MOTION_TURN, MOTION_TURN) * t[:, 0]  # (T,)
                colour = torch.tensor(rng.uniform(40, 255, 3) if self.tinted else [255.0] * 3, dtype=torch.float32)
                cutout = torch.from_numpy(self.cutouts[rng.integers(len(self.cutouts))])
                paste(frames[view], cutout, centre, side.float(), angle.float(), colour)
        return frames


# ============ no natural video (SMILE) ============
# SMILE (its Table 5) pretrains without any natural video: every clip is one static random image, repeated over
# the clip, with moving objects overlaid (MotionObjects; train.py turns them on for --dataset noise). The image
# here is coloured multi-scale noise: uniform random grids of 2x2 to 32x32 cells, upsampled bilinearly and
# summed with weights falling with the frequency, so it has structure at every scale but no objects.

NOISE_VERSION = 1  # bump when the generator changes
NOISE_DEFAULTS = dict(num_train=2000, num_val=100, num_frames=16, size=64)


def _noise_image(rng, size):
    """One static random image -> uint8 (S, S, 3)."""
    image = torch.zeros(1, 3, size, size)
    for octave, cells in enumerate((2, 4, 8, 16, 32)):
        grid = torch.from_numpy(rng.uniform(-1, 1, (1, 3, cells, cells)).astype(np.float32))
        image += 0.6 ** octave * F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    image = (image - image.mean()) / image.std()  # (1, 3, S, S), zero mean, unit spread
    return (128 + 50 * image[0]).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def noise_dataset(root=None, seed=0, **kwargs):
    """Generate (once) the no-natural-video set -> its root: one class ("noise"), every video a static random
    image repeated num_frames times (folder-per-class, read as --dataset noise). kwargs override NOISE_DEFAULTS;
    root defaults to $SIGMA_CACHE/noise-v<version>-seed<seed>. Same seed and sizes -> byte-identical files."""
    cfg = {**NOISE_DEFAULTS, **kwargs}
    params = dict(version=NOISE_VERSION, seed=seed, **cfg, dense_classes=["background"])

    def render(rng, split, i):
        frames = np.repeat(_noise_image(rng, cfg["size"])[None], cfg["num_frames"], 0)  # (T, S, S, 3)
        return 0, frames, np.zeros(frames.shape[:3], np.uint8), None  # no objects stored: no dense labels

    generate = lambda tmp: _write_set(tmp, seed, ["noise"], render, cfg["num_train"], cfg["num_val"], 0)
    return _cached(root, f"noise-v{NOISE_VERSION}-seed{seed}", params, generate)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="procedural", choices=["procedural", "fashion", "noise"], help="which set")
    parser.add_argument("--root", default=None, help="where to write (default: $SIGMA_CACHE/<set>-v*-seed*)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--fashion_source", default=None, help="fashion: 'full' (Debian's dataset-fashion-mnist, "
                        "torchvision's data/FashionMNIST/raw) or a folder of IDX files; default: the shipped subset")
    parser.add_argument("--labels", default="coarse", choices=["coarse", "fine"], help="fashion: 4 or 10 classes")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.set == "procedural":
        where = synthetic_dataset(args.root, args.seed)
    elif args.set == "noise":
        where = noise_dataset(args.root, args.seed)
    else:
        where = fashion_dataset(args.root, args.seed, args.fashion_source, labels=args.labels)
    print(f"{args.set} dataset at {where} ({time.perf_counter() - t0:.1f} s; cached runs take ~0 s)")
