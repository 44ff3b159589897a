"""Tests for data.py: masks, exact decoding on real clips, bad input, layouts, augmentation, loader.

    python -m pytest -q tests/test_data.py      # CPU, ~30 s
"""
import contextlib
import json
import os
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train  # noqa: E402
from test_train import tiny_args, weights  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
K400 = DATA / "videos" / "R6llTwEh07w.mp4"  # H.264 + AAC, keyframes at frames 0 and 250
HMDB = DATA / "videos" / "RATRACE_wave_f_nm_np1_fr_goo_37.avi"  # DivX packed B-frames
HMDB_LATIN1 = DATA / "videos" / "hmdb51_Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi"  # non-UTF-8 metadata
UCF = DATA / "videos" / "v_SoccerJuggling_g23_c01.avi"  # Xvid, keyframe every 12 frames
REAL_CLIPS = [K400, HMDB, HMDB_LATIN1, UCF]
MEAN = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1, 1)
STD = torch.tensor(data.IMAGENET_STD).view(3, 1, 1, 1)


def sequential_decode(path):
    """Reference: every frame a plain in-order PyAV decode returns, as uint8 (N, H, W, 3)."""
    with av.open(str(path), metadata_errors="ignore") as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def encode(path, frames, codec="libx264", fps=25, **options):
    """Write uint8 (T, H, W, 3) frames with PyAV."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps, options={k: str(v) for k, v in options.items()})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        out.mux(stream.encode())


def unnormalize(clip):
    """A dataset's uint8 (3, T, S, S) clip, through the model's normalisation and back -> float in [0, 255]."""
    return (data.normalize(clip) * STD + MEAN) * 255


def gray_video(path, levels, size=32):
    """A video whose frame i is uniformly gray at levels[i] (identifiable after lossy coding)."""
    frames = np.repeat(np.asarray(levels, np.uint8)[:, None, None, None], size * size * 3).reshape(-1, size, size, 3)
    encode(path, frames, crf=0)
    return path


# ============ tube masks ============

@pytest.mark.parametrize("grid,ratio", [((8, 14, 14), 0.9), ((2, 3, 4), 0.75), ((4, 7, 7), 0.5)])
def test_tube_mask_counts_and_tubes(grid, ratio):
    t, h, w = grid
    mask = data.tube_mask(5, grid, ratio, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (5, t * h * w)
    slices = mask.view(5, t, h * w)
    assert (slices.sum(-1) == int(ratio * h * w)).all()  # exactly int(ratio*h*w) masked per slice
    assert (slices == slices[:, :1]).all()  # the same spatial positions in every temporal slice (tubes)
    assert mask.sum() == 5 * t * int(ratio * h * w)  # True = masked (0.9 -> most tokens True)


def test_tube_mask_default_is_spec_count_and_random():
    mask = data.tube_mask(64, (8, 14, 14))
    assert (mask.sum(1) == 1408).all()  # int(0.9 * 196) = 176 of 196 positions x 8 slices
    assert len({tuple(m.tolist()) for m in mask[:, :196]}) == 64  # clips get different masks


def test_tube_mask_deterministic_and_unbiased():
    a = data.tube_mask(8, (8, 14, 14), generator=torch.Generator().manual_seed(1))
    b = data.tube_mask(8, (8, 14, 14), generator=torch.Generator().manual_seed(1))
    c = data.tube_mask(8, (8, 14, 14), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Every position is masked equally often (no positional bias): 4000 clips, p = 176/196.
    freq = data.tube_mask(4000, (1, 14, 14), generator=torch.Generator().manual_seed(3)).float().mean(0)
    assert (freq - 176 / 196).abs().max() < 0.03


# ============ decoding ============

@pytest.mark.parametrize("path", REAL_CLIPS, ids=lambda p: p.name[:20])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_matches_sequential_decode(path, threads):
    full = sequential_decode(path)
    n = len(full)
    with data.Video(path) as video:
        assert n <= video.num_frames <= n + 1  # packet count: never trusts the header, at most one placeholder
        num_frames = video.num_frames
    rng = np.random.default_rng(0)
    index_sets = [
        np.arange(0, 61, 4) + rng.integers(0, n - 61),  # a training clip
        rng.integers(0, n, 12),  # unsorted, repeats likely
        [n - 1, 0, n - 1, 5],  # unsorted with repeats
        [n - 20, n - 2, n - 1],  # near the end (after the last keyframe of the K400 clip)
        [num_frames + 5, n - 1],  # past the end -> last decodable frame
    ]
    for idx in index_sets:
        got = data.decode_frames(path, idx, threads=threads)
        assert got.dtype == torch.uint8 and got.shape == (len(idx), *full.shape[1:])
        np.testing.assert_array_equal(got.numpy(), full[np.minimum(idx, n - 1)])


def test_decode_does_only_the_needed_work():
    # K400 clip: keyframes at frames 0 and 250. Frames 280-290 need only the GOP from 250 on; a clip in the
    # first GOP stops after its last frame. (A fallback to the in-order path would decode far more.)
    full = sequential_decode(K400)
    for idx, first_needed in (([280, 290], 250), (list(range(100, 161, 4)), 0)):
        with data.Video(K400) as video:
            frames = video.read(idx)
            needed = max(idx) - first_needed + 1
            assert video.decoded <= 0.85 * needed  # and non-reference frames nobody wants were skipped
        np.testing.assert_array_equal(frames.numpy(), full[idx])


def test_decode_webm_vp9_and_mkv(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.stack([np.roll(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), i, axis=1) for i in range(40)])
    for name, codec in (("a.webm", "libvpx-vp9"), ("b.mkv", "libx264")):
        encode(tmp_path / name, frames, codec=codec, g=10)  # keyframe every 10 frames: exercises seeking
        full = sequential_decode(tmp_path / name)
        assert len(full) == 40
        for idx in ([33, 35, 39], [12, 3, 12, 27]):
            with data.Video(tmp_path / name) as video:
                assert video.seekable and video.num_frames == 40
                np.testing.assert_array_equal(video.read(idx).numpy(), full[idx])
        ds = data.VideoClips([(tmp_path / name, 3)], num_frames=8, stride=2, size=32)
        clip, label = ds[0]
        assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.uint8 and label == 3


def test_decode_rejects_negative_positions():
    with pytest.raises(ValueError):
        data.decode_frames(UCF, [3, -1])


# ============ bad input ============

def make_bad_files(tmp_path):
    good = K400.read_bytes()
    mdat_zeroed = bytearray(good)  # container intact, picture data destroyed -> nothing decodable
    mdat_zeroed[48:good.find(b"moov") - 8] = bytes(good.find(b"moov") - 56)
    files = {"truncated.mp4": good[:len(good) // 2], "empty.mp4": b"", "random.mp4": os.urandom(20000),
             "text.avi": b"this is not a video\n" * 50, "zeroed.mp4": bytes(mdat_zeroed)}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return [tmp_path / name for name in files]


def test_bad_files_are_skipped_counted_and_reported_once(tmp_path, capfd):
    bad = make_bad_files(tmp_path)
    samples = [(UCF, 0)] + [(p, 1) for p in bad] + [(HMDB, 2)]
    ds = data.VideoClips(samples, num_frames=4, stride=2, size=32, train=False, max_bad_fraction=0.9)
    for _ in range(2):  # two epochs
        items = [ds[i] for i in range(len(ds))]
    for i, (clip, label) in enumerate(items):
        assert clip.shape == (3, 4, 32, 32) and torch.isfinite(clip).all()
        assert label == (0 if i == 0 else 2)  # bad ones replaced by the next readable sample
    assert ds.bad == {1, 2, 3, 4, 5}
    err = capfd.readouterr().err
    for p in bad:
        assert err.count(f"unreadable video {p} (") == 1  # reported once, with its path, across both epochs


@pytest.mark.parametrize("bad_first", [False, True])
def test_too_many_bad_files_raise(tmp_path, bad_first):
    bad = [(p, 0) for p in make_bad_files(tmp_path)]
    good = [(UCF, 0), (HMDB, 0)]
    ds = data.VideoClips(bad + good if bad_first else good + bad, num_frames=4, size=32, train=False,
                         max_bad_fraction=0.5)  # 5 of 7 unreadable
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        for i in range(len(ds)):
            ds[i]


def test_listed_bad_videos_are_not_retried_by_the_next_epochs_workers(tmp_path, capfd):
    """A broken file is tried, reported and listed once per run: the workers of the next epoch (fresh copies of
    the dataset) and a restarted run skip what bad_list holds."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    good = gray_video(tmp_path / "good.mp4", [0, 50, 100, 150], size=16)
    samples = [(good, 0), (broken, 1), (good, 2), (good, 3)]
    listing = tmp_path / "bad_videos.txt"

    def run(epochs):
        ds = data.VideoClips(samples, num_frames=2, stride=1, size=16, train=True, max_bad_fraction=0.9)
        ds.bad_list = str(listing)  # as train.py sets it
        loader = data.make_loader(ds, batch_size=2, num_workers=1, shuffle=False)
        for epoch in epochs:
            data.set_epoch(loader, epoch)
            assert [y.tolist() for _, y in loader] == [[0, 2], [2, 3]]  # the broken one replaced by the next

    run([0, 1])
    assert listing.read_text() == f"{broken}\n"  # once, not once per epoch
    assert capfd.readouterr().err.count(f"unreadable video {broken} (") == 1
    run([2])  # a restarted run
    assert listing.read_text() == f"{broken}\n" and "unreadable video" not in capfd.readouterr().err


def test_video_too_small_to_crop_is_skipped(tmp_path):
    """A real 1-pixel-high video decodes, but the multi-scale crop of its 1-pixel short side is empty and the
    resize raises RuntimeError: it is skipped like an unreadable file. VideoClips' own RuntimeErrors still rise."""
    thin = tmp_path / "thin.mkv"
    frames = np.random.default_rng(0).integers(0, 256, (8, 1, 64, 3), dtype=np.uint8)  # (T, H=1, W, 3)
    with av.open(str(thin), "w") as out:  # FFV1 stores odd sizes (x264's 4:2:0 needs even ones)
        stream = out.add_stream("ffv1", rate=25)
        stream.height, stream.width, stream.pix_fmt = 1, 64, "yuv444p"
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    with pytest.raises(RuntimeError, match="sizes should be greater than 0"):  # what the crop does to it
        data.crop_resize(torch.from_numpy(frames), data.multiscale_crop_box(1, 64, 16, scales=(0.75,)), 16)
    good = gray_video(tmp_path / "good.mp4", [0, 50, 100, 150], size=16)
    ds = data.VideoClips([(thin, 0), (good, 1)], num_frames=4, size=16, train=True, repeats=4, max_bad_fraction=0.9)
    clips, labels = ds[0]
    assert clips.shape == (4, 3, 4, 16, 16) and labels.tolist() == [1] * 4 and ds.bad == {0}
    with pytest.raises(RuntimeError, match="no readable video"):
        data.VideoClips([(thin, 0)], num_frames=4, size=16, train=True, repeats=4)[0]


def test_partially_truncated_avi_still_loads(tmp_path):
    path = tmp_path / "half.avi"
    path.write_bytes(UCF.read_bytes()[:250_000])  # first half: fewer frames, all decodable
    with data.Video(path) as video:
        assert 0 < video.num_frames < 240
        np.testing.assert_array_equal(video.read([0, 50]).numpy(), sequential_decode(UCF)[[0, 50]])


# ============ sampling and augmentation ============

def test_short_video_repeats_last_frame(tmp_path):
    path = gray_video(tmp_path / "short.mp4", [0, 40, 80, 120, 160])  # 5 frames
    ds = data.VideoClips([(path, 0)], num_frames=8, stride=2, size=16, train=False)
    levels = unnormalize(ds[0][0]).mean(dim=(0, 2, 3))  # (T,) mean gray level per frame
    np.testing.assert_allclose(levels.numpy(), [0, 80, 160, 160, 160, 160, 160, 160], atol=3)


def test_train_start_uniform_and_eval_centered(tmp_path):
    path = gray_video(tmp_path / "ramp.mp4", np.arange(0, 250, 10))  # 25 frames, frame i has level 10 i
    ds = data.VideoClips([(path, 0)], num_frames=4, stride=3, size=16, train=True)  # span 10 -> starts 0..15
    starts = []
    for epoch in range(200):  # an item's draws are fixed by (seed, epoch, index): a new epoch, a new start
        ds.epoch = epoch
        starts.append(round(unnormalize(ds[0][0])[:, 0].mean().item() / 10))
    assert set(starts) == set(range(16))  # every fitting start occurs, nothing else
    eval_ds = data.VideoClips([(path, 0)], num_frames=4, stride=3, size=16, train=False)
    first = unnormalize(eval_ds[0][0]).mean(dim=(0, 2, 3)) / 10
    np.testing.assert_allclose(first.numpy(), [7, 10, 13, 16], atol=0.3)  # centred: start 15 // 2


@pytest.mark.parametrize("height,width", [(256, 340), (240, 320), (340, 256), (64, 64), (90, 160)])
def test_multiscale_crop_geometry(height, width):
    size = 224 if min(height, width) > 200 else 48
    short = min(height, width)
    sides = [int(short * s) for s in data.MULTISCALE_SCALES]
    sides = [size if abs(s - size) < 3 and size <= short else s for s in sides]
    g = torch.Generator().manual_seed(0)
    pairs, positions = set(), set()
    for _ in range(3000):
        top, left, h, w = data.multiscale_crop_box(height, width, size, generator=g)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width  # inside the frame
        assert h in sides and w in sides and abs(sides.index(h) - sides.index(w)) <= 1  # scales, aspect
        h_step, w_step = (height - h) // 4, (width - w) // 4
        assert (top == 0 or top % h_step == 0) and (left == 0 or left % w_step == 0)  # on the fixed grid
        pairs.add((sides.index(h), sides.index(w)))
        if h_step and w_step:
            positions.add((left // w_step, top // h_step))
    assert len(pairs) == 10  # all scale pairs with |i - j| <= 1 are drawn
    if min(height, width) > 200:
        assert positions == set(data.FIXED_CROP_GRID)  # exactly the 13 released positions


def test_crop_resize_exact_when_no_resize():
    frames = torch.randint(0, 256, (4, 50, 70, 3), dtype=torch.uint8)
    out = data.crop_resize(frames, (5, 11, 32, 32), 32)
    ref = frames[:, 5:37, 11:43].permute(3, 0, 1, 2)  # (3, T, 32, 32)
    assert out.shape == (3, 4, 32, 32) and out.dtype == torch.uint8 and out.is_contiguous()
    assert torch.equal(out, ref) and torch.equal(data.crop_resize(frames, (5, 11, 32, 32), 32, flip=True), ref.flip(-1))


def test_device_normalisation_equals_the_float_pipeline():
    # Clips leave the workers as uint8 (a quarter of float32's bytes) and are normalised where the model runs;
    # the result equals what the dataset returned before, float32 (x / 255 - mean) / std, to 1e-6, for batches
    # (B, 3, T, S, S) and repeated-sampling batches (B, R, 3, T, S, S) alike.
    frames = torch.randint(0, 256, (4, 50, 70, 3), dtype=torch.uint8)
    clip = data.crop_resize(frames, (3, 7, 40, 48), 32)  # a real resize
    float_pipeline = (clip.float() / 255 - MEAN) / STD  # (3, T, S, S), the dataset's former float32 output
    batch = torch.stack([clip, clip.flip(-1)])  # (2, 3, T, S, S) uint8
    out = data.normalize(batch)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.stack([float_pipeline, float_pipeline.flip(-1)]), rtol=0, atol=1e-6)
    torch.testing.assert_close(data.normalize(batch[None]), out[None], rtol=0, atol=0)
    with pytest.raises(TypeError, match="uint8"):
        data.normalize(out)  # normalising twice is refused


def test_prefetch_on_cpu_yields_the_batches_themselves():
    batches = [torch.randint(0, 256, (2, 3), dtype=torch.uint8) for _ in range(3)]
    out = list(data.prefetch(iter(batches), torch.device("cpu")))
    assert len(out) == 3 and all(a is b for a, b in zip(out, batches))


def test_prefetch_on_cuda_copies_ahead_on_a_side_stream(monkeypatch):
    # The CUDA branch with its streams recorded instead of run (no GPU here): the copy of batch i + 1 must be
    # queued on the side stream before batch i is handed out, and batch i used only after the compute stream has
    # waited for the side stream and recorded the batch as in use on it. Batch 0's copy cannot overlap anything.
    events, current = [], [None]

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    @contextlib.contextmanager
    def on(stream):
        current[0] = stream.name
        yield
        current[0] = None

    class OnGPU:
        def __init__(self, i):
            self.i = i
            events.append(f"copy {i} on {current[0]}")

        def record_stream(self, stream):
            events.append(f"{self.i} recorded on {stream.name}")

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream("side"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream("compute"))
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(data, "to_device", lambda i, device: OnGPU(i))
    for batch in data.prefetch(iter(range(3)), torch.device("cuda")):
        events.append(f"step {batch.i}")
    step = ["compute waits for side", "{0} recorded on compute", "copy {1} on side", "step {0}"]
    assert events == ["copy 0 on side", *[e.format(0, 1) for e in step], *[e.format(1, 2) for e in step],
                      "compute waits for side", "2 recorded on compute", "step 2"]


def test_repeats_and_multiview(tmp_path):
    ds = data.VideoClips([(UCF, 7)], num_frames=8, stride=4, size=64, train=True, repeats=3)
    torch.manual_seed(0)
    clips, labels = ds[0]
    assert clips.shape == (3, 3, 8, 64, 64) and labels.tolist() == [7, 7, 7]
    assert not torch.equal(clips[0], clips[1])  # independent starts / crops
    views = data.VideoClips([(UCF, 7)], num_frames=8, stride=4, size=64, train=False, num_clips=2, num_crops=3)
    a, labels = views[0]
    assert a.shape == (6, 3, 8, 64, 64) and labels.tolist() == [7] * 6
    assert torch.equal(a, views[0][0])  # deterministic
    full = torch.from_numpy(sequential_decode(UCF))  # (240, 240, 320, 3)
    for k, start in enumerate([0, 240 - 29]):  # clips at the first and last start
        for j, left in enumerate([0, 40, 80]):  # short-side squares: left, centre, right
            box = (0, left, 240, 240)
            ref = data.crop_resize(full[start:start + 29:4], box, 64)
            torch.testing.assert_close(a[k * 3 + j], ref)
    with pytest.raises(ValueError):
        data.VideoClips([(UCF, 0)], train=False, repeats=2)


# ============ layouts ============

def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_kinetics_official_csv(tmp_path, capfd):
    rows = [("abseiling", "aaa", 0, 10), ("zumba", "bbb", 5, 15), ('"passing American football (in game)"',
                                                                     "ccc", 12, 22), ("zumba", "ddd", 1, 11)]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n" + "".join(f"{l},{y},{s},{e},train\n" for l, y, s, e in rows))
    (tmp_path / "annotations" / "val.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nzumba,eee,3,13,val\n")
    touch(tmp_path / "train" / "aaa_000000_000010.mp4")  # flat
    touch(tmp_path / "train" / "zumba" / "bbb_000005_000015.mp4")  # inside a class folder
    touch(tmp_path / "train" / "passing American football (in game)" / "ccc_000012_000022.mp4")
    touch(tmp_path / "val" / "eee_000003_000013.mp4")  # ddd is missing: dropped and reported
    ds = data.build_video_dataset("k400", tmp_path, "train")
    assert ds.classes == ["abseiling", "passing American football (in game)", "zumba"] and ds.num_classes == 3
    assert sorted((Path(p).name[:3], y) for p, y in ds.samples) == [("aaa", 0), ("bbb", 2), ("ccc", 1)]
    assert "1 of 4 listed videos are missing" in capfd.readouterr().err
    assert ds.stride == 4
    val = data.build_video_dataset("k400", tmp_path, "val")
    assert val.classes == ds.classes and [y for _, y in val.samples] == [2]  # ids from the train CSV


def test_kinetics_folder_per_class_and_list_files(tmp_path):
    for c, n in (("b_class", 2), ("a_class", 3)):
        for i in range(n):
            touch(tmp_path / "train" / c / f"{i}.mp4")
    touch(tmp_path / "train" / "a_class" / "notes.txt")  # not a video
    ds = data.build_video_dataset("k400", tmp_path, "train")
    assert ds.classes == ["a_class", "b_class"] and sorted(y for _, y in ds.samples) == [0, 0, 0, 1, 1]
    # VideoMAE list named like the official CSV: '<path> <label>', relative or absolute paths
    other = touch(tmp_path / "elsewhere" / "x y.mp4")
    (tmp_path / "val.csv").write_text(f"train/a_class/0.mp4 4\n{other} 1\n")
    val = data.build_video_dataset("k400", tmp_path, "val")
    assert [(Path(p).name, y) for p, y in val.samples] == [("0.mp4", 4), ("x y.mp4", 1)] and val.num_classes == 5
    lst = data.build_video_dataset("list", tmp_path, "val", stride=3)
    assert lst.samples == val.samples and lst.stride == 3
    by_file = data.build_video_dataset("list", tmp_path / "val.csv", stride=None)  # root = the list file
    assert by_file.samples == val.samples and by_file.stride == 4


def test_ssv2_json(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "labels.json").write_text(json.dumps(
        {"Pushing something from left to right": "1", "Approaching something with your camera": "0"}))
    (tmp_path / "labels" / "train.json").write_text(json.dumps([
        {"id": "12", "label": "pushing a cup from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
        {"id": "7", "label": "approaching a tree with your camera",
         "template": "Approaching [something] with your camera", "placeholders": ["a tree"]}]))
    (tmp_path / "labels" / "validation.json").write_text(json.dumps([
        {"id": "3", "template": "Approaching [something] with your camera", "placeholders": ["x"]}]))
    for i in ("12", "7", "3"):
        touch(tmp_path / "20bn-something-something-v2" / f"{i}.webm")
    ds = data.build_video_dataset("ssv2", tmp_path, "train")
    assert ds.classes == ["Approaching something with your camera", "Pushing something from left to right"]
    assert [(Path(p).name, y) for p, y in ds.samples] == [("12.webm", 1), ("7.webm", 0)] and ds.stride == 2
    assert [y for _, y in data.build_video_dataset("ssv2", tmp_path, "val").samples] == [0]


def test_ucf101_split_files(tmp_path):
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n3 HandstandPushups\n")
    (lists / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
                                           "HandstandPushups/v_HandStandPushups_g08_c01.avi 3\n")
    (lists / "testlist01.txt").write_text("Archery/v_Archery_g01_c01.avi\nApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n")
    (lists / "trainlist02.txt").write_text("Archery/v_Archery_g01_c01.avi 2\n")
    for rel in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "HandstandPushups/v_HandStandPushups_g08_c01.avi",
                "Archery/v_Archery_g01_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"):
        touch(tmp_path / "UCF-101" / rel)
    train = data.build_video_dataset("ucf101", tmp_path, "train")
    assert train.classes == ["ApplyEyeMakeup", "Archery", "HandstandPushups"]
    assert [y for _, y in train.samples] == [0, 2]  # 1-based classInd -> 0-based labels
    test = data.build_video_dataset("ucf101", tmp_path, "val")  # 'val' = the official test list
    assert [(Path(p).parent.name, y) for p, y in test.samples] == [("Archery", 1), ("ApplyEyeMakeup", 0)]
    assert [y for _, y in data.build_video_dataset("ucf101", tmp_path, "train", fold=2).samples] == [1]


def test_hmdb51_split_files(tmp_path):
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    (splits / "wave_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    (splits / "cartwheel_test_split1.txt").write_text("d.avi 2 \ne.avi 1 \n")
    (splits / "cartwheel_test_split2.txt").write_text("d.avi 1 \n")
    for c, f in (("wave", "a"), ("wave", "b"), ("wave", "c"), ("cartwheel", "d"), ("cartwheel", "e")):
        touch(tmp_path / c / f"{f}.avi")
    train = data.build_video_dataset("hmdb51", tmp_path, "train")
    assert train.classes == ["cartwheel", "wave"]
    assert sorted((Path(p).stem, y) for p, y in train.samples) == [("a", 1), ("e", 0)]
    test = data.build_video_dataset("hmdb51", tmp_path, "test")
    assert sorted((Path(p).stem, y) for p, y in test.samples) == [("b", 1), ("d", 0)]


@pytest.mark.parametrize("name", ["k400", "ssv2", "ucf101", "hmdb51", "list"])
def test_missing_or_empty_root_names_path_and_layout(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="expected layout") as missing:
        data.build_video_dataset(name, tmp_path / "nope", "train")
    assert str(tmp_path / "nope") in str(missing.value)
    with pytest.raises(FileNotFoundError, match="expected layout"):
        data.build_video_dataset(name, tmp_path, "train")  # exists, but empty
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_video_dataset("kinetics", tmp_path, "train")


# ============ SSv2 segment sampling (released loader) ============

def released_test_indices(n, T):
    """The released SSv2 test loader's index arithmetic, written out literally: 2T indices (offset
    tick/2 and 0), sorted; test view k (chunk_nb) takes every other one from k."""
    tick = n / float(T)
    all_index = sorted([int(tick / 2.0 + tick * x) for x in range(T)] + [int(tick * x) for x in range(T)])
    return [all_index[k::2] for k in range(2)], [int(tick / 2.0 + tick * x) for x in range(T)]


def test_segment_positions_test_views_match_released_formula():
    for n in range(5, 400, 3):  # also shorter than T
        (first, second), validation = released_test_indices(n, 16)
        two = data.segment_positions(n, 16, train=False, num_clips=2)
        assert two.tolist() == [first, second], n
        assert data.segment_positions(n, 16, train=False).tolist() == [validation], n  # one view: segment centres


@pytest.mark.parametrize("n", [16, 17, 31, 48, 100, 203])
def test_segment_positions_train_one_random_frame_per_segment(n):
    T = 16
    avg = n // T
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([data.segment_positions(n, T, train=True, generator=g) for _ in range(400)])  # (400, T)
    lo = torch.arange(T) * avg
    assert ((draws >= lo) & (draws < lo + avg)).all()  # exactly one frame in each segment [x*avg, (x+1)*avg)
    assert set(draws.flatten().tolist()) == set(range(T * avg))  # every frame of every segment is drawn
    assert n - T * avg < T  # only the remainder of n // T (less than one segment) is never drawn, as released


def test_segment_positions_short_video_uses_every_frame():
    assert data.segment_positions(10, 16, train=True).tolist() == [[x * 10 // 16 for x in range(16)]]


def test_segments_sampling_on_real_and_ramp_videos(tmp_path):
    """VideoClips(sampling='segments'): eval views = the released 2 temporal views x 3 crops on a real
    UCF101 clip, frame-exact; train clips draw one frame per segment (a gray ramp names each frame)."""
    views = data.VideoClips([(UCF, 7)], num_frames=8, size=64, train=False, num_clips=2, num_crops=3,
                            sampling="segments")
    a, labels = views[0]
    assert a.shape == (6, 3, 8, 64, 64) and labels.tolist() == [7] * 6
    full = torch.from_numpy(sequential_decode(UCF))  # (240, 240, 320, 3)
    for k, positions in enumerate(released_test_indices(240, 8)[0]):
        for j, left in enumerate([0, 40, 80]):  # short-side squares: left, centre, right
            ref = data.crop_resize(full[positions], (0, left, 240, 240), 64)
            torch.testing.assert_close(a[k * 3 + j], ref)
    path = gray_video(tmp_path / "ramp.mp4", np.arange(48) * 5)  # 48 frames, frame i has level 5 i
    ds = data.VideoClips([(path, 0)], num_frames=8, size=16, train=True, sampling="segments")
    frames = []
    for epoch in range(60):
        ds.epoch = epoch
        frames.append(torch.round(unnormalize(ds[0][0]).mean(dim=(0, 2, 3)) / 5).long())  # (T,)
    frames = torch.stack(frames)  # (60, 8) frame positions
    assert ((frames // 6) == torch.arange(8)).all()  # segment x = frames 6x .. 6x+5
    assert len(frames.unique()) > 40  # random within the segments
    with pytest.raises(ValueError, match="segments"):
        data.VideoClips([(UCF, 0)], sampling="tsn")


# ============ loader ============

class RandomItems(torch.utils.data.Dataset):
    """Returns the augmentation RNG's next draw, like VideoClips' crops and starts."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.randint(0, 2 ** 30, ())


def test_loader_seeding_differs_per_worker_and_repeats_per_seed():
    def draws(seed):
        loader = data.make_loader(RandomItems(), batch_size=2, num_workers=2, shuffle=True, seed=seed)
        return torch.cat(list(loader)).tolist()
    a, b, c = draws(0), draws(0), draws(1)
    assert a == b and a != c
    assert len(set(a)) == 8  # workers do not repeat each other's draws


def random_clips(tiny_synthetic, **kwargs):
    """The tiny synthetic train set as flipped, multi-scale-cropped training clips."""
    return data.build_video_dataset("synthetic", tiny_synthetic, "train", num_frames=4, size=32, flip=True, **kwargs)


def test_clips_do_not_depend_on_the_number_of_workers(tiny_synthetic):
    """An item's starts, crops and flips come from (seed, epoch, index): a loader without workers and one with 2
    give the same batches, so a run may be resumed with another --workers."""
    def batches(workers, epoch, seed=0):
        loader = data.make_loader(random_clips(tiny_synthetic), batch_size=4, num_workers=workers, seed=seed)
        data.set_epoch(loader, epoch)
        return [clips for clips, _ in loader]

    torch.manual_seed(1)  # the global RNG is not what the clips depend on
    a = batches(0, 1)
    torch.manual_seed(2)
    b = batches(2, 1)
    assert len(a) == len(b) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))
    c = batches(0, 2)
    assert not any(torch.equal(x, y) for x, y in zip(a, c))  # another epoch, other clips
    assert not any(torch.equal(x, y) for x, y in zip(a, batches(0, 1, seed=1)))  # another seed, other clips


@pytest.mark.parametrize("sampling", data.SAMPLINGS)
def test_an_item_read_twice_is_the_same_clip(tiny_synthetic, sampling):
    ds = random_clips(tiny_synthetic, repeats=2, sampling=sampling)
    clips, _ = ds[3]
    assert not torch.equal(clips[0], clips[1])  # the views of an item draw independently
    assert torch.equal(ds[3][0], clips)
    ds.epoch = 1
    assert not torch.equal(ds[3][0], clips)


def test_resume_with_other_workers_equals_uninterrupted(tiny_synthetic, tmp_path):
    """train.py lets --workers change on resume: the clips (and so the weights) must not depend on it."""
    full, split = tmp_path / "full", tmp_path / "split"
    assert train.main(tiny_args(tiny_synthetic, full, "--workers", "0")) == 0
    assert train.main(tiny_args(tiny_synthetic, split, "--workers", "0", "--max_epochs_this_run", "1")) == 0
    assert train.main(tiny_args(tiny_synthetic, split, "--workers", "2")) == 0  # resumed after epoch 1
    a, b = weights(full), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distributed_loader_and_set_epoch(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        ds = data.VideoClips([(UCF, i) for i in range(10)], num_frames=2, size=16)
        loader = data.make_loader(ds, batch_size=4, num_workers=0, shuffle=True, drop_last=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler) and len(loader) == 2
        orders = []
        for epoch in (0, 1, 0):
            data.set_epoch(loader, epoch)
            orders.append(list(loader.sampler))
        assert orders[0] == orders[2] != orders[1]
    finally:
        dist.destroy_process_group()


def test_layout_errors_name_the_dataset_the_line_and_what_is_wrong(tmp_path):
    from data import build_video_dataset
    listing = tmp_path / "train.txt"
    listing.write_text("a.mp4 0\nb.mp4\n")  # the second line has no label
    with pytest.raises(FileNotFoundError, match=r"line 2 is not '<path> <integer label>'"):
        build_video_dataset("list", listing)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(FileNotFoundError, match="data root is a file"):
        build_video_dataset("k400", not_a_folder)
    (tmp_path / "synth" / "train").mkdir(parents=True)  # an existing built-in root with no videos
    with pytest.raises(FileNotFoundError, match=r"^synthetic: no <class>/<video> files"):
        build_video_dataset("synthetic", tmp_path / "synth")
