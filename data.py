"""
Video data for SIGMA, on top of store.py (which reads frames off disk: a video file through PyAV, or an entry of
the prepared clip store): tube masks, clip sampling and augmentation, dataset layouts (Kinetics-400,
Something-Something v2, UCF101, HMDB51), the distributed-aware DataLoader. The built-in datasets that need no
download (synthetic.py) are read through the same layouts. The segmentation benchmarks' frames and masks (DAVIS,
YouTube-VOS) are read by eval_vos.py, the one script that uses them.

The clip store's two commands stand on both files, so they are at the end of this one; they run as
`python store.py --prepare ...` (writes a store) and `python store.py --bench` (clip loading in clips/s per CPU
core, from the original files and from each store codec). docs/store.md has the figures.

Conventions: a dataset's clip is uint8 (3, T, S, S) (a quarter of float32's bytes on the way to the GPU);
normalize() turns it into the model's float32 ImageNet-normalised input on the device. Frames on disk are decoded to
uint8 (T, H, W, 3) RGB (store.open_video); a tube mask is bool (B, t*h*w) in (t, h, w) row-major token order,
True = masked.

Where this reads from the released VideoMAE / SIGMA data pipeline it says so.
"""
import argparse
import csv
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

import store
# Video and decode_frames are not used here; callers (eval_linear.py, the tests) import them from data too.
from store import VIDEO_EXTENSIONS, Video, decode_frames, open_video  # noqa: F401
from synthetic import SYNTHETIC_CLASSES, MotionObjects, fashion_dataset, noise_dataset, synthetic_dataset  # noqa: F401

# ============ defaults ============
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MULTISCALE_SCALES = (1, 0.875, 0.75, 0.66)  # crop side / short side, released GroupMultiScaleCrop
# The 13 fixed crop positions of the released (TSN) multi-scale crop, as (x, y) multiples of a quarter of the
# free space: 4 corners, centre, 4 edge centres, 4 "quarter" positions between centre and corners.
FIXED_CROP_GRID = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2),
                   (0, 2), (4, 2), (2, 4), (2, 0),
                   (1, 1), (3, 1), (1, 3), (3, 3))
# Temporal stride between sampled frames (released pretraining scripts: 4 for K400, 2 for SSv2). Only a default.
DEFAULT_STRIDE = {"k400": 4, "ssv2": 2, "ucf101": 4, "hmdb51": 4, "list": 4, "synthetic": 2, "fashion": 2, "noise": 2}
# Judge the unreadable fraction only after this many distinct videos: a healthy set (~1% broken) then shows
# >10% bad with probability ~1e-8, while a wrong --data_root (everything broken) fails within 100 reads.
BAD_CHECK_AFTER = 100

# ============ tube masking ============


def tube_mask(batch_size, grid, ratio=0.9, generator=None, device=None):
    """VideoMAE tube masking (TubeMaskingGenerator of the released `masking_generator.py`).
    grid = (t, h, w) token grid; returns bool (B, t*h*w), True = masked.

    Each clip masks exactly int(ratio * h * w) of its h*w spatial positions, the same ones in all t temporal
    slices, so every clip has the same number of visible tokens. Random ranks via argsort of uniform noise: a
    uniformly random subset, vectorised over the batch, reproducible given `generator` (drawn on the
    generator's device, then moved to `device`).
    """
    t, h, w = grid
    num_masked = int(ratio * h * w)  # int(), as the released TubeMaskingGenerator: 0.9 * 196 -> 176
    noise = torch.rand(batch_size, h * w, generator=generator,
                       device=generator.device if generator is not None else device)  # (B, h*w)
    masked = noise.argsort(dim=1)[:, :num_masked]  # (B, num_masked) spatial positions
    spatial = torch.zeros_like(noise, dtype=torch.bool).scatter_(1, masked, True)  # (B, h*w)
    return spatial.repeat(1, t).to(device)  # (B, t*h*w): token ti*h*w + j is spatial position j


# ============ augmentation ============

_NORM_SCALE = 1.0 / (255.0 * torch.tensor(IMAGENET_STD).view(3, 1, 1, 1))  # uint8 -> normalised in one mul+add
_NORM_SHIFT = -torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1) / torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)


def multiscale_crop_box(height, width, size, scales=MULTISCALE_SCALES, generator=None):
    """The released multi-scale crop (GroupMultiScaleCrop, released `transforms.py`) -> box (top, left, h, w).

    Crop sides are scale * short side; height and width scales are drawn as one of the pairs whose indices in
    `scales` differ by at most one (10 pairs for 4 scales, each equally likely); the box sits at one of the 13
    FIXED_CROP_GRID positions. Like the release, a side within 2 px of `size` snaps to `size` (no needless
    resampling), but here only when that still fits in the frame.
    """
    short = min(height, width)
    sides = [size if abs(int(short * s) - size) < 3 and size <= short else int(short * s) for s in scales]
    pairs = [(i, j) for i in range(len(sides)) for j in range(len(sides)) if abs(i - j) <= 1]
    i, j = pairs[torch.randint(len(pairs), (), generator=generator)]
    crop_h, crop_w = sides[i], sides[j]
    gx, gy = FIXED_CROP_GRID[torch.randint(len(FIXED_CROP_GRID), (), generator=generator)]
    return gy * ((height - crop_h) // 4), gx * ((width - crop_w) // 4), crop_h, crop_w


def crop_resize(frames, box, size, flip=False):
    """uint8 (T, H, W, 3) frames, box (top, left, h, w) -> uint8 (3, T, size, size); normalize() finishes it.

    Crop on uint8 (a view, no copy), resize the whole stack in one call. Bilinear with antialiasing matches the
    released code's PIL bilinear resize when shrinking; on uint8 channels-last input torch runs a dedicated
    kernel ~10x faster than on float (measured). The clip stays uint8 until it is on the device: a quarter of
    the bytes of float32 through the workers' shared memory, the pinned copy and the host-to-device copy.
    """
    top, left, h, w = box
    x = frames[:, top:top + h, left:left + w].permute(0, 3, 1, 2)  # (T, 3, h, w) uint8, channels-last view
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)  # (T, 3, S, S)
    if flip:
        x = x.flip(-1)
    return x.permute(1, 0, 2, 3).contiguous()  # (3, T, S, S) uint8


@functools.lru_cache(maxsize=None)
def _norm_constants(device):
    return _NORM_SCALE.to(device), _NORM_SHIFT.to(device)  # copied to a GPU once, not at every batch


def normalize(clips):
    """uint8 clips (..., 3, T, H, W), on any device -> float32 ImageNet-normalised, (x / 255 - mean) / std as
    one multiply-add per value. Run it where the model runs, after the copy (train.py, the evaluation scripts)."""
    if clips.dtype != torch.uint8:  # e.g. a clip normalised twice
        raise TypeError(f"normalize() expects uint8 clips (0-255, as the datasets return them), got {clips.dtype}")
    scale, shift = _norm_constants(clips.device)
    return clips.float().mul_(scale).add_(shift)


def _evenly_spaced(count, room):
    """count integer offsets in [0, room], first to last; a single one is centred. LongTensor (count,)."""
    if count == 1:
        return torch.tensor([room // 2])
    return torch.arange(count) * room // (count - 1)


# How a clip's frames are chosen (VideoClips sampling=): 'stride' = T frames `stride` apart (VideoMAE pretraining
# and the default); 'segments' = one frame from each of T equal segments of the whole video, the released SSv2
# fine-tuning / linear-probe loader (segment_positions).
SAMPLINGS = ("stride", "segments")


def segment_positions(num_frames, num_segments, train, num_clips=1, generator=None):
    """Frame positions of the released SSv2 loader's TSN-style sampling (VideoMAE / SIGMA ssv2.py): the video
    is cut into num_segments equal segments and each clip takes one frame per segment, so it spans the whole
    video whatever its length. -> LongTensor (1, T) for train, (num_clips, T) for eval (T = num_segments).

    train: segment length avg = num_frames // T, frame x*avg + a uniform draw from [0, avg) for segment x (the
      last num_frames - T*avg frames are never drawn, as in the release). A video with fewer than T frames:
      the release takes frame 0 T times (a still clip); here every frame in order, floor(x * num_frames / T).
    eval: tick = num_frames / T (a float); clip k takes int(tick * x + offset_k). The release tests 2 clips with
      offsets 0 and tick/2 (its sorted 2T indices taken every other one); here offset_k = k * tick / num_clips,
      which is exactly that for 2 clips, and a single clip takes the segment centres (tick/2), as the
      release's 'validation' mode.
    """
    x = torch.arange(num_segments)
    if train:
        avg = num_frames // num_segments
        if avg == 0:
            return (x * num_frames // num_segments)[None]  # (1, T)
        return (x * avg + torch.randint(avg, (num_segments,), generator=generator))[None]  # (1, T)
    tick = num_frames / num_segments
    offsets = torch.tensor([tick / 2] if num_clips == 1 else [k * tick / num_clips for k in range(num_clips)],
                           dtype=torch.float64)  # (C,), float64 = Python floats, so int() rounds as the release
    return (tick * x.double()[None] + offsets[:, None]).long()  # (C, T), truncation = int() for positives


# ============ clip dataset ============


class VideoClips(torch.utils.data.Dataset):
    """Clips from a list of (video path, label) -> (clip uint8 (3, T, S, S), label int); normalize() on the device.

    Sampling (the released pretraining loader), sampling='stride': T = num_frames frames `stride` apart;
    train: the start is uniform over every start that fits, eval: the clip is centred. A video shorter than
    (T-1)*stride+1 frames repeats its last frame. sampling='segments' (the released SSv2 loader): one frame
    from each of T equal segments of the whole video, random within its segment for train, fixed offsets for
    eval (segment_positions).
    train=True: multi-scale crop (MULTISCALE_SCALES x FIXED_CROP_GRID) resized to size x size, horizontal flip
    only if flip=True (linear-probe training, the paper's Table 9 protocol), and no colour jitter unless
    color_jitter > 0 (not in the released recipes; color_jitter_views). train=False: the central short-side
    square, resized (= resize short side to S, then centre crop S).

    Several clips per video (one decode serves them all):
    - repeats=R (train, "repeated sampling"): R clips with independent starts and crops.
    - num_clips x num_crops (eval, multi-view linear probe): temporal clip k starts at k * room / (num_clips-1)
      (room = frames - clip span; a single clip is centred; 'segments': offset k / num_clips of a segment),
      spatial crop j is the short-side square at
      j * (long - short) / (num_crops-1) along the long side. View index = k * num_crops + j.
    With V = R or num_clips*num_crops > 1 an item is (clip (V, 3, T, S, S), label LongTensor (V,)); after
    batching train.py uses clips.flatten(0, 1) -> (B*V, 3, T, S, S) and labels.flatten(); eval averages the
    V predictions of a video: logits.view(B, V, -1).mean(1).

    Bad input: a file that cannot be opened, has no decodable frame or cannot be cropped (a 1-pixel-high video)
    is reported once on stderr with its path and replaced by the next sample (deterministic: index + 1, usually
    the same class in sorted layouts). Once BAD_CHECK_AFTER distinct videos (or the whole set) were tried, more
    than max_bad_fraction of them unreadable raises RuntimeError. Counts are per process: each DataLoader worker
    judges the videos it read. Videos listed in `bad_list` are skipped without a retry.
    Randomness (starts, segment positions, crops, flips) comes from a generator seeded by (seed, epoch, index)
    (_generator): an item is the same whichever process or DataLoader worker reads it, so the clips of an epoch
    do not depend on num_workers. make_loader sets `seed`, set_epoch() sets `epoch`. decode_threads: FFmpeg
    threads per video, 1 for DataLoader workers (they fill the cores), 0 = all cores for num_workers=0.
    """

    def __init__(self, samples, classes=None, num_frames=16, stride=4, size=224, train=True, flip=False,
                 repeats=1, num_clips=1, num_crops=1, max_bad_fraction=0.1, decode_threads=1, sampling="stride",
                 color_jitter=0.0):
        if sampling not in SAMPLINGS:
            raise ValueError(f"VideoClips: sampling={sampling!r}; choose one of {SAMPLINGS}")
        self.sampling = sampling
        self.samples = [(str(path), int(label)) for path, label in samples]
        if not self.samples:
            raise ValueError("VideoClips: no samples (an empty list or a layout that matched no video files)")
        if (train and num_clips * num_crops > 1) or (not train and repeats > 1):
            raise ValueError("repeats is for train=True; num_clips/num_crops (multi-view) for train=False")
        self.classes = list(classes) if classes is not None else [str(i) for i in
                                                                  range(max(y for _, y in self.samples) + 1)]
        self.num_frames, self.stride, self.size, self.train, self.flip = num_frames, stride, size, train, flip
        self.num_clips, self.num_crops, self.decode_threads = num_clips, num_crops, decode_threads
        self.color_jitter = color_jitter
        self.views = repeats if train else num_clips * num_crops
        self.span = (num_frames - 1) * stride + 1  # frames covered by one clip
        self.max_bad_fraction, self.bad, self.seen = max_bad_fraction, set(), set()  # this process's judgement
        self.listed = set()  # indices of the videos listed in bad_list (found unreadable by any process)
        self.bad_list = None
        # Optional: callable(frames uint8 (V, T, H, W, 3), index, epoch) -> frames, applied before the crop, e.g.
        # synthetic.MotionObjects; `epoch` is set by set_epoch(), so its randomness is (seed, epoch, index).
        self.overlay, self.epoch, self.seed = None, 0, 0

    @property
    def bad_list(self):
        """Optional path of the run's list of skipped videos, one path a line (train.py: <out>/bad_videos.txt).
        Every process appends the videos it finds unreadable. The listed ones (before a restart, or by the
        workers of a previous epoch) are read when the path or the epoch is set and skipped silently."""
        return self._bad_list

    @bad_list.setter
    def bad_list(self, path):
        self._bad_list = path
        self._read_bad_list()

    @property
    def epoch(self):
        return self._epoch

    @epoch.setter
    def epoch(self, epoch):
        # set_epoch() sets it in the main process before the epoch's workers start as copies of this object: the
        # list is re-read now so that they skip what the previous epoch's workers listed.
        self._epoch = epoch
        self._read_bad_list()

    def _read_bad_list(self):
        if self._bad_list and Path(self._bad_list).is_file():
            listed = set(Path(self._bad_list).read_text().splitlines())  # a line being written does not match
            self.listed = {i for i, (path, _) in enumerate(self.samples) if path in listed}

    def _generator(self, index):
        """The random stream of item `index` in this epoch, seeded by (seed, epoch, index) only."""
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for _ in range(len(self)):
            if index not in self.bad and index not in self.listed:
                self.seen.add(index)
                try:
                    clips = self._load(self.samples[index][0], index)  # (V, 3, T, S, S)
                    break
                except (av.FFmpegError, OSError, ValueError) as err:  # corrupt, truncated, empty, not a video
                    self._skip(index, err)
            index = (index + 1) % len(self)
        else:
            raise RuntimeError("VideoClips: no readable video in the dataset")
        self._check_bad_fraction()
        label = self.samples[index][1]
        return (clips[0], label) if self.views == 1 else (clips, torch.full((self.views,), label))

    def _skip(self, index, err):
        self.bad.add(index)
        if self.bad_list:  # one short O_APPEND write per line: safe from several worker processes at once
            with open(self.bad_list, "a") as f:
                f.write(self.samples[index][0] + "\n")
        print(f"data.py: skipping unreadable video {self.samples[index][0]} ({type(err).__name__}: {err})",
              file=sys.stderr)

    def _check_bad_fraction(self):
        if len(self.seen) >= min(BAD_CHECK_AFTER, len(self)) and \
                len(self.bad) > self.max_bad_fraction * len(self.seen):
            raise RuntimeError(
                f"{len(self.bad)} of the {len(self.seen)} videos this process tried are unreadable (more than "
                f"max_bad_fraction={self.max_bad_fraction}); see the warnings above. Check --data_root and the "
                f"download, or raise max_bad_fraction.")

    def _positions(self, num_frames, generator=None):
        """Frame positions of every view of a video with num_frames frames -> LongTensor (V, T). generator: the
        item's random stream (_generator; None = torch's global RNG)."""
        if self.sampling == "segments":  # the released SSv2 loader (segment_positions)
            if self.train:
                return torch.cat([segment_positions(num_frames, self.num_frames, True, generator=generator)
                                  for _ in range(self.views)])
            return segment_positions(num_frames, self.num_frames, False, self.num_clips).repeat_interleave(
                self.num_crops, 0)  # (num_clips * num_crops, T)
        room = max(num_frames - self.span, 0)  # the last start at which a whole stride clip fits
        if self.train:
            starts = torch.randint(0, room + 1, (self.views,), generator=generator)  # (V,)
        else:
            starts = _evenly_spaced(self.num_clips, room).repeat_interleave(self.num_crops)  # (V,)
        return starts[:, None] + self.stride * torch.arange(self.num_frames)  # (V, T)

    def _load(self, path, index=0):
        generator = self._generator(index)  # the loaded video's index: a replacement draws as its own item does
        with open_video(path, self.decode_threads) as video:
            positions = self._positions(video.num_frames, generator)  # (V, T); clamped in read()
            frames = video.read(positions.flatten())  # (V*T, H, W, 3) uint8, one decode for all views
        frames = frames.view(self.views, self.num_frames, *frames.shape[1:])  # (V, T, H, W, 3)
        if self.overlay is not None:
            frames = self.overlay(frames, index, self.epoch)  # (V, T, H, W, 3), before crop and masking
        height, width = frames.shape[2:4]
        if self.train:
            boxes = [multiscale_crop_box(height, width, self.size, generator=generator) for _ in range(self.views)]
            flips = [self.flip and bool(torch.rand((), generator=generator) < 0.5) for _ in range(self.views)]
        else:
            short = min(height, width)
            offsets = _evenly_spaced(self.num_crops, max(height, width) - short).tolist()
            crops = [(o, 0, short, short) if height > width else (0, o, short, short) for o in offsets]
            boxes, flips = crops * self.num_clips, [False] * self.views
        try:
            clips = torch.stack([crop_resize(f, b, self.size, flip)
                                 for f, b, flip in zip(frames, boxes, flips)])  # (V, 3, T, S, S) uint8
        except RuntimeError as err:  # e.g. a 1-pixel side: the multi-scale crop is empty and the resize refuses it
            raise ValueError(f"{path}: its {width}x{height} frames cannot be cropped to {self.size} ({err})") from err
        if self.train and self.color_jitter:  # drawn last: with it off, every other draw is as before
            clips = color_jitter_views(clips, self.color_jitter, generator)
        return clips


def color_jitter_views(clips, strength, generator):
    """An independent colour change per view, the same for every frame of a view: brightness, contrast and
    saturation factors uniform in [1 - strength, 1 + strength], hue shifted by up to +-strength / 4 of the colour
    circle (SimCLR's jitter at strength 0.4). uint8 (V, 3, T, S, S) -> uint8 (V, 3, T, S, S).

    Two views of one video otherwise share their colours: a clip-level term that matches views (--clip_loss) could
    match them by tint alone. torchvision's functional ops, with factors drawn from the item's generator (the
    transforms' own draws use the global RNG, which DataLoader workers do not make reproducible)."""
    V = len(clips)
    factors = 1 + strength * (2 * torch.rand(V, 3, generator=generator) - 1)  # (V, 3) brightness, contrast, sat.
    hues = strength / 4 * (2 * torch.rand(V, generator=generator) - 1)  # (V,)
    out = []
    for clip, (b, c, s), h in zip(clips.transpose(1, 2), factors.tolist(), hues.tolist()):  # clip: (T, 3, S, S)
        clip = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(clip, b), c), s), h)
        out.append(clip.transpose(0, 1))
    return torch.stack(out)  # (V, 3, T, S, S)


# ============ dataset layouts ============

LAYOUTS = {
    "k400": "<root>/annotations/<split>.csv or <root>/<split>.csv, either the official Kinetics CSV "
            "(label,youtube_id,time_start,time_end,split) with videos <root>/<split>/[<class>/]"
            "{youtube_id}_{start:06d}_{end:06d}.mp4, or a VideoMAE list ('<path> <label>' per line); "
            "or folder-per-class <root>/<split>/<class>/*.mp4",
    "ssv2": "<root>/20bn-something-something-v2/<id>.webm and labels.json, train.json, validation.json "
            "in <root>/ or <root>/labels/",
    "ucf101": "<root>/UCF-101/<Class>/v_*.avi and <root>/ucfTrainTestlist/{classInd.txt, trainlist0N.txt, "
              "testlist0N.txt}",
    "hmdb51": "<root>/<class>/*.avi and <root>/testTrainMulti_7030_splits/<class>_test_splitN.txt "
              "('<file> <0|1|2>' lines, 1 = train, 2 = test)",
    "list": "<root>/<split>.csv or <root>/<split>.txt, or root = the list file itself, with '<path> <label>' "
            "lines, paths relative to the folder (<root>) or absolute",
    "synthetic": "<root>/{train,val}/<class>/*.mp4, generated by synthetic_dataset() on first use",
    "fashion": "<root>/{train,val}/<class>/*.mp4 (+ <root>/davis/ for eval_vos.py), generated by fashion_dataset() "
               "on first use",
    "noise": "<root>/{train,val}/noise/*.mp4 (static random images, SMILE's no-natural-video set), generated by "
             "noise_dataset() on first use; pretrain on it with moving objects (--motion_objects)",
}


def _layout_error(name, path, problem):
    return FileNotFoundError(f"{name}: {problem}: {path}\n  expected layout: {LAYOUTS[name]}\n"
                             f"  point --data_root at the folder holding this layout (or fix the files).")


def _existing(name, samples, where):
    """Keep samples whose file exists; report how many are missing (downloads always lose a few)."""
    found = [(p, y) for p, y in samples if Path(p).is_file()]
    if not found:
        raise _layout_error(name, where, f"none of the {len(samples)} listed videos exist")
    if len(found) < len(samples):
        missing = next(p for p, _ in samples if not Path(p).is_file())
        print(f"data.py: {name}: {len(samples) - len(found)} of {len(samples)} listed videos are missing "
              f"(e.g. {missing}); using the other {len(found)}", file=sys.stderr)
    return found


def _folder_per_class(name, split_dir):
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [(p, y) for y, c in enumerate(classes) for p in sorted((split_dir / c).iterdir())
               if p.suffix.lower() in VIDEO_EXTENSIONS]
    if not samples:
        raise _layout_error(name, split_dir, "no <class>/<video> files")
    return samples, classes


def _list_file(name, list_path, root):
    samples = []
    for number, line in enumerate(list_path.read_text().splitlines(), 1):
        if line.strip():
            path, _, label = line.strip().rpartition(" ")  # paths may contain spaces, labels cannot
            if not path or not label.lstrip("-").isdigit():
                raise _layout_error(name, list_path, f"line {number} is not '<path> <integer label>': {line!r}")
            samples.append((root / path.strip(), int(label)))  # an absolute path stays absolute
    return _existing(name, samples, list_path), None


def _kinetics(root, split, name="k400"):
    for csv_path in (root / "annotations" / f"{split}.csv", root / f"{split}.csv"):
        if not csv_path.is_file():
            continue
        text = csv_path.read_text()
        if not text.startswith("label,youtube_id"):
            return _list_file(name, csv_path, root)  # VideoMAE names its list files train.csv too
        rows = list(csv.DictReader(text.splitlines()))
        # Class ids from the train CSV when present, so that every split shares one mapping.
        train_csv = csv_path.with_name("train.csv")
        class_rows = csv.DictReader(train_csv.read_text().splitlines()) if train_csv.is_file() else rows
        classes = sorted({r["label"] for r in class_rows})
        files = {p.stem: p for p in (root / split).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS}
        ids = {c: i for i, c in enumerate(classes)}
        names = [f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
                 for r in rows]
        samples = [(files.get(n, root / split / f"{n}.mp4"), ids[r["label"]]) for n, r in zip(names, rows)]
        return _existing(name, samples, root / split), classes
    if (root / split).is_dir():
        return _folder_per_class(name, root / split)
    raise _layout_error(name, root, f"no {split}.csv and no {split}/ folder")


def _ssv2(root, split):
    labels_dir = root / "labels" if (root / "labels" / "labels.json").is_file() else root
    json_name = {"train": "train.json", "val": "validation.json", "validation": "validation.json"}.get(split)
    if json_name is None or not (labels_dir / json_name).is_file() or not (labels_dir / "labels.json").is_file():
        raise _layout_error("ssv2", labels_dir, f"no labels.json / {json_name or split + ' (use train or val)'}")
    ids = {name: int(i) for name, i in json.loads((labels_dir / "labels.json").read_text()).items()}
    classes = sorted(ids, key=ids.get)
    videos = root / "20bn-something-something-v2"
    # The label is the template with its "[something]" brackets removed.
    samples = [(videos / f"{e['id']}.webm", ids[e["template"].replace("[", "").replace("]", "")])
               for e in json.loads((labels_dir / json_name).read_text())]
    return _existing("ssv2", samples, videos), classes


def _ucf101(root, split, fold):
    lists = root / "ucfTrainTestlist"
    name = f"{'trainlist' if split == 'train' else 'testlist'}{fold:02d}.txt"  # 'val' and 'test': the test list
    if not (lists / "classInd.txt").is_file() or not (lists / name).is_file():
        raise _layout_error("ucf101", lists, f"no classInd.txt / {name}")
    classes = [line.split()[1] for line in (lists / "classInd.txt").read_text().splitlines() if line.strip()]
    ids = {c: i for i, c in enumerate(classes)}  # classInd is 1-based; labels here are 0-based
    rel = [line.split()[0] for line in (lists / name).read_text().splitlines() if line.strip()]
    samples = [(root / "UCF-101" / r, ids[r.split("/")[0]]) for r in rel]  # test lists carry no label column
    return _existing("ucf101", samples, root / "UCF-101"), classes


def _hmdb51(root, split, fold):
    suffix = f"_test_split{fold}.txt"
    split_files = sorted((root / "testTrainMulti_7030_splits").glob(f"*{suffix}"))
    if not split_files:
        raise _layout_error("hmdb51", root / "testTrainMulti_7030_splits", f"no *{suffix} files")
    classes = [f.name[:-len(suffix)] for f in split_files]
    keep = "1" if split == "train" else "2"  # 1 = train, 2 = test ('val' and 'test'), 0 = unused
    samples = [(root / c / line.split()[0], y) for y, (c, f) in enumerate(zip(classes, split_files))
               for line in f.read_text().splitlines() if line.split()[1:2] == [keep]]
    return _existing("hmdb51", samples, root), classes


def build_video_dataset(name, root, split="train", fold=1, **clip_kwargs):
    """A VideoClips over a dataset in its native layout (LAYOUTS), parsed and validated here.

    name: 'k400' | 'ssv2' | 'ucf101' | 'hmdb51' | 'list' | 'synthetic' | 'fashion'. split: 'train' or 'val' ('val' and
    'test' both mean the official test list for UCF101 / HMDB51, which have no validation split); fold: the
    UCF101 / HMDB51 split number (1-3). clip_kwargs go to VideoClips; stride (None or absent) defaults to
    DEFAULT_STRIDE[name].
    'synthetic' / 'fashion' with root=None generate (once) and use the cached default set. The result has .classes and
    .num_classes (class ids follow the official class lists / sorted names).
    """
    if name not in LAYOUTS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(LAYOUTS)}")
    if clip_kwargs.get("stride") is None:
        clip_kwargs["stride"] = DEFAULT_STRIDE[name]
    if name in ("synthetic", "fashion", "noise") and (root is None or not Path(root).expanduser().exists()):
        # generated on first use (default sizes); an existing root is used as is
        root = {"synthetic": synthetic_dataset, "fashion": fashion_dataset, "noise": noise_dataset}[name](root)
    root = Path(root).expanduser()
    if name == "list" and root.is_file():  # root may be the list file itself; its paths are relative to its folder
        return VideoClips(*_list_file(name, root, root.parent), **clip_kwargs)
    if not root.is_dir():
        raise _layout_error(name, root, "data root is a file, not a folder" if root.exists() else
                            "data root does not exist")
    store.check_root(root)  # a prepared store (python store.py --prepare) of another format version is refused
    if name in ("k400", "synthetic", "fashion", "noise"):
        samples, classes = _kinetics(root, split, name)  # the built-in sets: folder-per-class, a K400 layout
    elif name == "ssv2":
        samples, classes = _ssv2(root, split)
    elif name == "ucf101":
        samples, classes = _ucf101(root, split, fold)
    elif name == "hmdb51":
        samples, classes = _hmdb51(root, split, fold)
    else:
        list_path = next((p for p in (root / f"{split}.csv", root / f"{split}.txt") if p.is_file()), None)
        if list_path is None:
            raise _layout_error(name, root, f"no list file {split}.csv / {split}.txt")
        samples, classes = _list_file(name, list_path, root)
    return VideoClips(samples, classes, **clip_kwargs)


# ============ loader ============


def make_loader(dataset, batch_size, num_workers=0, shuffle=True, drop_last=True, seed=0, distributed=None,
                timeout=0):
    """A DataLoader set up for SIGMA training and evaluation.

    distributed (None = auto: torch.distributed initialised): a DistributedSampler gives each rank its own
    share, padded so every rank holds the same number of samples; with drop_last=True (pretraining) every rank
    then steps the same number of full batches, which SIGMA needs because Sinkhorn all-reduces inside the
    forward pass (a rank with one batch more would hang).

    Randomness, for exact resumption: call set_epoch(loader, epoch) before each epoch. It reseeds the loader's
    generator from (seed, epoch, rank); that generator draws the shuffle order and each worker's base seed
    (worker torch / `random` seed = base seed + worker id). A VideoClips draws its augmentations from (seed,
    epoch, index) instead (VideoClips._generator; `dataset.seed` is set here), so its batches are the same for
    any num_workers and an epoch replays identically after a restart, even with other workers. Workers are
    started afresh every epoch (not persistent: a persistent worker would carry its RNG state over from the
    previous epoch, and its copy of the dataset would miss the epoch); on Linux that costs a fork per worker per
    epoch. Memory is pinned only when CUDA is there to use it. timeout (seconds, 0 = wait forever): with
    workers, a batch that takes longer raises RuntimeError("DataLoader timed out ...").
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed) if distributed else None
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
        generator=torch.Generator(), timeout=timeout if num_workers > 0 else 0)
    loader.seed, loader.rank = seed, dist.get_rank() if distributed else 0
    dataset.seed = seed  # VideoClips: each item's randomness is (seed, epoch, index)
    set_epoch(loader, 0)
    return loader


def to_device(tensor, device):
    """A host tensor on `device`. To a GPU it travels from pinned (page-locked) memory with non_blocking=True: the
    copy is queued on the current stream and the host goes on (from pageable memory the host would wait for the
    copy). On CPU the tensor itself."""
    if device.type != "cuda":
        return tensor
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def prefetch(batches, device):
    """Yield the tensors of the iterator `batches` on `device`, the copy of the next one overlapping the
    computation on the current one.

    On CUDA the next tensor's host-to-device copy (from pinned memory, non_blocking) is queued on a side stream
    as soon as the current one is handed out, so it runs while the GPU computes the current step instead of in
    front of it on the compute stream. Before a tensor is used the compute stream waits for the side stream
    (on the GPU, not the host), and record_stream keeps the allocator from reusing its memory while the
    compute stream still reads it. On CPU: the tensors themselves (nothing to copy).
    """
    if device.type != "cuda":
        yield from batches
        return
    side, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def start_copy(batch):
        if batch is None:  # the iterator is exhausted
            return None
        with torch.cuda.stream(side):
            return to_device(batch, device)

    ahead = start_copy(next(batches, None))
    while ahead is not None:
        compute.wait_stream(side)
        ahead.record_stream(compute)
        current, ahead = ahead, start_copy(next(batches, None))
        yield current


def set_epoch(loader, epoch):
    """Start `epoch`: a new shuffle (also across ranks), randomness derived from (seed, epoch, rank) for the
    loader and from (seed, epoch, index) for each VideoClips item."""
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed((loader.seed * 1_000_003 + epoch) * 1009 + loader.rank)
    loader.dataset.epoch = epoch  # read by VideoClips (workers start afresh each epoch and copy it)


# ============ the clip store's commands (python store.py ...) ============
# store.py knows video files and store entries, not datasets: preparing a dataset needs its layout and the
# benchmark times VideoClips, so both commands sit on this file, and `python store.py` hands over to store_main.

MOTION_OBJECTS = 2  # --bench: objects per clip in the overlay row (SMILE's setting)


def prepare_dataset(name, src, out, codec="jpeg", workers=None, short_side=None, patch=store.KMEANS_PATCH,
                    codebook_size=store.KMEANS_SIZE):
    """Write a clip store of the dataset `name` at `src` into `out` (store.prepare_store: the folder mirrored,
    every video an entry, a kmeans codebook learned on the train split); returns the list of unreadable videos.

    The layout is parsed on the source first and on the store at the end, so build_video_dataset(name, out)
    reads the store as it reads the source. Limitation: a list file's absolute paths are not mirrored (they
    keep pointing at the original videos).
    """
    if src is None and name in ("synthetic", "noise"):  # the built-in sets: generated (once) into the cache
        src = (synthetic_dataset if name == "synthetic" else noise_dataset)(None)
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if not src.is_dir():
        raise ValueError(f"--data_root {src}: give the dataset's folder to --prepare (a list file's folder)")
    if src == out or src in out.parents:
        raise ValueError(f"--out {out} must lie outside --data_root {src}")
    splits = {}  # the splits the source layout parses: checked again on the store at the end
    for split in ("train", "val"):
        try:
            splits[split] = build_video_dataset(name, src, split)
        except FileNotFoundError as err:
            problem = err
    if not splits:
        raise problem
    sample = [p for p, _ in next(iter(splits.values())).samples]  # the train split when it parses
    prepared, kept, bad = store.prepare_store(name, src, out, codec, workers, short_side, patch, codebook_size,
                                              sample)
    for split in splits:
        build_video_dataset(name, out, split)  # the store parses as the source did
    print(f"store.py: {prepared} videos prepared, {kept} already done, {len(bad)} unreadable "
          f"(listed in {out / 'unreadable.txt'}); {name} store at {out}")
    return bad


# ============ the clip-loading benchmark ============


def bench(path, iters, tmp, codebook):
    """Clips/s on one core, same transform: the original file, its store entries (the kmeans one with the
    codebook file `codebook`), 'decode every frame to RGB, then index', and the transform alone (the floor of
    any store); plus each store's bytes per video-hour, PSNR and preparation cost."""
    torch.set_num_threads(1)  # one torch thread + threads=1 in FFmpeg (decode_threads / thread_count)
    T, stride, size = 16, 4, 224

    def naive():
        with av.open(str(path), metadata_errors="ignore") as c:
            c.streams.video[0].codec_context.thread_count = 1
            frames = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
        start = torch.randint(0, max(len(frames) - (T - 1) * stride, 1), ())
        clip = frames[(start + stride * torch.arange(T)).clamp(max=len(frames) - 1)]  # (T, H, W, 3)
        box = multiscale_crop_box(*clip.shape[1:3], size)
        return crop_resize(clip, box, size)[None]  # uint8, as a worker hands it over

    with av.open(str(path), metadata_errors="ignore") as c:
        fps = float(c.streams.video[0].average_rate or 25)
    with Video(path) as video:
        hours = video.num_frames / fps / 3600
        decoded = video.read(range(T))  # (T, H, W, 3): the input of the transform-only row

    def transform_only():
        return crop_resize(decoded, multiscale_crop_box(*decoded.shape[1:3], size), size)

    motion = MotionObjects(MOTION_OBJECTS)  # SMILE's overlay (docs/motion.md), on the decoded frames
    rows, extra = [("naive: decode all to RGB, index", 1, naive),
                   ("transform only (decoded frames)", 1, transform_only),
                   (f"{MOTION_OBJECTS} motion objects only", 1, lambda: motion(decoded[None], 0, 0))], {}
    for codec in store.CODECS:
        t0 = time.perf_counter()
        entry = store.prepare_video(path, Path(tmp) / codec, codec, codebook=codebook if codec == "kmeans" else None)
        with store.StoredVideo(entry) as sv:
            worst, mean = sv.header["min_psnr"], sv.header.get("mean_psnr")
            extra[entry] = (f"{entry.stat().st_size / hours / 1e9:6.2f} GB/video-h (source file "
                            f"{path.stat().st_size / hours / 1e9:.2f}), worst frame "
                            f"{'exact' if worst is None else f'{worst:.1f} dB PSNR'}"
                            f"{'' if mean is None else f', mean {mean:.1f} dB'}, "
                            f"prepared in {time.perf_counter() - t0:.1f} s")
    sources = [("original", path)] + [(f"store {codec}", Path(tmp) / codec / path.name) for codec in store.CODECS]
    for name, p in sources:  # decoding alone: the clip's frames, no transform
        ds = VideoClips([(p, 0)], num_frames=T, stride=stride, size=size, train=True)
        rows.append((f"{name}, frames only", 1, lambda ds=ds, p=p: _frames(p, ds)))
    for repeats in (1, 4):
        for name, p in sources:
            ds = VideoClips([(p, 0)], num_frames=T, stride=stride, size=size, train=True, repeats=repeats)
            rows.append((f"{name}, repeats={repeats}", repeats, lambda ds=ds: ds._load(ds.samples[0][0])))
    times = _time_rows(rows, iters)
    rounds = len(next(iter(times.values())))
    print(f"{path.name}: {T} frames, stride {stride}, multi-scale crop -> {size}x{size}, 1 thread, CPU time, "
          f"best / median of {rounds} interleaved rounds")
    print(f"{'method':36s} {'CPU ms/call':>15s} {'clips/s/core':>13s} {'vs original':>12s}")
    base = {}
    for name, repeats, _ in rows:
        best, median = min(times[name]), sorted(times[name])[rounds // 2]
        rate = repeats * 1e3 / best
        kind = "frames" if name.endswith("frames only") else repeats
        if name.startswith("original"):
            base[kind] = rate
        vs = f"{rate / base[kind]:11.1f}x" if kind in base else ""
        print(f"{name:36s} {best:7.2f} / {median:5.1f} {rate:13.1f} {vs:>12s}")
    for entry, text in extra.items():
        print(f"store {entry.parent.name:9s}: {text}")
    share = min(times[f"{MOTION_OBJECTS} motion objects only"]) / min(times["original, repeats=1"])
    print(f"motion objects: {MOTION_OBJECTS} per clip cost {100 * share:.1f}% of the original file's clip (before the "
          f"crop to {size}: at {decoded.shape[2]}x{decoded.shape[1]})")


def _frames(path, ds):
    """One clip's frames, uint8 (T, H, W, 3), as VideoClips reads them (same positions), without the transform."""
    with open_video(path) as video:
        return video.read(ds._positions(video.num_frames).flatten())


def _time_rows(rows, iters):
    """{row name: [CPU ms per call, one per round]}. CPU time of this (single-threaded) process, which other
    processes' load barely changes, unlike wall time; rounds interleave the rows so that what load remains
    hits all alike."""
    rounds, calls = max(iters // 4, 1), min(iters, 4)
    times = {name: [] for name, _, _ in rows}
    for _, _, fn in rows:
        fn()  # warm-up
    for _ in range(rounds):
        for name, _, fn in rows:
            t0 = time.process_time()
            for _ in range(calls):
                fn()
            times[name].append((time.process_time() - t0) / calls * 1e3)
    return times


def store_main(argv=None):
    """`python store.py ...`: the clip store's commands (store.py hands over to this)."""
    parser = argparse.ArgumentParser(description=store.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", nargs="*", metavar="VIDEO",
                        help="benchmark clip loading on VIDEO(s) (default: the K400 test clip, 340x256 H.264)")
    parser.add_argument("--iters", type=int, default=40, help="timed calls per benchmark row (in rounds of 4)")
    parser.add_argument("--codebook_from", nargs="+", metavar="VIDEO", default=None,
                        help="--bench: videos the kmeans codebook is learned on (default: the benchmarked ones; "
                             "give others to measure PSNR on videos the codebook has not seen)")
    parser.add_argument("--prepare", action="store_true", help="write a clip store of --dataset at --out")
    parser.add_argument("--dataset", default="synthetic", help=f"layout to prepare: {' | '.join(LAYOUTS)}")
    parser.add_argument("--data_root", default=None, help="the dataset folder (data.LAYOUTS); synthetic: the cache")
    parser.add_argument("--out", default=None, help="store folder, outside --data_root; then train with "
                                                    "--data_root OUT (same --dataset)")
    parser.add_argument("--codec", default="jpeg",
                        help="jpeg: >= 40 dB PSNR, fast (default); magicyuv: bit-exact, ~2.5x disk; kmeans: "
                             "a table lookup, fastest, 23-32 dB with the default codebook, 1/4-1/2 of jpeg's disk")
    parser.add_argument("--patch", type=int, default=store.KMEANS_PATCH,
                        help="kmeans: patch side in pixels (ViDROP's full scale: 10)")
    parser.add_argument("--codebook_size", type=int, default=store.KMEANS_SIZE,
                        help="kmeans: centroids (ViDROP's full scale: 65536; needs a GPU to learn and encode)")
    parser.add_argument("--short_side", type=int, default=None,
                        help="shrink larger frames to this short side (default: keep the source's; the release "
                             "trains K400 from copies at 256-320)")
    parser.add_argument("--workers", type=int, default=None, help="preparing processes (default: all cores)")
    args = parser.parse_args(argv)
    if args.codec not in store.CODECS:
        parser.error(f"--codec {args.codec!r}: choose one of {', '.join(store.CODECS)}, e.g. --codec jpeg")
    for name, low in (("iters", 1), ("patch", 1), ("codebook_size", 2), ("short_side", 1), ("workers", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name} {value}: must be >= {low}, e.g. --{name} {max(low, store.KMEANS_PATCH)}")
    if args.prepare:
        if args.out is None:
            parser.error("--prepare needs --out DIR (e.g. a node-local disk)")
        if args.dataset not in LAYOUTS:
            parser.error(f"--dataset {args.dataset!r}: choose one of {', '.join(sorted(LAYOUTS))}")
        if args.data_root is None and args.dataset not in ("synthetic", "noise"):
            parser.error(f"--prepare --dataset {args.dataset} needs --data_root DIR (the dataset's folder)")
        prepare_dataset(args.dataset, args.data_root, args.out, args.codec, args.workers, args.short_side,
                        args.patch, args.codebook_size)
    elif args.bench is not None:
        videos = args.bench or [str(store.BENCH_VIDEO)]
        sources = args.codebook_from or videos
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.process_time()  # 64 frames in all, evenly spaced in each source
            frames = store.sample_frames(sources, videos=len(sources),
                                         frames=max(store.KMEANS_FRAMES, 64 // len(sources)))
            book = store.learn_codebook(frames, args.patch, args.codebook_size)
            store.save_codebook(Path(tmp) / store.CODEBOOK, book)
            print(f"kmeans codebook: {args.codebook_size} centroids of {args.patch}x{args.patch} learned in "
                  f"{time.process_time() - t0:.1f} s CPU on {', '.join(Path(v).name for v in sources)}")
            for video in videos:
                bench(Path(video), args.iters, tmp, Path(tmp) / store.CODEBOOK)
    else:
        parser.print_help()
    return 0
