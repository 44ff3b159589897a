"""
The prepared clip store: one file per video holding every frame as an independently decodable picture, so a
16-frame clip costs 16 picture decodes instead of a GOP's worth of H.264 (~105 frames for the K400 test clip).
data.py decides what goes in (the exact frames its decoder returns) and prepares whole datasets
(`python data.py --prepare`); this file is only the on-disk format: write an entry, read frames back.

Codecs (measured with `python data.py --bench`, see the README's Benchmarks):
- "jpeg" (default): baseline JPEG via torchvision (libjpeg-turbo), decoded with torchvision.io.decode_jpeg
  straight to RGB. Lossy but visually lossless: each frame is stored at the first quality of JPEG_QUALITIES
  whose PSNR against the original decode reaches MIN_PSNR (40 dB), and the entry records its worst frame.
- "magicyuv": lossless (FFmpeg's MagicYUV intra codec on planar RGB): read() returns exactly the original
  decode, bit for bit. ~2.5x the disk of "jpeg" and slower to decode; for runs that must not change at all.

Entry layout (little-endian), written to a temporary name, fsynced, then renamed, so a reader never sees a
half-written entry under its final name; the trailing magic makes a truncated copy unreadable too:
    MAGIC | picture 0 | ... | picture n-1 | offsets int64 (n+1) | header JSON | header length uint64 | END_MAGIC
The header holds the format version, codec, frame size, num_frames (the source's packet count, as data.Video
counts it: positions past the stored frames return the last one) and the quality record.
"""
import fractions
import json
import os
import struct
import warnings
from pathlib import Path

import av
import numpy as np
import torch
from torchvision.io import decode_jpeg, encode_jpeg

# torchvision 0.29 deprecates its image codecs in favour of torchcodec (not a dependency here); the pinned
# version has them, and Pillow's libjpeg-turbo gives the same pixels ~1.4x slower (measured) if they go.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                        DeprecationWarning)

# ============ defaults ============
STORE_VERSION = 1  # bump when the entry layout or what an entry means changes: older stores are refused
MAGIC, END_MAGIC = b"SIGMACS1", b"SIGMAEND"  # first / last 8 bytes of every entry
MARKER = "sigma_store.json"  # at the store root: version, codec, source; the layout parsers check it
CODECS = ("jpeg", "magicyuv")
JPEG_QUALITIES = (95, 98, 100)  # tried in turn per frame until MIN_PSNR is reached (95 suffices on real clips)
MIN_PSNR = 40.0  # dB against the original decode: the "visually lossless" bound of the jpeg codec


class StoreVersionError(RuntimeError):
    """A store written by another version of this code: refused (a RuntimeError, so it is never 'skipped')."""


def _version_check(found, where):
    if found != STORE_VERSION:
        raise StoreVersionError(f"{where} was written by store format version {found}; this code reads version "
                                f"{STORE_VERSION}. Prepare the dataset again: python data.py --prepare ...")


# ============ writing ============


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of two uint8 arrays (inf when equal)."""
    mse = np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


class _JpegEncoder:
    def __init__(self):
        self.worst, self.qualities = float("inf"), []

    def __call__(self, rgb):  # (H, W, 3) uint8 -> bytes
        chw = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W) view
        for quality in JPEG_QUALITIES:
            data = encode_jpeg(chw, quality=quality)
            score = psnr(decode_jpeg(data).permute(1, 2, 0).numpy(), rgb)
            if score >= MIN_PSNR:
                break
        self.worst, self.qualities = min(self.worst, score), self.qualities + [quality]
        return data.numpy().tobytes()

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


def write_entry(path, frames, num_frames, codec="jpeg", source="", **meta):
    """Store uint8 (H, W, 3) RGB `frames` (an iterable, streamed) as the entry `path`; returns its header.

    num_frames: the positions the video has (data.Video.num_frames); it may exceed the frames given by
    placeholder packets. meta: more JSON-able header fields (how the frames were made). Atomic: written to `path`.tmp-<pid>, fsynced, renamed, and the folder fsynced.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown store codec {codec!r}; choose one of {CODECS}")
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    offsets, encoder, shape = [len(MAGIC)], None, None
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            for rgb in frames:
                if encoder is None:
                    shape = rgb.shape
                    encoder = _JpegEncoder() if codec == "jpeg" else _MagicYUVEncoder(*shape[:2])
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


# ============ reading ============


def clamp_positions(indices, num_frames):
    """Frame positions (any order, repeats allowed) -> list of ints, those past the end clamped to the last
    frame (the padding of short videos). Shared by both readers: data.Video and StoredVideo."""
    idx = torch.as_tensor(indices, dtype=torch.long).flatten()
    if len(idx) == 0 or idx.min() < 0:
        raise ValueError(f"positions must be non-negative and at least one, got {indices}")
    return idx.clamp(max=num_frames - 1).tolist()


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


class StoredVideo:
    """A store entry with the interface of data.Video: num_frames, read(indices) -> uint8 (N, H, W, 3).

    read() seeks to each wanted picture and decodes only those (any order, repeats allowed; positions past
    the stored frames return the last one, like Video). Opening costs three small reads.
    """

    def __init__(self, path):
        self.path, self.decoded = str(path), 0
        self.file = open(self.path, "rb")
        try:
            self.header = read_header(self.file, self.path)
            self.num_frames, stored = self.header["num_frames"], self.header["stored"]
            self.file.seek(self.header["index_at"])
            self.offsets = np.frombuffer(self.file.read(8 * (stored + 1)), "<i8")  # (stored+1,)
        except BaseException:
            self.close()
            raise
        if self.header["codec"] not in CODECS:
            self.close()
            raise ValueError(f"{self.path}: unknown store codec {self.header['codec']!r}")
        if self.header["codec"] == "magicyuv":
            self.ctx = av.CodecContext.create("magicyuv", "r")
            self.ctx.thread_count = 1

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
        if self.header["codec"] == "jpeg":
            # One call for the list: a loop over libjpeg-turbo on CPU (batched nvjpeg if given a CUDA device).
            decoded = decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in pictures])
            frames = {p: d.permute(1, 2, 0) for p, d in zip(wanted, decoded)}  # (H, W, 3) views
        else:
            frames = {p: torch.from_numpy(self._magicyuv(b)) for p, b in zip(wanted, pictures)}
        return torch.stack([frames[i] for i in idx])  # (N, H, W, 3) uint8

    def _magicyuv(self, picture):
        (frame,) = self.ctx.decode(av.Packet(picture))
        return frame.to_ndarray(format="rgb24")  # gbrp -> packed RGB, a lossless reorder


# ============ the store root ============


def write_marker(root, source, dataset, **settings):
    """Write (atomically) or check the store root's marker: a store of another version, or one prepared with
    other settings (codec, short_side), is refused rather than resumed into a mix."""
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
