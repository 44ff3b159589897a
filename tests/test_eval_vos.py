"""eval_vos.py: k-means against planted clusters and a literal Lloyd loop, both matchings against
brute force, TimeT's standardisation + PCA against numpy's SVD, oracle features (the masks as
features) scoring 1.0 under both feature preparations and the best score the tube resolution
allows on real frames, noise far below it, the token -> map layout, and end-to-end runs (random
init and a briefly trained checkpoint) on real DAVIS frames (tests/data/vos) and on a small
synthetic set, with their JSON (which frames each clip used) and PNGs."""
import dataclasses
import itertools
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_vos
import launch
from test_data import touch
from data import build_video_dataset, normalize, tube_mask
from synthetic import synthetic_dataset
from eval_vos import (VOSDataset, confusion, dense_features, hungarian, kmeans, kmeans_pp, label_maps, lloyd,
                      many_to_one, miou, prepare, segment, standardise_pca, ytvos_categories)
from model import build_model, load_encoder

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
DAVIS = REPO / "tests" / "data" / "vos"  # 2 DAVIS-2016 val sequences x 16 frames, 128x72 (see its README)


def read_png(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)  # (3, H, W) uint8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: OpenMP threads that spin-wait for each other make small ops slower than
    one thread does, far slower when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def blobs(n_per, centres, spread, seed=0):
    """Gaussian blobs around `centres` (K, D) -> points (K*n_per, D), true cluster ids (K*n_per,)."""
    K, D = centres.shape
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(K * n_per, D, generator=gen(seed))
    return x, torch.arange(K).repeat_interleave(n_per)


def is_relabelling(a, b, k):
    """True if partitions a and b agree up to renaming the clusters."""
    conf = confusion(a, b, k, k)
    return bool(((conf > 0).sum(0) == 1).all() and ((conf > 0).sum(1) == 1).all())


# ============ the clips: DAVIS and YouTube-VOS ============

def test_davis2016_real_sequences_consecutive_runs():
    ds = VOSDataset(DATA / "davis", "davis2016", size=64, sampling="consecutive")
    assert len(ds) == 2  # 20 annotated frames each -> floor(20 / 16) = 1 clip per sequence
    item = ds[0]
    assert item["name"] == "blackswan" and item["frame_ids"] == [f"{i:05d}" for i in range(16)]
    assert item["frames"].shape == (3, 16, 64, 64) and item["frames"].dtype == torch.uint8
    assert item["masks"].shape == (16, 64, 64) and item["masks"].dtype == torch.int64
    assert set(item["masks"].unique().tolist()) == {0, 1}  # 255 -> 1
    original = np.stack([np.asarray(Image.open(DATA / "davis/Annotations/480p/blackswan" / f"{i:05d}.png"))
                         for i in range(16)]) > 0
    assert abs(item["masks"].float().mean().item() - original.mean()) < 0.01  # nearest resize keeps the area
    assert len(VOSDataset(DATA / "davis", "davis2016", clip_len=4, size=32, sampling="consecutive")) == 10


def davis_ids(seq):
    return sorted(p.stem for p in (DATA / "davis/Annotations/480p" / seq).glob("*.png"))


def test_uniform_sampling_spans_real_davis_sequences(tmp_path):
    """TimeT's protocol (the default): one clip per sequence, T distinct frames drawn over the whole
    sequence, sorted; the ids are literally sorted(random.sample(range(n), T)) with the per-sequence
    seed, and the masks returned are those of the frames named."""
    ds = VOSDataset(DATA / "davis", "davis2016", clip_len=8, size=32)
    assert [name for name, _, _ in ds.clips] == ["blackswan", "car-shadow"]  # one clip per sequence
    for index, seq in enumerate(["blackswan", "car-shadow"]):
        ids, item = davis_ids(seq), ds[index]
        want = sorted(random.Random(f"0/{seq}").sample(range(len(ids)), 8))  # TimeT: random.sample, sorted
        assert item["frame_ids"] == [ids[i] for i in want] and item["sequence_frames"] == 20
        for t, i in enumerate(item["frame_ids"]):  # each mask is the named frame's (areas differ per frame)
            area = (np.asarray(Image.open(DATA / "davis/Annotations/480p" / seq / f"{i}.png")) > 0).mean()
            assert abs(item["masks"][t].float().mean().item() - area) < 0.03
    # over seeds: every frame is drawn, each about T/n = 40% of the time, and clips span the sequence
    picks = [[int(i) for i in VOSDataset(DATA / "davis", "davis2016", clip_len=8, size=32, seed=s).clips[0][1]]
             for s in range(200)]
    counts = np.bincount(np.concatenate(picks), minlength=20) / 200
    assert len(counts) == 20 and counts.min() > 0.28 and counts.max() < 0.52
    spans = [p[-1] - p[0] for p in picks]
    assert np.mean(spans) > 14 and min(spans) > 7  # a consecutive run of 8 spans 7; expected 2*(8/9)*19 - 2 ~ 15.8
    assert all(p == sorted(set(p)) for p in picks)
    # a sequence shorter than the clip: drawn with replacement (TimeT: random.choices), still sorted
    long_clip = VOSDataset(DATA / "davis", "davis2016", clip_len=24, size=32).clips[0][1]
    assert len(long_clip) == 24 and long_clip == sorted(long_clip) and set(long_clip) <= set(davis_ids("blackswan"))
    # the frames of a sequence do not depend on which other sequences are listed
    for sub in ("JPEGImages", "Annotations"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "480p").symlink_to(DATA / "davis" / sub / "480p")
    (tmp_path / "ImageSets/2016").mkdir(parents=True)
    (tmp_path / "ImageSets/2016/val.txt").write_text("car-shadow\n")
    alone = VOSDataset(tmp_path, "davis2016", clip_len=8, size=32)
    assert alone.clips == ds.clips[1:]
    with pytest.raises(ValueError, match="consecutive"):
        VOSDataset(DATA / "davis", "davis2016", sampling="dense")


def test_davis2017_palette_instances_and_missing_masks(tmp_path):
    src = DATA / "davis"
    for i in range(18):
        (tmp_path / "JPEGImages/480p/swan").mkdir(parents=True, exist_ok=True)
        (tmp_path / "Annotations/480p/swan").mkdir(parents=True, exist_ok=True)
        Image.open(src / f"JPEGImages/480p/blackswan/{i:05d}.jpg").save(tmp_path / f"JPEGImages/480p/swan/{i:05d}.jpg")
        fg = np.asarray(Image.open(src / f"Annotations/480p/blackswan/{i:05d}.png")) > 0
        ids = np.where(fg, 1, 0).astype(np.uint8)
        ids[:, 80:][fg[:, 80:]] = 2  # right half of the swan becomes instance 2
        png = Image.fromarray(ids, mode="P")
        png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
        png.save(tmp_path / f"Annotations/480p/swan/{i:05d}.png")
    (tmp_path / "ImageSets/2017").mkdir(parents=True)
    (tmp_path / "ImageSets/2017/val.txt").write_text("swan\n")
    item = VOSDataset(tmp_path, "davis2017", size=80)[0]
    assert set(item["masks"].unique().tolist()) == {0, 1, 2}
    assert (item["masks"][:, :, :40] != 2).all() and (item["masks"][:, :, 40:] != 1).all()  # instance ids kept
    (tmp_path / "JPEGImages/480p/ghost").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "JPEGImages/480p/ghost/00000.jpg")
    (tmp_path / "ImageSets/2017/val.txt").write_text("swan\nghost\n")
    with pytest.raises(FileNotFoundError, match="ghost"):
        VOSDataset(tmp_path, "davis2017")
    with pytest.raises(FileNotFoundError, match="val.txt"):
        VOSDataset(tmp_path / "nope", "davis2016")


def write_meta(root, objects):
    """YouTube-VOS meta.json: objects = {video: {instance id: category}}."""
    videos = {v: {"objects": {str(k): {"category": c, "frames": []} for k, c in objs.items()}}
              for v, objs in objects.items()}
    (root / "meta.json").write_text(json.dumps({"videos": videos}))


def test_ytvos_annotated_frames_and_seeded_fraction(tmp_path):
    for v in range(10):
        for f in range(0, 45, 1):
            touch(tmp_path / "JPEGImages" / f"vid{v}" / f"{f:05d}.jpg")
        for f in range(0, 45, 5):  # every 5th frame annotated
            touch(tmp_path / "Annotations" / f"vid{v}" / f"{f:05d}.png")
    write_meta(tmp_path, {f"vid{v}": {1: "cat"} for v in range(10)})
    a = VOSDataset(tmp_path, "ytvos", seed=0, sampling="consecutive")
    b = VOSDataset(tmp_path, "ytvos", seed=0, sampling="consecutive")
    assert a.clips == b.clips and len({name for name, _, _ in a.clips}) == 2  # 20% of 10 videos
    assert len(a) == 2 * 2  # 9 annotated frames -> 2 clips of 4
    assert a.clips[0][1] == ["00000", "00005", "00010", "00015"]  # consecutive *annotated* frames
    others = {tuple(sorted({n for n, _, _ in VOSDataset(tmp_path, "ytvos", seed=s).clips})) for s in range(10)}
    assert len(others) > 1  # the seed picks the subset
    uniform = VOSDataset(tmp_path, "ytvos", seed=0)  # the default: one clip of 4 annotated frames per video
    assert [n for n, _, _ in uniform.clips] == [n for n, _, _ in a.clips[::2]]
    assert all(len(set(ids)) == 4 and all(int(i) % 5 == 0 for i in ids) for _, ids, _ in uniform.clips)


def test_ytvos_labels_are_category_ids_from_meta_json(tmp_path):
    """Two objects of one category share its id; ids are 1 + the rank of the category name among all
    categories in meta.json (TimeT's make_categories_dict), whichever videos are evaluated."""
    write_meta(tmp_path, {"v0": {1: "person", 2: "person", 3: "dog"}, "v1": {1: "zebra"}, "v2": {5: "cat"}})
    assert ytvos_categories(tmp_path / "meta.json") == {"v0": {1: 3, 2: 3, 3: 2}, "v1": {1: 4}, "v2": {5: 1}}
    ids = np.zeros((40, 60), np.uint8)
    ids[:, :20], ids[:, 20:40], ids[:20, 40:] = 1, 2, 3  # instances 1, 2 (people), 3 (dog); background below right
    for f in range(4):
        touch(tmp_path / "JPEGImages/v0" / f"{f:05d}.jpg")
        Image.new("RGB", (60, 40)).save(tmp_path / "JPEGImages/v0" / f"{f:05d}.jpg")
        png = Image.fromarray(ids, mode="P")
        png.putpalette([v % 256 for v in range(768)])
        (tmp_path / "Annotations/v0").mkdir(parents=True, exist_ok=True)
        png.save(tmp_path / "Annotations/v0" / f"{f:05d}.png")
    masks = VOSDataset(tmp_path, "ytvos", fraction=1.0, size=60)[0]["masks"]  # (4, 60, 60)
    assert masks.unique().tolist() == [0, 2, 3]  # background, dog, person (cat = 1, zebra = 4: other videos)
    assert (masks[:, :, :40] == 3).all() and (masks[:, :30, 40:] == 2).all() and (masks[:, 30:, 40:] == 0).all()
    write_meta(tmp_path, {"v0": {1: "person", 3: "dog"}})  # instance 2 is not listed
    with pytest.raises(ValueError, match=r"'v0' has mask values \[2\]"):
        VOSDataset(tmp_path, "ytvos", fraction=1.0)[0]
    (tmp_path / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        VOSDataset(tmp_path, "ytvos")


# ============ k-means ============

def test_kmeans_finds_planted_clusters():
    centres = F.normalize(torch.randn(5, 16, generator=gen(1)), dim=1)
    x, truth = blobs(60, centres, 0.05)
    assign, inertia = kmeans(x, 5, restarts=5, generator=gen(2))
    assert is_relabelling(assign, truth, 5)
    # the kept run's inertia is the planted clusters' own spread: sum of squared distances to their means
    means = torch.stack([x[truth == c].mean(0) for c in range(5)])
    assert inertia.min().item() == pytest.approx(((x - means[truth]) ** 2).sum().item(), rel=1e-4)


def literal_lloyd(x, centroids, iters):
    """Lloyd's algorithm one point and one cluster at a time (a single run)."""
    c = centroids.clone()
    for _ in range(iters):
        assign = [min(range(len(c)), key=lambda j: ((p - c[j]) ** 2).sum().item()) for p in x]
        for j in range(len(c)):
            members = [p for p, a in zip(x, assign) if a == j]
            if members:
                c[j] = torch.stack(members).mean(0)
    return torch.tensor(assign), c


def test_lloyd_matches_literal_loop_for_every_restart():
    x = torch.randn(80, 4, generator=gen(3)).double()
    init = kmeans_pp(x, 4, restarts=3, generator=gen(4))  # (3, 4, 4)
    # k-means++ draws its centroids among the data points, never the same one twice
    for run in init:
        picked = [int((x - c).norm(dim=1).argmin()) for c in run]
        assert len(set(picked)) == 4 and all(torch.allclose(x[i], c) for i, c in zip(picked, run))
    assign, centroids, inertia = lloyd(x, init, iters=5, tol=0.0)
    for r in range(3):
        want_assign, want_c = literal_lloyd(x, init[r], 5)
        assert torch.allclose(centroids[r], want_c)
        # returned assignment: each point's nearest returned centroid, inertia its summed squared distance
        d2 = ((x[:, None] - centroids[r][None]) ** 2).sum(-1)  # (P, K)
        assert torch.equal(assign[r], d2.argmin(1))
        assert inertia[r].item() == pytest.approx(d2.min(1).values.sum().item())


def test_restarts_keep_the_lowest_inertia():
    # 8 blobs in a ring, 8 clusters: single k-means++ runs often join two blobs and split another
    angle = torch.arange(8) * (2 * torch.pi / 8)
    x, truth = blobs(30, torch.stack([angle.cos(), angle.sin()], 1), 0.12, seed=5)
    assign, inertia = kmeans(x, 8, restarts=12, generator=gen(6))
    assert inertia.max() > 1.2 * inertia.min()  # the restarts really ended in different local minima
    sse = sum(((x[assign == c] - x[assign == c].mean(0)) ** 2).sum() for c in assign.unique())
    assert sse.item() == pytest.approx(inertia.min().item(), rel=1e-4)  # the kept labels are the best run's
    assert is_relabelling(assign, truth, 8)


# ============ matching and scoring against brute force ============

def literal_miou(pred, gt):
    """mIoU over the labels in gt, from sets of pixel positions."""
    pred, gt = pred.flatten().tolist(), gt.flatten().tolist()
    scores = []
    for label in sorted(set(gt)):
        p = {i for i, v in enumerate(pred) if v == label}
        g = {i for i, v in enumerate(gt) if v == label}
        scores.append(len(p & g) / len(p | g))
    return sum(scores) / len(scores)


def random_maps(k, n_labels, seed, n=60):
    g = gen(seed)
    gt = torch.cat([torch.arange(n_labels), torch.randint(n_labels, (n - n_labels,), generator=g)])  # all present
    clusters = torch.where(torch.rand(n, generator=g) < 0.6, gt % k, torch.randint(k, (n,), generator=g))
    return clusters, gt


@pytest.mark.parametrize("k", [2, 3, 4])
def test_miou_and_hungarian_match_brute_force(k):
    for seed in range(10):
        clusters, gt = random_maps(k, k, seed)
        mapping = hungarian(confusion(clusters, gt, k, k))
        assert sorted(mapping.tolist()) == list(range(k))  # one-to-one
        ours = miou(mapping[clusters], gt, k)
        assert ours == pytest.approx(literal_miou(mapping[clusters], gt))
        best = max(literal_miou(torch.tensor(perm)[clusters], gt) for perm in itertools.permutations(range(k)))
        assert ours == pytest.approx(best)


@pytest.mark.parametrize("k,n_labels", [(2, 2), (4, 2), (5, 3), (6, 3)])
def test_many_to_one_matches_brute_force(k, n_labels):
    for seed in range(10):
        clusters, gt = random_maps(k, n_labels, seed)
        mapping = many_to_one(confusion(clusters, gt, k, n_labels))
        # each cluster's label has the highest precision |c & l| / |c| of all labels (literal count)
        for c in clusters.unique().tolist():
            precision = [((clusters == c) & (gt == l)).sum() / (clusters == c).sum() for l in range(n_labels)]
            assert precision[mapping[c]] == max(precision)
        # ... which is the many-to-one map that labels the most pixels correctly, among all L^K maps
        correct = lambda m: (torch.tensor(m)[clusters] == gt).sum().item()
        assert correct(mapping.tolist()) == max(correct(m) for m in itertools.product(range(n_labels), repeat=k))


# ============ TimeT's feature preparation ============

def test_standardise_pca_matches_numpy_svd():
    """Standardise each channel, then project on the principal axes: the reference is numpy's SVD of
    the standardised matrix (right singular vectors = covariance eigenvectors), up to each axis' sign."""
    g = gen(7)
    x = torch.randn(300, 20, generator=g) @ torch.randn(20, 20, generator=g) * torch.linspace(0.1, 30, 20)
    x[:, 3] = 5.0  # a constant channel: centred, not divided by 0
    ours = standardise_pca(x, 6).double().numpy()  # (300, 6)
    z = x.double().numpy()
    std = z.std(0)
    z = (z - z.mean(0)) / np.where(std > 0, std, 1)
    _, sing, vt = np.linalg.svd(z, full_matrices=False)
    ref = z @ vt[:6].T  # (300, 6)
    signs = np.sign((ours * ref).sum(0))
    np.testing.assert_allclose(ours * signs, ref, atol=1e-4)
    np.testing.assert_allclose(ours.var(0), sing[:6] ** 2 / 300, rtol=1e-4)  # variances, largest first
    assert standardise_pca(x, 50).shape == (300, 20)  # fewer channels than 50: all are kept (a rotation)


def test_timet_preparation_ignores_channel_scales_and_l2_does_not():
    """Standardisation makes the clusters independent of each channel's scale; L2-normalised tokens
    are dominated by one channel scaled up 1000x."""
    gt = blocky_labels()
    feats = oracle_features(gt, 2, noise=0.3)  # (4, 4, 16, 16)
    scaled = feats.clone()
    scaled[:, 1] *= 1000
    for features, same in (("timet", True), ("l2", False)):
        a = segment(feats, gt, 4, eval_vos.hungarian, features, generator=gen(0))[1]
        b = segment(scaled, gt, 4, eval_vos.hungarian, features, generator=gen(0))[1]
        assert is_relabelling(a.flatten(), b.flatten(), 4) == same, features


# ============ oracle and noise features ============

def oracle_features(gt, tubelet, dim=None, noise=0.05, seed=0):
    """The masks as features: one-hot of each tube's first-frame label (one channel per label unless
    dim is given) + noise, (t, D, s, s)."""
    onehot = F.one_hot(gt[::tubelet], dim or int(gt.max()) + 1).permute(0, 3, 1, 2).float()  # (t, D, s, s)
    return onehot + noise * torch.randn(onehot.shape, generator=gen(seed))


def blocky_labels(T=8, s=16, n_labels=4, seed=0):
    """Label maps (T, s, s) with every label present, constant over each pair of frames (one tube)."""
    g = gen(seed)
    gt = torch.zeros(T // 2, s, s, dtype=torch.long)
    for label in range(1, n_labels):
        for i in range(T // 2):
            y, x = torch.randint(0, s - 5, (2,), generator=g)
            gt[i, y:y + 5, x:x + 6] = label
    return gt.repeat_interleave(2, 0)


@pytest.mark.parametrize("features", list(eval_vos.FEATURE_PREP))
@pytest.mark.parametrize("name", list(eval_vos.PROTOCOLS))
def test_oracle_scores_one_and_noise_far_lower(name, features):
    gt = blocky_labels()
    n_labels = int(gt.max()) + 1
    k = n_labels if name == "clustering" else 6
    match = eval_vos.PROTOCOLS[name]
    oracle, _, pred = segment(oracle_features(gt, 2), gt, k, match, features, generator=gen(1))
    assert oracle == 1.0 and torch.equal(pred, gt)
    noise = torch.randn(4, 16, 16, 16, generator=gen(2))
    scores = [segment(noise, gt, k, match, features, generator=gen(seed))[0] for seed in range(3)]
    assert max(scores) < 0.5  # noise clusters ignore the objects


@pytest.mark.parametrize("features", list(eval_vos.FEATURE_PREP))
def test_oracle_on_real_davis_scores_one_and_the_tube_resolution_ceiling(features):
    """Real DAVIS clips of the default protocol (8 frames spread over each sequence), masks given as
    features. Scored against the masks of each tube's first frame the oracle gets exactly 1.0. A
    tube's cluster map covers its 2 frames, so against every frame's own mask even perfect features
    predict frame 2i+1 with frame 2i's mask: the oracle must score exactly that ceiling, below 1."""
    for item in VOSDataset(DAVIS, "davis2016", clip_len=8, size=64):
        gt = label_maps(item["masks"], 16)  # (8, 16, 16) in {0, 1}
        per_tube = gt[::2].repeat_interleave(2, 0)  # (8, 16, 16): each tube's first-frame mask
        ceiling = miou(per_tube, gt, 2)
        assert 0.5 < ceiling < 1.0, item["name"]  # the objects move between a tube's two frames
        for name, match in eval_vos.PROTOCOLS.items():
            k = 2 if name == "clustering" else 6
            perfect, _, pred = segment(oracle_features(gt, 2), per_tube, k, match, features, generator=gen(0))
            assert perfect == 1.0 and torch.equal(pred, per_tube), (item["name"], name)
            score, _, _ = segment(oracle_features(gt, 2), gt, k, match, features, generator=gen(0))
            assert score == pytest.approx(ceiling), (item["name"], name)


class OracleEncoder(torch.nn.Module):
    """Stands in for the encoder: returns given tokens (1, N, D) in (t, h, w) order."""

    def __init__(self, tokens, cfg):
        super().__init__()
        self.tokens, self.cfg = tokens, cfg

    def forward(self, videos):
        return self.tokens


@pytest.mark.parametrize("features", list(eval_vos.FEATURE_PREP))
def test_dense_features_put_tokens_where_they_belong(features):
    """Tokens that one-hot a label layout at the token grid must come back as maps scoring ~1, and a
    transposed layout (what an (h, w) mix-up would produce) must not."""
    cfg = build_model("tiny", num_prototypes=8).cfg  # grid (4, 8, 8)
    t, h, w = cfg.grid
    coarse = torch.zeros(t, h, w, dtype=torch.long)
    for i in range(t):
        coarse[i, i:i + 2, :] = 1  # a horizontal band moving down: not symmetric under (h, w) transposition
    tokens = F.one_hot(coarse, 8).float().reshape(1, t * h * w, 8)  # (1, N, D) in (t, h, w) order
    feats = dense_features(OracleEncoder(tokens, cfg), torch.zeros(1))[0]  # (t, D, h, w)
    assert feats.shape == (t, 8, h, w) and prepare(feats, 16, features).shape == (t * 16 * 16, 8)
    gt = F.interpolate(coarse[:, None].float(), size=(16, 16), mode="nearest")[:, 0].long()
    gt = gt.repeat_interleave(2, 0)  # (8, 16, 16)
    good = segment(feats, gt, 2, eval_vos.hungarian, features, generator=gen(0))[0]
    bad = segment(feats.transpose(2, 3), gt, 2, eval_vos.hungarian, features, generator=gen(0))[0]
    assert good > 0.85 and bad < 0.5  # good < 1 only where bilinear upsampling blurs the band's edges


# ============ end to end ============

@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory):
    """A small synthetic set (synthetic.synthetic_dataset): 24 training videos, 4 VOS sequences of 16 frames."""
    return synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", num_train=24, num_val=4, num_vos=4,
                             num_frames=16)


@pytest.fixture(scope="module")
def trained_ckpt(small_synthetic, tmp_path_factory):
    """Our checkpoint format, after a few dozen AdamW steps of SIGMA on synthetic training clips."""
    torch.manual_seed(0)
    sigma = build_model("tiny", num_prototypes=64)
    cfg = sigma.cfg
    # folder-per-class like K400 (build_video_dataset("synthetic", root) would insist on the default sizes)
    clips = build_video_dataset("k400", small_synthetic, num_frames=cfg.num_frames, stride=2, size=cfg.img_size)
    videos = normalize(torch.stack([clips[i][0] for i in range(len(clips))]))  # (24, 3, 8, 64, 64)
    opt = torch.optim.AdamW(sigma.parameters(), lr=5e-4)
    for step in range(30):
        batch = videos[torch.randperm(len(videos))[:6]]
        sigma(batch, tube_mask(len(batch), cfg.grid, 0.9))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pth"
    torch.save({"model": sigma.state_dict(), "model_config": dataclasses.asdict(cfg), "epoch": 0, "step": 30}, path)
    return path


def check_report(report, path, n_clips):
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))  # what was returned was written
    assert report["num_clips"] == len(report["clips"]) == n_clips
    for name in eval_vos.PROTOCOLS:
        values = [c[name] for c in report["clips"]]
        assert report["mean"][name] == pytest.approx(sum(values) / len(values))
    for c in report["clips"]:
        assert c["labels"][0] == 0 and len(c["frame_ids"]) == report["config"]["num_frames"]
        assert c["frame_ids"] == sorted(c["frame_ids"]) and c["sequence_frames"] >= len(set(c["frame_ids"]))
    if report["config"]["sampling"] == "uniform":  # one clip per sequence, its frames all distinct here
        assert len({c["name"] for c in report["clips"]}) == n_clips
        assert all(len(set(c["frame_ids"])) == len(c["frame_ids"]) for c in report["clips"])
    reference = report["config"]["sampling"] == "uniform" and report["config"]["features"] == "timet"
    assert report["protocol"].startswith("TimeT reference protocol" if reference else "NOT the TimeT")


def test_random_tiny_on_real_davis(tmp_path):
    out = tmp_path / "davis.json"
    report = eval_vos.main(["--ckpt", "random", "--arch", "tiny", "--dataset", "davis2016", "--data_root",
                            str(DAVIS), "--num_frames", "8", "--out", str(out), "--vis", "1", "--workers", "0"])
    check_report(report, out, 2)  # 2 sequences -> one clip of 8 frames each, spread over the 16
    assert [c["name"] for c in report["clips"]] == ["blackswan", "motocross-jump"]
    assert all(c["labels"] == [0, 1] for c in report["clips"])
    assert all(int(c["frame_ids"][-1]) - int(c["frame_ids"][0]) > 7 for c in report["clips"])  # not one run
    # Each clip's scores, recomputed from what the report says: its frames, the seed-0 random encoder, k-means
    # seeded by seed + clip index, maps at twice the token grid.
    torch.manual_seed(0)
    encoder, _ = load_encoder("random", "tiny", num_frames=8)
    for c, item in zip(report["clips"], VOSDataset(DAVIS, "davis2016", clip_len=8, size=64)):
        assert item["frame_ids"] == c["frame_ids"]
        feats = dense_features(encoder.eval(), normalize(item["frames"][None]))[0]  # (t, D, h, w)
        gt = label_maps(item["masks"], 16)  # (8, 16, 16) in {0, 1}
        for name, k in (("clustering", 2), ("overclustering", 6)):
            score = segment(feats, gt, k, eval_vos.PROTOCOLS[name], generator=gen(c["index"]))[0]
            assert c[name] == pytest.approx(score, abs=1e-6), (c["name"], name)
    png = read_png((tmp_path / "davis_vis" / "0000_blackswan_clusters.png"))  # (3, H, W) uint8
    # 5 rows x 4 tube slices of 64 px frames with 2 px padding, upscaled 2x to at least 128 px
    assert png.shape == (3, 2 * (5 * 66 + 2), 2 * (4 * 66 + 2))
    # row 2 tints exactly the ground-truth object of row 1 (the swan, scored at 16x16)
    tile = lambda r, c: png[:, 2 * (2 + 66 * r): 2 * (66 + 66 * r), 2 * (2 + 66 * c): 2 * (66 + 66 * c)].int()
    item = VOSDataset(DAVIS, "davis2016", clip_len=8, size=64)[0]
    swan = F.interpolate(label_maps(item["masks"], 16)[:1, None].float(), size=(128, 128), mode="nearest")[0, 0] > 0
    tinted = (tile(1, 0) - tile(0, 0)).abs().sum(0) > 30
    assert (tinted == swan).float().mean() > 0.99  # (a tint equal to the frame's colour is invisible)


def test_consecutive_sampling_and_l2_features_as_options(tmp_path):
    """--sampling consecutive --features l2: non-overlapping runs of consecutive frames, L2-normalised
    tokens; available, and labelled as not the reference protocol."""
    out = tmp_path / "consecutive_l2.json"
    report = eval_vos.main(["--arch", "tiny", "--dataset", "davis2016", "--data_root", str(DAVIS), "--num_frames", "8",
                            "--sampling", "consecutive", "--features", "l2", "--out", str(out), "--workers", "0"])
    check_report(report, out, 4)  # 2 sequences x 16 frames -> 4 clips of 8
    assert [c["frame_ids"] for c in report["clips"][:2]] == [[f"{i:05d}" for i in range(8)],
                                                             [f"{i:05d}" for i in range(8, 16)]]
    assert report["config"]["feature_prep"] == eval_vos.FEATURE_PREP["l2"]


def test_trained_checkpoint_on_synthetic_with_pictures(trained_ckpt, small_synthetic, monkeypatch, capsys):
    monkeypatch.setattr(eval_vos, "synthetic_dataset", lambda: small_synthetic)  # not the 800-video default
    report = eval_vos.main(["--ckpt", str(trained_ckpt), "--dataset", "synthetic", "--vis", "2", "--workers", "0"])
    out = trained_ckpt.parent / "vos_synthetic.json"  # next to the checkpoint
    check_report(report, out, 4)  # 4 sequences of 16 frames -> one clip of the model's 8 frames each
    assert {len(c["labels"]) for c in report["clips"]} <= {2, 3, 4}  # background + 1-3 objects
    vis = trained_ckpt.parent / "vos_synthetic_vis"
    assert sorted(p.name for p in vis.iterdir()) == ["0000_val_00000_clusters.png", "0000_val_00000_prototypes.png",
                                                     "0001_val_00001_clusters.png", "0001_val_00001_prototypes.png"]
    protos = report["clips"][0]["prototype_view"]  # the (up to) 3 prototypes most of the 256 tubes choose
    used = [p["tubes_choosing_it"] for p in protos]
    assert 1 <= len(protos) <= 3 and used == sorted(used, reverse=True) and used[-1] > 0
    assert sum(used) <= 256 and (len(protos) == 3 or sum(used) == 256)
    assert all(p["lit_tubes"] == round(0.1 * 256) for p in protos)
    png = read_png((vis / "0000_val_00000_prototypes.png"))
    assert png.shape == (3, 2 * (len(protos) * 66 + 2), 2 * (4 * 66 + 2))  # one row per prototype
    assert "mIoU over 4 clips (TimeT reference protocol" in capsys.readouterr().out


def test_trained_checkpoint_at_davis_clip_length(trained_ckpt, tmp_path):
    """The trained checkpoint at DAVIS's protocol clip length (16 frames: its position table is
    extended past the 8 frames it saw in training) on the real frames."""
    report = eval_vos.main(["--ckpt", str(trained_ckpt), "--dataset", "davis2016", "--data_root", str(DAVIS),
                            "--out", str(tmp_path / "d.json"), "--workers", "0"])
    check_report(report, tmp_path / "d.json", 2)
    assert report["config"]["grid"] == [8, 8, 8] and report["config"]["feat_size"] == 16


def test_first_look_scores_and_draws_the_clips_it_names(small_synthetic, tmp_path):
    """The end of `python train.py --dataset fashion`: with a checkpoint that holds the random-init encoder of the
    run's seed, "this run" must score and draw exactly as "random init"; the numbers are main()'s reports; the
    picture's first row is the middle frame of the clips picked, the second darkens the ground truth's background."""
    torch.manual_seed(0)  # first_look builds its random-init encoder after the same seed
    sigma = build_model("tiny", num_prototypes=64)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": sigma.state_dict(), "model_config": dataclasses.asdict(sigma.cfg)}, ckpt)
    mious, chance = eval_vos.first_look(str(ckpt), "tiny", 0, small_synthetic, str(tmp_path), num_pictured=4)
    for name, report in (("random init", "first_look_random.json"), ("this run", "first_look.json")):
        assert mious[name] == 100 * json.loads((tmp_path / report).read_text())["mean"]["clustering"]
    assert mious["this run"] == mious["random init"] and 0 < chance < 100

    picture = read_png(tmp_path / "first_look.png")  # 4 rows x 4 clips of 64 px, 2 px apart, drawn at twice the size
    assert picture.shape == (3, 2 * (4 * 66 + 2), 2 * (4 * 66 + 2))
    grid = picture[:, ::2, ::2]  # back at 1x (drawn with nearest-neighbour upsampling)
    tile = lambda row, col: grid[:, 2 + 66 * row:66 + 66 * row, 2 + 66 * col:66 + 66 * col]  # (3, 64, 64)
    dataset = VOSDataset(small_synthetic / "davis", "davis2017", clip_len=16, size=64, sampling="consecutive")
    for col in range(4):  # 4 clips, 4 pictured: every one
        item = dataset[col]
        frame, background = item["frames"][:, 8], item["masks"][8] == 0  # the middle of 16 frames
        assert torch.equal(tile(0, col), frame)
        darkened = (tile(1, col) < frame).any(0)  # (64, 64): the ground truth's label 0, at the 16x16 scoring grid
        assert background[darkened].float().mean() > 0.95 and darkened[background].float().mean() > 0.95
        assert torch.equal(tile(2, col), tile(3, col))  # the same encoder, the same k-means seed


def test_youtube_vos_layout_uses_4_frame_clips_of_a_seeded_fifth(tmp_path):
    """The same two real sequences in the YouTube-VOS train layout (with a meta.json): round(20% of 2)
    = 1 video is drawn, one clip of the protocol's 4 frames (2 tube slices) spread over its 16."""
    for sub in ("JPEGImages", "Annotations"):
        shutil.copytree(DAVIS / sub / "480p", tmp_path / "ytvos" / sub)
    # DAVIS-2016 masks are {0, 255}: object 255, as meta.json would list it
    meta = {"videos": {v: {"objects": {"255": {"category": c, "frames": []}}}
                       for v, c in (("blackswan", "bird"), ("motocross-jump", "motorbike"), ("car-shadow", "car"))}}
    (tmp_path / "ytvos" / "meta.json").write_text(json.dumps(meta))
    report = eval_vos.main(["--dataset", "ytvos", "--data_root", str(tmp_path / "ytvos"), "--workers", "0",
                            "--out", str(tmp_path / "yt.json")])
    check_report(report, tmp_path / "yt.json", 1)
    assert report["config"]["grid"] == [2, 8, 8]
    clip = report["clips"][0]
    assert clip["labels"] == [0, {"bird": 1, "car": 2, "motorbike": 3}[meta["videos"][clip["name"]]["objects"]["255"]
                                                                       ["category"]]]  # category ids


def test_bench_prints_a_row_per_model(capsys):
    eval_vos.main(["--bench", "--bench_archs", "tiny"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[:4] == ["tiny", "8x64x64", "256", "16^2"] and all(float(v) > 0 for v in row[-3:])


# ============ several ranks ============

def torchrun(tmp_path, args, timeout=180):
    """eval_vos.py on 2 gloo ranks (tests/launch.py: a free port; ranks killed past `timeout`, so a hang fails the
    test). '{RANK}' in an argument becomes the rank's number, as a node-local path differs per node.
    -> (exit code, stderr)."""
    r = launch.run([launch.ROOT / "eval_vos.py", *args], nproc=2, timeout=timeout, log_dir=tmp_path)
    return r.code, r.err


@pytest.mark.rehearsal  # torchrun on 2 ranks: `python -m pytest -q -m rehearsal` (CI runs it)
def test_torchrun_shards_clips_and_gathers_the_same_report(tmp_path):
    """Two gloo ranks on the CPU, each taking every other clip, must write what one process writes
    (k-means is seeded per clip index, not per rank)."""
    common = ["--arch", "tiny", "--dataset", "davis2016", "--data_root", str(DAVIS), "--num_frames", "8",
              "--workers", "0"]
    code, err = torchrun(tmp_path, common + ["--out", str(tmp_path / "ddp.json")])
    assert code == 0, err[-2000:]
    single = eval_vos.main(common + ["--out", str(tmp_path / "single.json")])
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["config"]["world_size"] == 2 and ddp["clips"] == single["clips"] and ddp["mean"] == single["mean"]


@pytest.mark.rehearsal  # torchrun on 2 ranks: `python -m pytest -q -m rehearsal` (CI runs it)
def test_torchrun_ranks_that_see_different_sequences_stop_before_any_clip(tmp_path):
    """Rank 1's copy of DAVIS lists one sequence: clip 1 would not exist there (or be another clip). Both
    ranks must stop before any clip, naming what differs."""
    shutil.copytree(DAVIS, tmp_path / "davis0")
    shutil.copytree(DAVIS, tmp_path / "davis1")
    (tmp_path / "davis1" / "ImageSets" / "2016" / "val.txt").write_text("blackswan\n")
    code, err = torchrun(tmp_path, ["--arch", "tiny", "--dataset", "davis2016", "--data_root",
                                    str(tmp_path / "davis{RANK}"), "--num_frames", "8", "--workers", "0",
                                    "--vis", "2", "--out", str(tmp_path / "r.json")])
    assert code != 0
    message = next((line for line in err.splitlines() if "ranks disagree on the davis2016 clips" in line), err[-3000:])
    assert "rank 0 sees 2 clips of 2 sequences" in message and "rank 1 sees 1 clips of 1 sequences" in message
    assert message.endswith("Give every node the same dataset (--data_root).")
    assert not (tmp_path / "r_vis").exists()  # stopped before any clip


@pytest.mark.rehearsal  # torchrun on 2 ranks: `python -m pytest -q -m rehearsal` (CI runs it)
def test_torchrun_bad_protos_on_one_rank_stop_every_rank_before_any_clip(tmp_path):
    """--protos 9 with rank 0's checkpoint holding 8 prototypes (rank 1's: 16): rank 0 holds clip 0, the one
    drawn. The check must run on every rank before any clip, and rank 1 must stop with rank 0's message
    instead of waiting for rank 0's results."""
    for rank, prototypes in ((0, 8), (1, 16)):
        sigma = build_model("tiny", num_prototypes=prototypes)
        torch.save({"model": sigma.state_dict(), "model_config": dataclasses.asdict(sigma.cfg)},
                   tmp_path / f"ckpt{rank}.pth")
    code, err = torchrun(tmp_path, ["--ckpt", str(tmp_path / "ckpt{RANK}.pth"), "--dataset", "davis2016",
                                    "--data_root", str(DAVIS), "--num_frames", "8", "--workers", "0", "--vis", "1",
                                    "--protos", "9", "--out", str(tmp_path / "r.json")])
    assert code != 0
    assert re.search(r"rank 0 failed while loading the prototypes for --vis: UsageError: --protos 9: \S*ckpt0\.pth "
                     r"has prototypes 0\.\.7", err), err[-3000:]
    assert not any((tmp_path / "r_vis").iterdir())  # stopped before the first clip's pictures


def test_runs_inside_a_process_group_that_exists_already(tmp_path, monkeypatch):
    """train.py's first look under `torchrun --nproc_per_node=1` calls main() in a process whose group torchrun's
    RANK already made train.py start: main() must use that group, not start a second one (an error), and
    leave it running for its caller."""
    import torch.distributed as dist
    monkeypatch.setenv("RANK", "0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        report = eval_vos.main(["--arch", "tiny", "--dataset", "davis2016", "--data_root", str(DAVIS),
                                "--num_frames", "8", "--max_clips", "1", "--workers", "0",
                                "--out", str(tmp_path / "r.json")])
        assert report["num_clips"] == 1 and report["config"]["world_size"] == 1
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


# ============ errors that say what to do ============

def test_missing_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_root .*nowhere.* is not a folder"):
        eval_vos.main(["--arch", "tiny", "--dataset", "davis2017", "--data_root", str(tmp_path / "nowhere")])


def test_sequence_without_masks_is_named(tmp_path):
    shutil.copytree(DAVIS, tmp_path / "davis")
    shutil.rmtree(tmp_path / "davis" / "Annotations" / "480p" / "motocross-jump")
    with pytest.raises(FileNotFoundError, match="motocross-jump"):
        eval_vos.main(["--arch", "tiny", "--dataset", "davis2016", "--data_root", str(tmp_path / "davis")])


def test_prototype_view_skipped_when_phi_cannot_be_rebuilt(tmp_path, capsys):
    """A SIGMA-DINO checkpoint whose DINO weights file is not on this machine: the cluster pictures
    are drawn, the prototype view is skipped with the reason."""
    sigma = build_model("tiny", num_prototypes=8)
    cfg = dataclasses.replace(sigma.cfg, target="dino", dino_weights=str(tmp_path / "dino_vits16.pth"))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sigma.state_dict(), "model_config": dataclasses.asdict(cfg)}, path)
    eval_vos.main(["--ckpt", str(path), "--dataset", "davis2016", "--data_root", str(DAVIS), "--num_frames", "8",
                   "--max_clips", "1", "--vis", "1", "--workers", "0"])
    assert "prototype view (Fig. 4) skipped: cannot rebuild phi" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "vos_davis2016_vis").iterdir()] == ["0000_blackswan_clusters.png"]


def test_checkpoint_that_does_not_fit_is_named(tmp_path):
    path = tmp_path / "released_layout.pth"  # no model_config: the user must say the arch, and says vit_s
    torch.save({"model": build_model("tiny", num_prototypes=8).state_dict()}, path)
    with pytest.raises(ValueError, match="preset 'tiny'"):
        eval_vos.main(["--ckpt", str(path), "--arch", "vit_s", "--dataset", "davis2016", "--data_root", str(DAVIS)])


# ============ bad options stop at start ============

@pytest.mark.parametrize("option, value", [("--k_over", "0"), ("--pca_dim", "0"), ("--restarts", "0"),
                                           ("--iters", "0"), ("--tol", "-1"), ("--proto_frac", "0"),
                                           ("--feat_size", "-2"), ("--arch", "vit_h"), ("--bench_archs", "vit_h"),
                                           ("--workers", "-1"), ("--protos", "-3"), ("--device", "tpu")])
def test_bad_option_stops_before_any_data_with_its_name(option, value, capsys, monkeypatch):
    """Each bad value exits 2 (argparse's code) naming the option, before a frame or weight is read."""
    monkeypatch.setattr(eval_vos, "build_dataset", lambda *a, **k: pytest.fail("data read before the check"))
    monkeypatch.setattr(eval_vos, "open_encoder", lambda *a, **k: pytest.fail("weights read before the check"))
    with pytest.raises(SystemExit) as info:
        eval_vos.main(["--dataset", "synthetic", "--device", "cpu", option, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"{option} {value}".replace("tpu", "'tpu'") in err
    assert "e.g." in err or "choose from" in err


def test_cuda_device_without_a_gpu_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        eval_vos.main(["--device", "cuda"])
    assert info.value.code == 2 and "--device cuda: no CUDA device here; use --device cpu" in capsys.readouterr().err


def test_bad_options_from_the_command_line_are_listed_without_traceback(tmp_path):
    """Several bad values at once: one message each, the usage line, exit 2, no traceback."""
    cmd = [sys.executable, "eval_vos.py", "--device", "cpu", "--k_over", "0", "--pca_dim", "0", "--restarts", "0",
           "--ckpt", str(tmp_path / "no.pth")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "usage:" in done.stderr
    for text in ("--k_over 0: must be >= 1", "--pca_dim 0: must be >= 1", "--restarts 0: must be >= 1",
                 "no.pth' does not exist"):
        assert text in done.stderr


def test_truncated_checkpoint_is_named(tmp_path):
    torch.save({"model": build_model("tiny").state_dict()}, tmp_path / "whole.pth")
    bad = tmp_path / "cut.pth"
    bad.write_bytes((tmp_path / "whole.pth").read_bytes()[:1000])
    done = subprocess.run([sys.executable, "eval_vos.py", "--ckpt", str(bad), "--device", "cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--ckpt: cannot read checkpoint" in done.stderr and "cut.pth" in done.stderr
    assert "truncated or corrupt" in done.stderr and "pickled code" not in done.stderr


# ============ the command line: help, datasets by train.py's names, user errors ============

from test_eval_linear import help_problems  # noqa: E402

# Options whose None is their genuine meaning: none here; each would be listed with the words saying what it means.
NONE_MEANS = {}


def test_help_explains_every_option_and_shows_no_none_default():
    parser = eval_vos.build_parser()
    assert help_problems(parser, NONE_MEANS) == []
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and "--device DEVICE cpu, cuda or cuda:N (default: cuda if a GPU" in text


def test_fashion_reads_the_clips_study_py_reads_from_the_generated_root(tmp_path, monkeypatch):
    """--dataset fashion = the DAVIS-layout clips in the fashion set's davis/ folder, the clips study.py reads
    (--data_root <set>/davis --dataset davis2017); without --data_root the set synthetic.fashion_dataset() makes."""
    from synthetic import fashion_dataset
    small = fashion_dataset(tmp_path / "fashion", num_train=4, num_val=4, num_vos=2)
    monkeypatch.setattr(eval_vos, "fashion_dataset", lambda: small)
    common = ["--ckpt", "random", "--arch", "tiny", "--sampling", "consecutive", "--features", "l2", "--workers", "0",
              "--device", "cpu"]
    ours = eval_vos.main([*common, "--dataset", "fashion", "--out", str(tmp_path / "a.json")])
    study = eval_vos.main([*common, "--dataset", "davis2017", "--data_root", str(small / "davis"),
                           "--out", str(tmp_path / "b.json")])
    assert ours["num_clips"] == study["num_clips"] == 2 and ours["config"]["num_frames"] == 16
    assert ours["clips"] == study["clips"] and ours["mean"] == study["mean"]


@pytest.mark.parametrize("extra, words", [
    (["--img_size", "60"], "img_size 60 is not a multiple of patch_size 8"),
    (["--num_frames", "7"], "num_frames 7 is not a multiple of tubelet_size"),
    (["--ckpt", "{not_ours}"], "is not one of our checkpoints: pass its arch"),
    (["--dataset", "davis2016", "--data_root", "{nowhere}"], "is not a folder"),
])
def test_user_errors_reach_the_command_line_as_a_message(extra, words, tmp_path):
    """A model setting the model refuses, a checkpoint that is not an encoder, a data folder that is not there:
    exit 2 with the message naming the option, no traceback."""
    torch.save({"weights": torch.zeros(2)}, tmp_path / "not_ours.pth")
    extra = [e.format(not_ours=tmp_path / "not_ours.pth", nowhere=tmp_path / "nowhere") for e in extra]
    done = subprocess.run([sys.executable, "eval_vos.py", "--device", "cpu", "--workers", "0", *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("eval_vos.py: error: --") and words in done.stderr, done.stderr
