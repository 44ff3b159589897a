"""Tests for the prepared clip store (store.py: prepare_video, the kmeans codebook; data.prepare_dataset and
`python store.py --prepare`): store.py stands under data.py and never imports it, exactness on the real clips,
the jpeg and kmeans PSNR bounds, nearest-centroid parity, a corrupt or foreign codebook, same sampling and crops
through VideoClips, every layout, bad inputs (corrupt source, interrupted prepare, other-version store, bad
options), and train.py bitwise equal on a lossless copy.

    python -m pytest -q tests/test_store.py      # ~65 s of CPU time (user + sys)
"""
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import store  # noqa: E402
import train  # noqa: E402
from model import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")
VIDEOS = ROOT / "tests" / "data" / "videos"
REAL_CLIPS = sorted(VIDEOS.iterdir())  # K400 (H.264 MP4), 2 x HMDB51 (DivX AVI), UCF101 (Xvid AVI)
# The kmeans store's bound with the default codebook (1024 centroids of 4x4) learned on these clips: every frame
# of every clip at or above it (measured worst frames 25.5 / 31.5 / 26.3 / 31.9 dB, see docs/store.md).
KMEANS_PSNR = 25.0


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as in DataLoader workers (two threads on two busy cores spend their time waiting
    for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def codebook(tmp_path_factory):
    """A codebook of the default size learned on the four real clips (16 evenly spaced frames each): the
    store's "sample of the dataset"; the file sits at the store root, as prepare_dataset puts it."""
    root = tmp_path_factory.mktemp("store")
    store.save_codebook(root / store.CODEBOOK, store.learn_codebook(store.sample_frames(REAL_CLIPS, frames=16)))
    return root / store.CODEBOOK


@pytest.fixture(scope="module")
def entries(codebook):
    """{(clip name, codec): entry path} for every real clip and codec, prepared once."""
    tmp = codebook.parent
    return {(p.name, c): store.prepare_video(p, tmp / c, c, codebook=codebook if c == "kmeans" else None)
            for p in REAL_CLIPS for c in store.CODECS}


def original(path):
    """Every position of the original decode, plus 3 past the end (-> last frame), uint8 (N+3, H, W, 3)."""
    with data.Video(path) as video:
        return video.read(range(video.num_frames + 3)).numpy(), video.num_frames


# ============ exactness and quality ============

@pytest.mark.parametrize("path", REAL_CLIPS, ids=lambda p: p.name[:20])
def test_lossless_store_returns_the_original_frames(entries, path):
    ref, num_frames = original(path)
    entry = entries[(path.name, "magicyuv")]
    assert entry == entry.parent / path.name and store.is_entry(entry) and not store.is_entry(path)
    with data.open_video(entry) as video:
        assert isinstance(video, store.StoredVideo) and video.num_frames == num_frames  # the packet count
        np.testing.assert_array_equal(video.read(range(num_frames + 3)).numpy(), ref)
    with data.open_video(entry) as video:
        idx = [num_frames - 1, 0, 7, 7, num_frames + 9, 3]  # any order, repeats, past the end
        np.testing.assert_array_equal(video.read(idx).numpy(), ref[np.minimum(idx, len(ref) - 1)])
        assert video.decoded == 4  # only the distinct wanted frames were decoded (the last one once)


@pytest.mark.parametrize("path", REAL_CLIPS, ids=lambda p: p.name[:20])
def test_jpeg_store_holds_the_psnr_bound(entries, path):
    ref, num_frames = original(path)
    with data.open_video(entries[(path.name, "jpeg")]) as video:
        got = video.read(range(num_frames + 3)).numpy()
        scores = [store.psnr(a, b) for a, b in zip(got, ref)]
        assert min(scores) >= store.MIN_PSNR == 40.0  # every frame, not just on average
        assert video.header["min_psnr"] == round(min(scores), 2)  # the entry states its worst frame
        assert np.abs(got.astype(int) - ref).mean() < 1.5  # and no frame is shifted (that would be ~20)


@pytest.mark.parametrize("codec", store.CODECS)
def test_videoclips_same_labels_sampling_and_crops(entries, codec):
    path = VIDEOS / "R6llTwEh07w.mp4"
    entry = entries[(path.name, codec)]
    for kwargs in (dict(train=True, repeats=2), dict(train=False, num_clips=2, num_crops=3)):
        clips = []
        for p in (path, entry):
            torch.manual_seed(0)  # same draws: starts and boxes depend only on num_frames and the frame size
            clips.append(data.VideoClips([(p, 5)], num_frames=8, stride=4, size=64, **kwargs)[0])
        (a, la), (b, lb) = clips
        assert torch.equal(la, lb) and a.shape == b.shape
        if codec == "magicyuv":
            assert torch.equal(a, b)
        else:
            err = (a.float() - b.float()).pow(2).mean()  # uint8 clips: pixel levels
            bound = store.MIN_PSNR if codec == "jpeg" else KMEANS_PSNR
            assert 10 * torch.log10(255 ** 2 / err) > bound  # resizing only averages the error down


# ============ the kmeans codec ============

@pytest.mark.parametrize("path", REAL_CLIPS, ids=lambda p: p.name[:20])
def test_kmeans_store_holds_its_psnr_bound_and_stores_nearest_centroids(entries, codebook, path):
    ref, num_frames = original(path)
    with data.open_video(entries[(path.name, "kmeans")]) as video:
        got = video.read(range(num_frames + 3)).numpy()
        assert got.shape == ref.shape and got.dtype == np.uint8
        scores = [store.psnr(a, b) for a, b in zip(got, ref)]
        assert min(scores) >= KMEANS_PSNR  # every frame
        assert video.header["min_psnr"] == round(min(scores), 2) and video.header["codebook_size"] == 1024
    # Parity with the definition: each stored patch is the centroid nearest to the original patch (squared L2
    # by torch.cdist; ties and float rounding allowed for by comparing distances, not ids).
    book = store.load_codebook(codebook)
    frame = ref[num_frames // 2]
    patches = store.to_patches(frame, book.patch).reshape(-1, 3 * book.patch ** 2).float()  # (h*w, D)
    centroids = book.centroids.reshape(book.size, -1).float()
    dist = torch.cdist(patches, centroids) ** 2  # (h*w, K)
    chosen = dist.gather(1, book.encode(frame).view(-1, 1))[:, 0]
    assert torch.allclose(chosen, dist.min(1).values, rtol=1e-4, atol=1e-2)
    decoded = book.decode(book.encode(frame))[:frame.shape[0], :frame.shape[1]].numpy()
    np.testing.assert_array_equal(decoded, got[num_frames // 2])  # the entry holds exactly those ids


def test_kmeans_round_trip_shapes_and_lookup():
    torch.manual_seed(0)
    centroids = torch.randint(0, 256, (50, 3, 3, 3), dtype=torch.uint8)  # P=3: 9-byte rows, no wide word
    book = store.Codebook(centroids)
    frame = torch.randint(0, 256, (31, 44, 3), dtype=torch.uint8)  # not multiples of 3: edge patches padded
    ids = book.encode(frame)
    assert ids.shape == (11, 15) and ids.dtype == torch.long
    out = book.to("cpu").decode(ids[None].repeat(2, 1, 1))  # (2, 33, 45, 3): a batch of frames at once
    assert out.shape == (2, 33, 45, 3) and out.dtype == torch.uint8
    i, j = 7, 12  # pixel (i*3 + r, j*3 + c) is pixel (r, c) of the centroid chosen for patch (i, j)
    assert torch.equal(out[1, i * 3:i * 3 + 3, j * 3:j * 3 + 3], centroids[ids[i, j]])
    # A frame made of centroids is encoded exactly.
    exact = book.decode(torch.randint(0, 50, (4, 5)))
    assert torch.equal(book.decode(book.encode(exact)), exact)


def test_kmeans_entry_whose_frames_are_not_whole_patches(tmp_path):
    """340x256 frames with 3x3 patches: 86 x 114 patches, decoded and cropped back to the frame size."""
    path = VIDEOS / "R6llTwEh07w.mp4"
    book = store.learn_codebook(store.sample_frames([path], frames=2), patch=3, size=64, steps=5, batch=512)
    store.save_codebook(tmp_path / store.CODEBOOK, book)
    ref, num_frames = original(path)
    entry = store.prepare_video(path, tmp_path / "km", "kmeans", codebook=tmp_path / store.CODEBOOK)
    with data.open_video(entry) as video:
        got = video.read([0, num_frames - 1, 5])
    assert got.shape == (3, 256, 340, 3) and store.psnr(got[0].numpy(), ref[0]) > 15
    np.testing.assert_array_equal(got[0].numpy(), book.decode(book.encode(ref[0]))[:256, :340].numpy())
    clip, _ = data.VideoClips([(entry, 0)], num_frames=4, size=32, train=True)[0]
    assert clip.shape == (3, 4, 32, 32)


def test_codebook_lookup_follows_its_device():
    """decode() makes nothing on the CPU by itself: on the 'meta' device (shapes only) it stays there, as it
    stays on a GPU after Codebook.to('cuda')."""
    book = store.Codebook(torch.zeros(16, 4, 4, 3, dtype=torch.uint8)).to("meta")
    out = book.decode(torch.zeros(2, 5, 7, dtype=torch.long, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 20, 28, 3) and out.dtype == torch.uint8


def test_learn_codebook_is_deterministic():
    frames = list(store.sample_frames(REAL_CLIPS[:1], frames=2))
    a, b = (store.learn_codebook(frames, patch=4, size=32, steps=5, batch=512) for _ in range(2))
    c = store.learn_codebook(frames, patch=4, size=32, steps=5, batch=512, seed=1)
    assert a.digest == b.digest != c.digest and a.centroids.shape == (32, 4, 4, 3)
    with pytest.raises(ValueError, match="smaller codebook"):
        store.learn_codebook(frames[:1], patch=16, size=4096)  # 1 frame of 340x256: 352 patches < 4096


class NotATensor:  # pickled by reference: torch.load(weights_only=True) must refuse it
    pass


def test_corrupt_or_foreign_codebook_is_refused_naming_the_file(entries, codebook, tmp_path):
    entry = entries[("R6llTwEh07w.mp4", "kmeans")]
    copy = tmp_path / "kmeans" / entry.name
    copy.parent.mkdir()
    shutil.copy(entry, copy)  # its header names ../sigma_codebook.pt, here tmp_path / CODEBOOK
    target, good = tmp_path / store.CODEBOOK, codebook.read_bytes()
    own = store.load_codebook(codebook)
    other = store.Codebook(own.centroids.flip(0).contiguous())  # same shape and patch, other centroids
    cases = {
        "no codebook": (None, "cannot read"),
        "truncated": (good[:len(good) // 2], "truncated or corrupt"),
        "garbage": (b"not a torch file" * 8, "truncated or corrupt"),
        "pickled code": ({"kind": "sigma kmeans codebook", "centroids": NotATensor()}, "pickled objects"),
        "wrong shape": ({**torch.load(codebook, weights_only=True), "centroids": torch.zeros(1024, 4, 4, 4,
                                                                                             dtype=torch.uint8)},
                        "do not match"),
        "a checkpoint": ({"model": {"w": torch.zeros(3)}}, "not a k-means codebook"),
        "flipped bits": ({**torch.load(codebook, weights_only=True), "centroids": other.centroids},
                         "do not match the digest"),
        "other patch size": (store.Codebook(torch.zeros(1024, 8, 8, 3, dtype=torch.uint8)), "8x8 patches"),
        "other centroids": (other, "is not the one"),
    }
    for name, (content, message) in cases.items():
        target.unlink(missing_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        elif isinstance(content, store.Codebook):
            store.save_codebook(target, content)
        elif content is not None:
            torch.save(content, target)
        with pytest.raises(store.CodebookError, match=message) as err:
            store.StoredVideo(copy)
        assert str(target) in str(err.value), name
        ds = data.VideoClips([(copy, 0)], num_frames=4, size=32)
        with pytest.raises(store.CodebookError):  # stops the run: never skipped as one bad video
            ds[0]
    shutil.copy(codebook, target)
    with store.StoredVideo(copy) as video:  # its own codebook back: read as before
        assert video.read([0]).shape == (1, 256, 340, 3)


def test_prepare_dataset_kmeans_learns_its_codebook_once(tiny_synthetic, tmp_path):
    out = tmp_path / "out"
    assert data.prepare_dataset("synthetic", tiny_synthetic, out, codec="kmeans", workers=1,
                                 codebook_size=64) == []
    digest = store.load_codebook(out / store.CODEBOOK).digest
    ds = data.build_video_dataset("synthetic", out, "train", num_frames=4, size=32)
    assert all(store.is_entry(p) for p, _ in ds.samples) and ds[0][0].shape == (3, 4, 32, 32)
    with store.StoredVideo(ds.samples[0][0]) as video:
        assert video.header["codebook_digest"] == digest and video.header["codebook"] == "../../sigma_codebook.pt"
    data.prepare_dataset("synthetic", tiny_synthetic, out, codec="kmeans", workers=1, codebook_size=64)
    assert store.load_codebook(out / store.CODEBOOK).digest == digest  # resumed: kept, not relearned
    with pytest.raises(ValueError, match="other settings"):
        data.prepare_dataset("synthetic", tiny_synthetic, out, codec="kmeans", workers=1, codebook_size=128)


@pytest.mark.parametrize("argv, message", [(["--codec", "zip"], "--codec 'zip': choose one of"),
                                           (["--patch", "0"], "--patch 0: must be >= 1"),
                                           (["--codebook_size", "1"], "--codebook_size 1: must be >= 2"),
                                           (["--prepare"], "--prepare needs --out"),
                                           (["--prepare", "--out", "x", "--dataset", "k400"], "needs --data_root"),
                                           (["--prepare", "--out", "x", "--dataset", "k4"], "--dataset 'k4'")])
def test_bad_options_stop_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        data.store_main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# ============ layering ============

def _loads_data(node):
    """True when the AST node imports data.py: import data / from data import ... / __import__("data") /
    importlib.import_module("data")."""
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "data" for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").split(".")[0] == "data"
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        name = getattr(node.func, "id", getattr(node.func, "attr", ""))
        return name in ("__import__", "import_module") and str(node.args[0].value).split(".")[0] == "data"
    return False


def test_store_py_never_imports_data_py():
    """store.py is the lower layer: no import of data.py anywhere in it (module level, functions, methods), except
    the hand-over of `python store.py` to data.store_main right under `if __name__ == "__main__":`, which an
    `import store` never runs. Checked in the source and at run time, and the hand-over still works."""
    tree = ast.parse((ROOT / "store.py").read_text())
    script = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
    handover = {id(n) for block in script for n in block.body}
    found = [n.lineno for n in ast.walk(tree) if _loads_data(n) and id(n) not in handover]
    assert found == [], f"store.py imports data.py (lines {found}): the two files would import each other again"
    loaded = subprocess.run([sys.executable, "-c", "import sys, store; print(sorted(set(sys.modules) & {'data'}))"],
                            cwd=ROOT, capture_output=True, text=True)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stderr
    bad = subprocess.run([sys.executable, "store.py", "--codec", "zip"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--codec 'zip': choose one of" in bad.stderr


# ============ layouts ============

def video(path, src):
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, path)  # FFmpeg probes the content, so a .webm / .avi name over MP4 bytes still decodes


@pytest.mark.parametrize("name", ["k400", "ssv2", "ucf101", "hmdb51", "list"])
def test_every_layout_reads_its_store(tiny_synthetic, tmp_path, name):
    src, out = tmp_path / "src", tmp_path / "out"
    a, b = sorted((tiny_synthetic / "train").rglob("*.mp4"))[:2]
    if name == "k400":
        (src / "annotations").mkdir(parents=True)
        (src / "annotations" / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                                       "x,aaa,0,10,train\ny,bbb,0,10,train\n")
        video(src / "train" / "x" / "aaa_000000_000010.mp4", a), video(src / "train" / "bbb_000000_000010.mp4", b)
    elif name == "ssv2":
        (src / "labels").mkdir(parents=True)
        (src / "labels" / "labels.json").write_text(json.dumps({"Pushing something": "0", "Moving something": "1"}))
        (src / "labels" / "train.json").write_text(json.dumps([{"id": "1", "template": "Moving [something]"},
                                                               {"id": "2", "template": "Pushing [something]"}]))
        (src / "labels" / "validation.json").write_text("[]")
        video(src / "20bn-something-something-v2" / "1.webm", a), video(src / "20bn-something-something-v2" / "2.webm", b)
    elif name == "ucf101":
        (src / "ucfTrainTestlist").mkdir(parents=True)
        (src / "ucfTrainTestlist" / "classInd.txt").write_text("1 A\n2 B\n")
        (src / "ucfTrainTestlist" / "trainlist01.txt").write_text("A/v_A_g01_c01.avi 1\nB/v_B_g01_c01.avi 2\n")
        video(src / "UCF-101" / "A" / "v_A_g01_c01.avi", a), video(src / "UCF-101" / "B" / "v_B_g01_c01.avi", b)
    elif name == "hmdb51":
        (src / "testTrainMulti_7030_splits").mkdir(parents=True)
        (src / "testTrainMulti_7030_splits" / "wave_test_split1.txt").write_text("w.avi 1 \n")
        (src / "testTrainMulti_7030_splits" / "run_test_split1.txt").write_text("r.avi 1 \n")
        video(src / "wave" / "w.avi", a), video(src / "run" / "r.avi", b)
    else:
        src.mkdir()
        (src / "train.txt").write_text("clips/one.mp4 3\nclips/two two.mp4 1\n")
        video(src / "clips" / "one.mp4", a), video(src / "clips" / "two two.mp4", b)
    assert data.prepare_dataset(name, src, out, workers=1) == []
    before, after = data.build_video_dataset(name, src, "train"), data.build_video_dataset(name, out, "train")
    assert [(Path(p).relative_to(src), y) for p, y in before.samples] == \
        [(Path(p).relative_to(out), y) for p, y in after.samples] and before.classes == after.classes
    assert all(store.is_entry(p) for p, _ in after.samples)
    assert after[0][0].shape == before[0][0].shape


# ============ bad input ============

def test_corrupt_source_is_skipped_and_listed(tiny_synthetic, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_synthetic, src)
    broken = sorted((src / "train").rglob("*.mp4"))[3]
    broken.write_bytes(broken.read_bytes()[:300])  # truncated: the header survives, no frame does
    (src / "val" / "rotating" / "empty.mp4").write_bytes(b"")
    bad = data.prepare_dataset("synthetic", src, tmp_path / "out", workers=2)
    listed = (tmp_path / "out" / "unreadable.txt").read_text().splitlines()
    assert len(bad) == len(listed) == 2 and all("\t" in line for line in listed)  # path <tab> the error
    assert {line.split("\t")[0] for line in listed} == {str(broken.relative_to(src)), "val/rotating/empty.mp4"}
    ds = data.build_video_dataset("synthetic", tmp_path / "out", "train")
    assert len(ds) == 15 and all(store.is_entry(p) for p, _ in ds.samples)  # the other 15 train videos


def test_interrupted_entry_write_leaves_nothing_acceptable(tmp_path):
    def frames_then_crash():
        yield np.zeros((16, 16, 3), np.uint8)
        raise KeyboardInterrupt  # e.g. Ctrl-C mid-video
    with pytest.raises(KeyboardInterrupt):
        store.write_entry(tmp_path / "a.mp4", frames_then_crash(), 2)
    assert list(tmp_path.iterdir()) == []  # no entry, and the temporary file is gone
    # A kill -9 can leave a temporary file, or a copy can be cut short: neither is read as a video.
    entry = store.prepare_video(VIDEOS / "R6llTwEh07w.mp4", tmp_path / "full")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(entry.read_bytes()[:-100])
    with pytest.raises(ValueError, match="incomplete store entry"):
        store.StoredVideo(cut)
    ds = data.VideoClips([(cut, 0), (entry, 1)], num_frames=4, size=32, train=False, max_bad_fraction=0.9)
    assert ds[0][1] == 1 and ds.bad == {0}  # skipped like any corrupt video


def test_killed_prepare_resumes_to_the_same_store(tiny_synthetic, tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    data.prepare_dataset("synthetic", tiny_synthetic, ref, workers=1)
    cmd = [sys.executable, str(ROOT / "store.py"), "--prepare", "--dataset", "synthetic",
           "--data_root", str(tiny_synthetic), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: starting python + torch can take a minute when the cores are busy
    while time.time() < deadline and len(list(out.rglob("*.mp4"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run, workers included, mid-write
    proc.wait()
    done = list(out.rglob("*.mp4"))
    assert 3 <= len(done) < 24, "the run should have been killed midway"
    assert all(store.is_complete_entry(p) for p in done)  # whatever has a final name is a whole entry
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout
    assert f"{24 - len(done)} videos prepared, {len(done)} already done" in resumed
    assert not list(out.rglob("*.tmp-*"))
    for p in ref.rglob("*.mp4"):  # identical to an uninterrupted run, entry for entry
        assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes()


def test_store_of_another_version_is_refused(tiny_synthetic, tmp_path, monkeypatch):
    out = tmp_path / "out"
    data.prepare_dataset("synthetic", tiny_synthetic, out, workers=1)
    marker = json.loads((out / store.MARKER).read_text())
    (out / store.MARKER).write_text(json.dumps({**marker, "version": store.STORE_VERSION + 1}))
    for attempt in (lambda: data.build_video_dataset("synthetic", out, "train"),
                    lambda: data.prepare_dataset("synthetic", tiny_synthetic, out, workers=1)):
        with pytest.raises(store.StoreVersionError, match="python store.py --prepare"):
            attempt()
    monkeypatch.setattr(store, "STORE_VERSION", 0)  # an entry written by an older version of the code
    old = store.prepare_video(VIDEOS / "R6llTwEh07w.mp4", tmp_path / "old")
    monkeypatch.undo()
    ds = data.VideoClips([(old, 0)], num_frames=4, size=32)
    with pytest.raises(store.StoreVersionError, match="version 0"):  # refused, not skipped as "corrupt"
        ds[0]


# ============ training ============

def test_train_on_a_lossless_store_is_bitwise_the_same_run(tiny_synthetic, tmp_path):
    data.prepare_dataset("synthetic", tiny_synthetic, tmp_path / "store", codec="magicyuv", workers=1)
    runs = {}
    for name, root in (("original", tiny_synthetic), ("store", tmp_path / "store")):
        args = ["--data_root", str(root), "--out", str(tmp_path / name), "--batch_size", "8", "--micro_batch",
                "8", "--epochs", "1", "--warmup_epochs", "0", "--num_prototypes", "32", "--workers", "1",
                "--seed", "0"]
        assert train.main(args) == 0
        runs[name] = load_checkpoint(str(tmp_path / name / "ckpt.pth"))["model"]
    a, b = runs["original"], runs["store"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_short_side_shrinks_larger_frames_and_is_part_of_the_store(tiny_synthetic, tmp_path):
    entry = store.prepare_video(VIDEOS / "R6llTwEh07w.mp4", tmp_path / "s", short_side=128)  # 340x256 source
    with data.open_video(entry) as video:
        assert video.read([0, 5]).shape == (2, 128, 170, 3) and video.header["short_side"] == 128
    small = store.prepare_video(VIDEOS / "R6llTwEh07w.mp4", tmp_path / "big", short_side=300)  # never enlarged
    with data.open_video(small) as video:
        assert video.read([0]).shape == (1, 256, 340, 3)
    data.prepare_dataset("synthetic", tiny_synthetic, tmp_path / "out", workers=1, short_side=32)
    with pytest.raises(ValueError, match="other settings"):  # no store mixes two resolutions or codecs
        data.prepare_dataset("synthetic", tiny_synthetic, tmp_path / "out", workers=1)
