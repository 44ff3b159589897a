"""
Reading and writing video frames, the bottom layer of the data path: a video file decoded exactly (Video, PyAV /
FFmpeg) and the prepared clip store, one file per video holding every frame as an independently decodable picture,
so a 16-frame clip costs 16 picture decodes instead of a GOP's worth of H.264 (~105 frames for the K400 test clip).
open_video takes either and returns a reader with one interface: num_frames, read(positions). This file holds
the PyAV reader, the store's on-disk format (write an entry, read frames back), the k-means codebook, and the
preparation of a folder of videos into a store. data.py stands on it: clips, datasets, loaders.

    python store.py --prepare --dataset k400 --data_root /data/k400 --out /local/k400_store   # all cores, resumable
    python store.py --prepare --dataset k400 --data_root /data/k400 --out /local/k400_km --codec kmeans
    python store.py --bench [VIDEO ...]       # clips/s per CPU core: original, each store, naive; disk, PSNR;
                                              # and the cost of 2 synthetic moving objects (docs/motion.md)

Then train from the store with the same flags: `python train.py --dataset k400 --data_root /local/k400_store`.
The two commands work on a dataset's layout and on VideoClips, so they are data.py's (data.store_main) and the
last lines of this file hand over to them. What goes in is exactly what Video decodes; the tests check it frame
by frame.

Codecs (measured with `python store.py --bench`, see docs/store.md):
- "jpeg" (default): baseline JPEG via torchvision (libjpeg-turbo), decoded with torchvision.io.decode_jpeg
  straight to RGB. Lossy but visually lossless: each frame is stored at the first quality of JPEG_QUALITIES
  whose PSNR against the original decode reaches MIN_PSNR (40 dB), and the entry records its worst frame.
- "magicyuv": lossless (FFmpeg's MagicYUV intra codec on planar RGB): read() returns exactly the original
  decode, bit for bit. ~2.5x the disk of "jpeg" and slower to decode; for runs that must not change at all.
- "kmeans": ViDROP's vector quantisation: each frame cut into patch x patch pixel patches, each stored as the
  index of its nearest centroid in a codebook learned once on a sample of the dataset (<root>/CODEBOOK).
  Decoding is one table lookup (Codebook.decode, on CPU or GPU): 22-30x the original decode's frames/s
  on the K400 test clip, 9x its clips/s once the shared crop and resize are counted. Lossy: with the small
  default codebook (1024 centroids of 4x4) learned on the four test clips, worst frames 25.5-31.9 dB PSNR;
  a clip the codebook has not seen, 22.7 dB. A quarter to half of jpeg's disk.

Entry layout (little-endian), written to a temporary name, fsynced, then renamed, so a reader never sees a
half-written entry under its final name; the trailing magic makes a truncated copy unreadable too:
    MAGIC | picture 0 | ... | picture n-1 | offsets int64 (n+1) | header JSON | header length uint64 | END_MAGIC
The header holds the format version, codec, frame size, num_frames (the source's packet count, as Video counts
it: positions past the stored frames return the last one) and the quality record; a kmeans entry also names its
codebook (path relative to the entry's folder) and the codebook's digest.
"""
# Layering: this file imports nothing from data.py, which stands on it (tests/test_store.py checks the source and
# what `import store` loads). Here is how frames come off and go onto disk; data.py turns frames into clips and
# batches. The PyAV reader sits here, beside the store, because the store is written from exactly what it
# decodes and read back through the same interface, so every reader of frames is in this one file. The store's
# commands stand on both files (a dataset's layout, VideoClips), so they are data.py's.
import fractions
import functools
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg
from tqdm import tqdm

# torchvision 0.29 deprecates its image codecs in favour of torchcodec (not a dependency here); the pinned
# version has them, and Pillow's libjpeg-turbo gives the same pixels ~1.4x slower (measured) if they go.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                        DeprecationWarning)


# ============ defaults ============
STORE_VERSION = 1  # bump when the entry layout or what an entry means changes: older stores are refused
MAGIC, END_MAGIC = b"SIGMACS1", b"SIGMAEND"  # first / last 8 bytes of every entry
MARKER = "sigma_store.json"  # at the store root: version, codec, source; the layout parsers check it
CODECS = ("jpeg", "magicyuv", "kmeans")
JPEG_QUALITIES = (95, 98, 100)  # tried in turn per frame until MIN_PSNR is reached (95 suffices on real clips)
MIN_PSNR = 40.0  # dB against the original decode: the "visually lossless" bound of the jpeg codec
# k-means codec. ViDROP's full-scale setting is 10x10 patches and 65,536 centroids (its Table 3: PSNR 25.75,
# compression 150); the defaults here learn in seconds on one CPU core (see learn_codebook).
CODEBOOK = "sigma_codebook.pt"  # at the store root, loaded with weights_only=True
KMEANS_PATCH = 4  # pixels per patch side
KMEANS_SIZE = 1024  # centroids; indices are stored as uint16 up to 65,536, uint32 above
KMEANS_VIDEOS = 64  # videos sampled (seeded) from the train split to learn the codebook
KMEANS_FRAMES = 8  # evenly spaced frames read from each sampled video
KMEANS_SAMPLE = 262_144  # patches kept (at random) from those frames
KMEANS_STEPS, KMEANS_BATCH = 100, 8192  # mini-batch k-means: steps x patches per step
VIDEO_EXTENSIONS = {".mp4", ".webm", ".mkv", ".avi", ".mov"}  # what the layouts list and prepare_store converts
BENCH_VIDEO = Path(__file__).resolve().parent / "tests" / "data" / "videos" / "R6llTwEh07w.mp4"  # K400, H.264


class StoreVersionError(RuntimeError):
    """A store written by another version of this code: refused (a RuntimeError, so it is never 'skipped')."""


class CodebookError(RuntimeError):
    """A missing, corrupt or foreign k-means codebook: every entry needs it, so it stops the run (never
    'skipped' as one bad video); the message names the file."""


def _version_check(found, where):
    if found != STORE_VERSION:
        raise StoreVersionError(f"{where} was written by store format version {found}; this code reads version "
                                f"{STORE_VERSION}. Prepare the dataset again: python store.py --prepare ...")


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of two uint8 arrays (inf when equal)."""
    mse = np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


# ============ decoding a video file ============


def clamp_positions(indices, num_frames):
    """Frame positions (any order, repeats allowed) -> list of ints, those past the end clamped to the last
    frame (the padding of short videos). Shared by both readers: Video and StoredVideo."""
    idx = torch.as_tensor(indices, dtype=torch.long).flatten()
    if len(idx) == 0 or idx.min() < 0:
        raise ValueError(f"positions must be non-negative and at least one, got {indices}")
    return idx.clamp(max=num_frames - 1).tolist()


class Video:
    """An open video file that decodes exactly the frames asked for, and as few others as it can.

    Position p means the p-th frame of the video in display order, counted from 0. How frames are found:
    - MP4 / MKV / WebM (real presentation timestamps): a demux pass (no decoding, ~2 ms for a 10 s clip) lists
      every packet's timestamp and keyframe flag; position p is the p-th smallest timestamp. read() seeks to the
      last keyframe at or before the first wanted frame, decodes forward, skips decoding frames that are neither
      wanted nor referenced by others, and stops after the last wanted frame. Every decoded timestamp is checked
      against the table; a stream that contradicts it falls back to the in-order path below (slower, still exact).
    - AVI: the container has no presentation timestamps (FFmpeg numbers packets in file order, and DivX "packed
      B-frames", as in the HMDB clips, make those numbers disagree with display order), so AVI is always decoded
      in order from the first frame; p is then literally the p-th frame the decoder returns.
    Both equal a full sequential decode indexed at p whenever every packet holds one frame (the tests check the
    K400 / HMDB / UCF clips, VP9 WebM and H.264 MKV frame by frame).

    num_frames counts the video packets, never the container header (often 0 or wrong). It can exceed the number
    of decodable frames by a placeholder packet (the HMDB AVIs have one): positions past the last decodable frame
    return the last frame, which is also how short videos are padded (as the released loaders do). Only wanted
    frames are converted to RGB (the conversion costs a third to half as much as decoding). threads: FFmpeg
    decoding threads (0 = one per core); 1 is right inside DataLoader workers, which already occupy the cores.
    """

    def __init__(self, path, threads=1):
        self.path, self.threads, self.container, self.decoded = str(path), threads, None, 0
        try:
            self._open()
            pts, keyframe_pts = [], []
            for packet in self.container.demux(self.stream):
                if packet.size == 0 or packet.is_discard:  # empty packet = end-of-stream flush; discard = edit list
                    continue
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keyframe_pts.append(packet.pts)
            if not pts:
                raise ValueError(f"{self.path}: no video frames")
        except BaseException:
            self.close()
            raise
        self.num_frames = len(pts)
        self.seekable = self.container.format.name != "avi" and None not in pts and len(set(pts)) == len(pts)
        if self.seekable:
            self.pts, self.keyframe_pts, self.pts_set = np.sort(pts), np.sort(keyframe_pts), set(pts)

    def _open(self):
        """(Re)open the file: a fresh demuxer and decoder positioned at the first frame."""
        self.close()
        self.container = av.open(self.path, metadata_errors="ignore")  # some HMDB metadata is not UTF-8
        if not self.container.streams.video:
            raise ValueError(f"{self.path}: no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame and slice threads, when threads != 1
        self.stream.codec_context.thread_count = self.threads

    def close(self):
        if self.container is not None:
            self.container.close()
            self.container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, indices):
        """Frames at the given positions (any order, repeats allowed) -> uint8 (len(indices), H, W, 3) RGB."""
        idx = clamp_positions(indices, self.num_frames)  # past the end -> last frame (padding)
        wanted = sorted(set(idx))
        frames = self._read_by_timestamp(wanted) if self.seekable else None
        if frames is None:
            frames = self._read_in_order(wanted)
        return torch.from_numpy(np.stack([frames[i] for i in idx]))  # (N, H, W, 3) uint8

    def _read_by_timestamp(self, wanted):
        """Seek + decode forward; frames identified by timestamp. {position: (H, W, 3)} or None to fall back."""
        position = {int(self.pts[p]): p for p in wanted}  # timestamp -> position, wanted frames only
        keys = self.keyframe_pts[self.keyframe_pts <= self.pts[wanted[0]]]
        if len(keys) == 0:
            return None
        # Also rewinds after the demux pass. backward=True lands on that keyframe, never after it.
        self.container.seek(int(keys[-1]), stream=self.stream, backward=True)
        ctx, out, last = self.stream.codec_context, {}, None
        for packet in self.container.demux(self.stream):
            # Frames that are neither wanted nor referenced by other frames (most B-frames) need not be decoded:
            # ~15% less work on K400 H.264. Reference frames are always decoded, so wanted frames stay exact.
            ctx.skip_frame = "DEFAULT" if packet.pts in position else "NONREF"
            for frame in ctx.decode(packet):
                self.decoded += 1
                if frame.pts not in self.pts_set or (last is not None and frame.pts <= last):
                    return None  # timestamps contradict the table: decode in order instead
                last = frame.pts
                if frame.pts in position:
                    out[position[frame.pts]] = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
            if len(out) == len(wanted):
                return out
        return None  # the stream ended before a wanted frame appeared

    def _read_in_order(self, wanted):
        """Decode from the first frame, counting frames, until the last wanted one. {position: (H, W, 3)}."""
        self._open()
        keep, out, frame, last_position = set(wanted), {}, None, -1
        for last_position, frame in enumerate(self.container.decode(self.stream)):
            self.decoded += 1
            if last_position in keep:
                out[last_position] = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
            if last_position == wanted[-1]:
                break
        if frame is None:
            raise ValueError(f"{self.path}: no decodable video frames")
        if wanted[-1] > last_position:  # fewer decodable frames than packets: pad with the last frame
            last = out.get(last_position, frame.to_ndarray(format="rgb24"))
            out.update({p: last for p in wanted if p > last_position})
        return out

    def frames(self):
        """Every decodable frame in display order, uint8 (H, W, 3) each, streamed (what prepare_video stores).

        Frame k is what read([k]) returns: positions are decode order, as in the in-order path, and equal to
        timestamp order whenever each packet holds one frame (the tests compare both on the real clips).
        """
        self._open()
        for position, frame in enumerate(self.container.decode(self.stream)):
            if position == self.num_frames:
                break
            self.decoded += 1
            yield frame.to_ndarray(format="rgb24")


# ============ the k-means codebook ============
# ViDROP (its Sec. 3) replaces every patch x patch RGB patch of a frame by the nearest of K centroids learned
# by k-means over patches of the dataset; a frame is then an (h, w) grid of centroid ids and decoding it is
# a lookup. Here the lookup gathers pixel *rows* of centroids (Codebook.table), so that the gathered rows lie
# in the frame's own (H, W, 3) memory order and no reshuffle follows.


def to_patches(rgb, patch):
    """uint8 (H, W, 3) -> uint8 (h, w, patch*patch*3), h = ceil(H / patch): the frame's patches, raster order
    inside each; the last row / column of pixels is repeated to fill partial patches."""
    rgb = torch.as_tensor(rgb)
    H, W = rgb.shape[:2]
    h, w = -(-H // patch), -(-W // patch)
    rows = torch.arange(h * patch).clamp(max=H - 1)
    cols = torch.arange(w * patch).clamp(max=W - 1)
    x = rgb[rows][:, cols]  # (h*P, w*P, 3)
    return x.view(h, patch, w, patch, 3).permute(0, 2, 1, 3, 4).reshape(h, w, patch * patch * 3)


def nearest(patches, centroids):
    """float32 (N, D) patches, float32 (K, D) centroids -> long (N,) index of each patch's nearest centroid:
    argmin over k of ||c_k||^2 - 2 x.c_k (squared L2 less the constant ||x||^2), in blocks of ~2^20 distances."""
    sq = (centroids ** 2).sum(1)  # (K,)
    step = max(1, 2 ** 20 // len(centroids))  # a (step, K) block stays in cache (4 MB)
    return torch.cat([torch.addmm(sq, chunk, centroids.T, alpha=-2).argmin(1) for chunk in patches.split(step)])


class Codebook:
    """K centroids of patch x patch RGB pixels, uint8 (K, P, P, 3): encode a frame to ids, decode ids to pixels.

    digest: the first 16 hex digits of the centroids' SHA-256, recorded by every entry encoded with it.
    """

    def __init__(self, centroids, path="(in memory)"):
        self.centroids, self.path = centroids, str(path)  # (K, P, P, 3) uint8
        self.size, self.patch = centroids.shape[0], centroids.shape[1]
        self.digest = hashlib.sha256(centroids.cpu().numpy().tobytes()).hexdigest()[:16]
        # Row k*P + r of the table = pixel row r of centroid k (P*3 bytes), read as the widest integer words
        # that divide it: the gather then moves a few words per row instead of single bytes (~3x faster).
        word = next(d for d in (torch.int64, torch.int32, torch.int16, torch.uint8) if self.patch * 3 % d.itemsize == 0)
        self.table = centroids.reshape(self.size * self.patch, self.patch * 3).view(word)  # (K*P, P*3 / bytes)
        self.dtype = "<u2" if self.size <= 2 ** 16 else "<u4"  # on disk

    def to(self, device):
        """The same codebook with its lookup table on `device` (decode() then runs there, e.g. on a GPU)."""
        book = Codebook.__new__(Codebook)
        book.__dict__.update(self.__dict__, table=self.table.to(device))
        return book

    def decode(self, ids):
        """Centroid ids, integer (..., h, w), on the table's device -> uint8 (..., h*P, w*P, 3) pixels."""
        P = self.patch
        r = torch.arange(P, device=ids.device).view(P, 1)
        rows = ids.long().unsqueeze(-2) * P + r  # (..., h, P, w): table row of output pixel row (i*P + r, j)
        out = self.table.index_select(0, rows.flatten())  # (N*h*P*w, P*3 bytes): already in (H, W, 3) order
        return out.view(torch.uint8).view(*ids.shape[:-2], ids.shape[-2] * P, ids.shape[-1] * P, 3)

    @functools.cached_property
    def _flat(self):
        return self.centroids.reshape(self.size, -1).float()  # (K, D): made on the first encode, not for decoding

    def encode(self, rgb):
        """uint8 (H, W, 3) frame -> long (h, w) ids of its patches' nearest centroids."""
        x = to_patches(rgb, self.patch)  # (h, w, D) uint8
        return nearest(x.reshape(-1, x.shape[-1]).float(), self._flat).view(x.shape[:2])


def learn_codebook(frames, patch=KMEANS_PATCH, size=KMEANS_SIZE, sample=KMEANS_SAMPLE, steps=KMEANS_STEPS,
                   batch=KMEANS_BATCH, seed=0, device="cpu"):
    """Mini-batch k-means (Sculley, WWW 2010) over the patches of `frames` (uint8 (H, W, 3) each) -> Codebook.

    At most `sample` patches are kept (seeded choice); batch and sample grow to at least 2 x size. Centroids start as randomly chosen patches; each step
    assigns `batch` random patches and moves every centroid towards the mean of its patches with rate
    1 / (patches it has received so far), the per-centre learning rate of mini-batch k-means. Deterministic
    on CPU for a given seed (on a GPU, index_add_'s float atomics may round differently). The defaults take
    ~3 s on one CPU core; ViDROP's 65,536 x 10x10 needs a GPU.
    """
    g = torch.Generator().manual_seed(seed)
    batch = max(batch, 2 * size)  # a step must reach every centroid (65,536 of them at full scale)
    sample = max(sample, batch)
    x = torch.cat([to_patches(f, patch).reshape(-1, patch * patch * 3) for f in frames])  # (N, D) uint8
    if len(x) < size:
        raise ValueError(f"{len(x)} sample patches cannot give {size} centroids: sample more frames or use a "
                         f"smaller codebook (e.g. --codebook_size {2 ** int(np.log2(max(len(x), 2)) - 1)})")
    x = x[torch.randperm(len(x), generator=g)[:sample]].to(device, torch.float32)  # (N', D)
    centroids = x[torch.randperm(len(x), generator=g)[:size].to(device)].clone()  # (K, D)
    counts = torch.zeros(size, device=device)  # (K,) patches each centroid has received
    for _ in range(steps):
        b = x[torch.randint(len(x), (batch,), generator=g).to(device)]  # (B, D)
        ids = nearest(b, centroids)  # (B,)
        n = torch.bincount(ids, minlength=size).float()  # (K,) patches per centroid in this batch
        sums = torch.zeros_like(centroids).index_add_(0, ids, b)  # (K, D)
        counts += n
        hit = n > 0
        centroids[hit] += (sums[hit] - n[hit, None] * centroids[hit]) / counts[hit, None]
    return Codebook(centroids.round().clamp(0, 255).to(torch.uint8).view(size, patch, patch, 3).cpu())


def save_codebook(path, book, **meta):
    """Write `book` to `path` atomically (temporary name, fsync, rename); meta: JSON-able facts (how learned)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(dict(kind="sigma kmeans codebook", version=STORE_VERSION, patch=book.patch, size=book.size,
                        digest=book.digest, centroids=book.centroids, meta=json.dumps(meta)), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_LOADED = {}  # (path, mtime, size) -> Codebook: an entry open costs a stat, not a load


def load_codebook(path, patch=None, digest=None, entry=None):
    """The Codebook at `path` (torch.load with weights_only=True), checked: a truncated or corrupt file, one
    holding pickled code, one that is not a codebook, or (patch / digest given, from an entry's header) one that
    is not the codebook the entry was encoded with, raises CodebookError naming the file."""
    path = Path(path)
    needed = f" (needed by {entry})" if entry else ""
    try:
        stat = path.stat()
    except OSError as err:
        raise CodebookError(f"{path}: cannot read the k-means codebook{needed}: {err}") from None
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        _LOADED[key] = _read_codebook(path)
    book = _LOADED[key]
    if patch is not None and book.patch != patch:
        raise CodebookError(f"{path}: codebook of {book.patch}x{book.patch} patches, but {entry} was encoded with "
                            f"{patch}x{patch}: a foreign codebook; prepare the store again or restore its own")
    if digest is not None and book.digest != digest:
        raise CodebookError(f"{path}: codebook {book.digest} is not the one {entry} was encoded with ({digest}): "
                            f"a foreign codebook; prepare the store again or restore its own")
    return book


def _read_codebook(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "Unsupported global" in str(err):  # weights_only met a class or function reference: pickled code
            raise CodebookError(f"{path}: holds pickled objects other than tensors, refused (loaded with "
                                f"weights_only=True); a codebook written by save_codebook never does") from None
        raise CodebookError(f"{path}: truncated or corrupt k-means codebook ({type(err).__name__}: "
                            f"{str(err)[:120]})") from None
    c = obj.get("centroids") if isinstance(obj, dict) else None
    if c is None or obj.get("kind") != "sigma kmeans codebook" or not isinstance(c, torch.Tensor):
        raise CodebookError(f"{path}: not a k-means codebook (no 'centroids' tensor from save_codebook)")
    if c.dtype != torch.uint8 or c.ndim != 4 or c.shape[1] != c.shape[2] or c.shape[3] != 3 or \
            c.shape[1] != obj.get("patch") or c.shape[0] != obj.get("size") or c.shape[0] < 1:
        raise CodebookError(f"{path}: centroids {c.dtype} {tuple(c.shape)} do not match the stated patch "
                            f"{obj.get('patch')} / size {obj.get('size')}: expected uint8 (size, patch, patch, 3)")
    _version_check(obj.get("version"), str(path))
    book = Codebook(c.contiguous(), path)
    if book.digest != obj.get("digest"):
        raise CodebookError(f"{path}: centroids do not match the digest stored with them (corrupt file)")
    return book


# ============ writing ============


class _JpegEncoder:
    def __init__(self):
        self.worst, self.qualities = float("inf"), []

    def __call__(self, rgb):  # (H, W, 3) uint8 -> bytes
        chw = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W) view
        for quality in JPEG_QUALITIES:
            encoded = encode_jpeg(chw, quality=quality)
            score = psnr(decode_jpeg(encoded).permute(1, 2, 0).numpy(), rgb)
            if score >= MIN_PSNR:
                break
        self.worst, self.qualities = min(self.worst, score), self.qualities + [quality]
        return encoded.numpy().tobytes()

    def record(self):
        return dict(min_psnr=round(self.worst, 2), qualities=sorted(set(self.qualities)))


class _MagicYUVEncoder:
    """Lossless: RGB planes (gbrp) in, the same planes out; every frame a keyframe (an intra-only codec)."""

    def __init__(self, height, width):
        self.ctx = av.CodecContext.create("magicyuv", "w")
        self.ctx.width, self.ctx.height, self.ctx.pix_fmt = width, height, "gbrp"
        self.ctx.time_base, self.ctx.thread_count = fractions.Fraction(1, 25), 1

    def __call__(self, rgb):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="gbrp")  # lossless reorder
        (packet,) = self.ctx.encode(frame)  # intra-only: one packet per frame, no delay
        return bytes(packet)

    def record(self):
        return dict(min_psnr=None)  # exact


class _KMeansEncoder:
    """A frame -> its (h, w) centroid ids as uint16 / uint32 bytes; records the worst and mean frame PSNR."""

    def __init__(self, codebook, entry_dir):
        self.book = load_codebook(codebook)
        self.ref = os.path.relpath(Path(codebook).resolve(), Path(entry_dir).resolve())  # the store moves whole
        self.scores = []

    def __call__(self, rgb):
        ids = self.book.encode(rgb)  # (h, w)
        back = self.book.decode(ids)[:rgb.shape[0], :rgb.shape[1]]  # (H, W, 3), what read() will return
        self.scores.append(psnr(back.numpy(), rgb))
        return ids.numpy().astype(self.book.dtype).tobytes()

    def record(self):
        return dict(min_psnr=round(min(self.scores), 2), mean_psnr=round(float(np.mean(self.scores)), 2),
                    codebook=self.ref, codebook_digest=self.book.digest, patch=self.book.patch,
                    codebook_size=self.book.size)


def write_entry(path, frames, num_frames, codec="jpeg", source="", codebook=None, **meta):
    """Store uint8 (H, W, 3) RGB `frames` (an iterable, streamed) as the entry `path`; returns its header.

    num_frames: the positions the video has (Video.num_frames); it may exceed the frames given by
    placeholder packets. codebook: the codebook file, for codec "kmeans". meta: more JSON-able header fields
    (how the frames were made). Atomic: written to `path`.tmp-<pid>, fsynced, renamed, and the folder fsynced.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown store codec {codec!r}; choose one of {CODECS}")
    if (codec == "kmeans") != (codebook is not None):
        raise ValueError("codec 'kmeans' needs codebook= (a file from save_codebook); the others take none")
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    offsets, encoder, shape = [len(MAGIC)], None, None
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            for rgb in frames:
                if encoder is None:
                    shape = rgb.shape
                    encoder = {"jpeg": _JpegEncoder, "magicyuv": lambda: _MagicYUVEncoder(*shape[:2]),
                               "kmeans": lambda: _KMeansEncoder(codebook, path.parent)}[codec]()
                if rgb.shape != shape:
                    raise ValueError(f"{source}: frame size changes mid-video ({shape} -> {rgb.shape})")
                offsets.append(offsets[-1] + f.write(encoder(np.ascontiguousarray(rgb))))
            if encoder is None:
                raise ValueError(f"{source}: no decodable video frames")
            header = dict(version=STORE_VERSION, codec=codec, height=shape[0], width=shape[1],
                          num_frames=num_frames, stored=len(offsets) - 1, index_at=offsets[-1],
                          source=str(source), **meta, **encoder.record())
            blob = json.dumps(header).encode()
            f.write(np.asarray(offsets, "<i8").tobytes() + blob + struct.pack("<Q", len(blob)) + END_MAGIC)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return header


def prepare_video(src, dst_dir, codec="jpeg", short_side=None, codebook=None):
    """Store the video file `src` as the entry dst_dir/<same file name>; returns the entry's path.

    The entry keeps the source's file name so that every layout parser finds it unchanged in a store that
    mirrors the dataset's folders; open_video tells entries from videos by their first bytes. Atomic: an
    interrupted call leaves no entry (only a temporary file that no layout lists). short_side=None keeps the
    source resolution, so that a clip from the store is the clip from the file (exactly, with "magicyuv");
    short_side=S shrinks larger frames to a short side of S first (antialiased bilinear, as the transform):
    a raw 720p copy of K400 then costs ~8x less disk and decode at S=256, but pixels differ from the file's.
    codebook: the codebook file for codec "kmeans" (learn_codebook, save_codebook).
    """
    src, dst_dir = Path(src), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    with Video(src, threads=1) as video:
        frames = video.frames() if short_side is None else (_shrink(f, short_side) for f in video.frames())
        write_entry(dst_dir / src.name, frames, video.num_frames, codec, source=src, codebook=codebook,
                    short_side=short_side)
    return dst_dir / src.name


def _shrink(rgb, short_side):
    """uint8 (H, W, 3) -> the same with a short side of at most short_side, aspect kept."""
    h, w = rgb.shape[:2]
    if min(h, w) <= short_side:
        return rgb
    size = (short_side, round(w * short_side / h)) if h <= w else (round(h * short_side / w), short_side)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # (1, 3, H, W), a channels-last view
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)  # (1, 3, h, w)
    return x[0].permute(1, 2, 0).numpy()  # (h, w, 3)


def sample_frames(paths, videos=KMEANS_VIDEOS, frames=KMEANS_FRAMES, short_side=None, seed=0):
    """uint8 (H, W, 3) frames to learn a codebook from: `frames` evenly spaced frames of each of `videos` videos
    drawn (seeded) from `paths`; unreadable videos are passed over."""
    for path in sorted(random.Random(seed).sample(sorted(map(str, paths)), min(videos, len(paths)))):
        try:
            with Video(path) as video:
                n = video.num_frames
                got = video.read([(2 * k + 1) * n // (2 * frames) for k in range(frames)]).numpy()
        except (av.FFmpegError, OSError, ValueError):
            continue
        yield from (f if short_side is None else _shrink(f, short_side) for f in got)


# ============ reading ============


def is_entry(path):
    """True when `path` starts with the store magic (8 bytes read: cheap beside any decode)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_header(f, where):
    """The header of an open entry; ValueError for a truncated / foreign file, StoreVersionError for old ones."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size < 32:
        raise ValueError(f"{where}: not a complete store entry ({size} bytes)")
    f.seek(size - 16)
    length, end = struct.unpack("<Q8s", f.read(16))
    if end != END_MAGIC or length > size - 32:
        raise ValueError(f"{where}: incomplete store entry (no end marker; an interrupted write?)")
    f.seek(size - 16 - length)
    header = json.loads(f.read(length))
    _version_check(header.get("version"), where)
    return header


def is_complete_entry(path):
    """True when `path` is a whole entry of this format version (magic, end marker and header all there)."""
    try:
        with open(path, "rb") as f:
            return is_entry(path) and bool(read_header(f, str(path)))
    except (OSError, ValueError):
        return False


class StoredVideo:
    """A store entry with the interface of Video: num_frames, read(indices) -> uint8 (N, H, W, 3).

    read() seeks to each wanted picture and decodes only those (any order, repeats allowed; positions past
    the stored frames return the last one, like Video). Opening costs three small reads (and, for a kmeans
    entry, a stat of its codebook, which is loaded once per process).
    """

    def __init__(self, path):
        self.path, self.decoded = str(path), 0
        self.file = open(self.path, "rb")
        try:
            self.header = read_header(self.file, self.path)
            self.num_frames, stored = self.header["num_frames"], self.header["stored"]
            self.file.seek(self.header["index_at"])
            self.offsets = np.frombuffer(self.file.read(8 * (stored + 1)), "<i8")  # (stored+1,)
            codec = self.header["codec"]
            if codec not in CODECS:
                raise ValueError(f"{self.path}: unknown store codec {codec!r}")
            if codec == "magicyuv":
                self.ctx = av.CodecContext.create("magicyuv", "r")
                self.ctx.thread_count = 1
            elif codec == "kmeans":
                where = os.path.normpath(Path(self.path).parent / self.header["codebook"])
                self.book = load_codebook(where, self.header["patch"],
                                          self.header["codebook_digest"], self.path)
        except BaseException:
            self.close()
            raise

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, indices):
        idx = clamp_positions(indices, len(self.offsets) - 1)  # past the stored frames -> last frame (padding)
        wanted = sorted(set(idx))
        pictures = []
        for p in wanted:
            self.file.seek(self.offsets[p])
            pictures.append(self.file.read(int(self.offsets[p + 1] - self.offsets[p])))
        self.decoded += len(wanted)
        codec = self.header["codec"]
        if codec == "kmeans":
            return self._kmeans(pictures, [wanted.index(i) for i in idx])
        if codec == "jpeg":
            # One call for the list: a loop over libjpeg-turbo on CPU (batched nvjpeg if given a CUDA device).
            decoded = decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in pictures])
            frames = {p: d.permute(1, 2, 0) for p, d in zip(wanted, decoded)}  # (H, W, 3) views
        else:
            frames = {p: torch.from_numpy(self._magicyuv(b)) for p, b in zip(wanted, pictures)}
        return torch.stack([frames[i] for i in idx])  # (N, H, W, 3) uint8

    def _magicyuv(self, picture):
        (frame,) = self.ctx.decode(av.Packet(picture))
        return frame.to_ndarray(format="rgb24")  # gbrp -> packed RGB, a lossless reorder

    def _kmeans(self, pictures, order):
        """Id grids of the wanted frames -> uint8 (N, H, W, 3) in the order asked for, by one lookup."""
        P, (H, W) = self.book.patch, (self.header["height"], self.header["width"])
        ids = np.stack([np.frombuffer(b, self.book.dtype) for b in pictures])  # (n, h*w)
        ids = torch.from_numpy(ids.astype(np.int64))[order].view(-1, -(-H // P), -(-W // P))  # (N, h, w)
        return self.book.decode(ids)[:, :H, :W]  # (N, H, W, 3); a view when H, W are not multiples of P


def open_video(path, threads=1):
    """A prepared store entry (StoredVideo) or a video file (Video): the same num_frames and read()."""
    return StoredVideo(path) if is_entry(path) else Video(path, threads)


def decode_frames(path, indices, threads=1):
    """uint8 (len(indices), H, W, 3) RGB frames at display-order positions `indices` (see Video)."""
    with open_video(path, threads) as video:
        return video.read(indices)


# ============ the store root ============


def write_marker(root, source, dataset, **settings):
    """Write (atomically) or check the store root's marker: a store of another version, or one prepared with
    other settings (codec, short_side, codebook), is refused rather than resumed into a mix."""
    path = Path(root) / MARKER
    if path.is_file():
        old = json.loads(path.read_text())
        _version_check(old.get("version"), str(root))
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"{root} was prepared with other settings {changed} (stored, now): resume it with "
                             f"the stored ones or use another --out")
        return old
    marker = dict(version=STORE_VERSION, source=str(source), dataset=dataset, **settings)
    tmp = path.with_name(f"{MARKER}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, path)
    return marker


def check_root(root):
    """At dataset start: refuse a store root written by another format version (the marker says which)."""
    path = Path(root) / MARKER
    if path.is_file():
        _version_check(json.loads(path.read_text()).get("version"), str(root))


# ============ preparing a folder ============


def _prepare_job(job):
    src, dst_dir, codec, short_side, codebook = job
    try:
        return src, prepare_video(src, dst_dir, codec, short_side, codebook), None
    except CodebookError:
        raise  # the store's codebook is unusable: no video can be prepared
    except Exception as err:  # any other failure skips the video and lists it; the run goes on
        return src, None, f"{type(err).__name__}: {err}"


def prepare_store(dataset, src, out, codec="jpeg", workers=None, short_side=None, patch=KMEANS_PATCH,
                  codebook_size=KMEANS_SIZE, sample=()):
    """Mirror the folder `src` into the store `out`; returns (videos prepared, videos kept, unreadable lines).

    Every video file (VIDEO_EXTENSIONS) becomes a store entry at the same relative path and name, every other
    file (CSV / JSON / split lists, VOS frames) is copied, so a layout parser reads `out` as it reads `src`
    (data.prepare_dataset checks that). In parallel over `workers` processes (default: all cores); codec and
    short_side as in prepare_video. Codec "kmeans" first learns a codebook (patch, codebook_size) on frames
    sampled from the video files `sample` (sample_frames) and keeps it at out/CODEBOOK. The marker records
    `dataset` and the settings. Resumable: complete entries (and the codebook) are kept, temporary files of an
    interrupted run deleted. Videos that cannot be prepared are skipped and listed in out/unreadable.txt.
    """
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kmeans = dict(patch=patch, codebook_size=codebook_size) if codec == "kmeans" else {}
    write_marker(out, src, dataset, codec=codec, short_side=short_side, **kmeans)
    for stale in out.rglob("*.tmp-*"):  # left by an interrupted run; never listed by a layout
        stale.unlink()
    codebook = out / CODEBOOK if kmeans else None
    if kmeans and not codebook.is_file():
        t0 = time.perf_counter()
        book = learn_codebook(sample_frames(sample, short_side=short_side), patch, codebook_size)
        save_codebook(codebook, book, dataset=dataset, source=str(src), videos=min(KMEANS_VIDEOS, len(sample)))
        print(f"store.py: codebook of {codebook_size} {patch}x{patch} centroids learned in "
              f"{time.perf_counter() - t0:.1f} s -> {codebook}")
    jobs, kept = [], 0
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        target = out / path.relative_to(src)
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        elif is_complete_entry(target):
            kept += 1
        else:
            jobs.append((path, target.parent, codec, short_side, codebook))
    bad = []
    with Pool(workers or os.cpu_count(), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for path, entry, err in tqdm(pool.imap_unordered(_prepare_job, jobs), total=len(jobs),
                                     desc=f"preparing {dataset}", unit="video", disable=not sys.stderr.isatty()):
            if err is not None:
                bad.append(f"{path.relative_to(src)}\t{err}")
    (out / "unreadable.txt").write_text("".join(f"{line}\n" for line in sorted(bad)))
    return len(jobs) - len(bad), kept, bad


if __name__ == "__main__":
    # `python store.py --prepare / --bench`: the commands need a dataset's layout and VideoClips, which stand on
    # this file, so they live in data.py. Only this script run imports it: `import store` never loads data.py.
    import data
    sys.exit(data.store_main())
