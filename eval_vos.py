"""
Unsupervised video object segmentation with a frozen encoder (the paper's Table 4), with the protocol
of TimeT (Salehi et al., ICCV 2023), the reference that table follows.

Nothing is trained. The frozen encoder embeds a clip, k-means groups all its tubes' features,
and the groups are compared with the ground-truth objects: features that keep an object's tubes
together and apart from the rest score high.
  clustering      K = number of labels in the clip (background included); clusters are matched
                  one-to-one to labels by Hungarian matching on IoU.
  overclustering  K = 6 (about 3x the mean object count); each cluster is given the label it
                  overlaps most precisely (many-to-one).
Score: per clip, the IoU of every label present (background included), averaged (mIoU); the
dataset score is the mean over clips.

    python eval_vos.py --ckpt out/ckpt.pth --dataset davis2017 --data_root /data/DAVIS
    python eval_vos.py --ckpt out/ckpt.pth --dataset ytvos --data_root /data/YTVOS --vis 4
    python eval_vos.py --ckpt random --arch vit_b --dataset davis2017 --data_root /data/DAVIS
    python eval_vos.py --ckpt random --arch tiny --dataset synthetic --vis 2
    python eval_vos.py --ckpt out/fashion_tiny_mlp_sigma/ckpt.pth --dataset fashion --sampling consecutive \\
        --features l2                # train.py's default set, read as study.py reads it
    torchrun --nproc_per_node=8 eval_vos.py --ckpt out/ckpt.pth --dataset ytvos --data_root /data/YTVOS
    python eval_vos.py --bench       # seconds per clip on this machine, features vs clustering

Two options choose how clips are drawn and what is clustered; numbers compare with the paper's only
under the defaults, which are TimeT's:
  --sampling uniform      one clip per sequence, T frames drawn at random over the whole sequence and
                          sorted (seeded: the same frames on every run)
             consecutive  non-overlapping runs of T consecutive frames (about 4 short clips per DAVIS
                          sequence at T = 16)
  --features timet        per clip, standardise every channel over the clip's tokens, then PCA to
                          --pca_dim 50 dimensions, then Euclidean k-means
             l2           L2-normalised tokens, Euclidean k-means (grouping by cosine similarity)
Every result names the protocol it was measured under (printed and in the JSON). The JSON holds every
clip with the frames of its sequence it used, the means of both protocols and the config; it is written
next to the checkpoint (or --out). --vis N draws the first N clips into <json stem>_vis/:
<clip>_clusters.png has one column per tube (its first frame) and five rows: frame, ground truth,
clustering (labels in the ground truth's colours), overclustering's raw clusters, overclustering after
the many-to-one map; for our checkpoints <clip>_prototypes.png has one row per prototype, its top 10%
tubes lit, the rest dimmed.

Reference (paper Table 4: ViT-B pretrained on K400, DAVIS-2017, clustering / overclustering mIoU):
VideoMAE 27.2 / 50.9, SIGMA-MLP 30.2 / 52.9, SIGMA-DINO 30.6 / 56.5. At laptop scale, `python study.py`
compares random init, VideoMAE and SIGMA with this script on moving Fashion-MNIST (with the read-out
pinned in study.py's VOS). docs/evaluation.md describes the protocol in full, with a run anyone can
repeat on the two DAVIS sequences in tests/data/vos.
"""
import argparse
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torchvision.utils import draw_segmentation_masks, make_grid, save_image
from tqdm import tqdm

import ranks
from data import IMAGENET_MEAN, IMAGENET_STD, crop_resize, normalize
from cli import (HelpFormatter, UsageError, add_device_option, below_minimum, invalid_options, open_encoder,
                 resolve_device, run_cli, setup_distributed)
from model import PRESETS, SIGMA, config_from_dict, inference_autocast, load_checkpoint, load_encoder, load_weights
from synthetic import fashion_dataset, synthetic_dataset, vos_chance

# Clip length of each benchmark (the paper's Table 4, after TimeT): DAVIS clips of 16 frames, YouTube-VOS of 4 (its
# train split is annotated every 5th frame); moving Fashion-MNIST's DAVIS-layout clips as DAVIS (study.py reads them
# as davis2017). The synthetic set uses the model's own clip length.
PROTOCOL_FRAMES = {"davis2017": 16, "davis2016": 16, "ytvos": 4, "fashion": 16}
# The built-in sets (train.py's --dataset names): their DAVIS-layout VOS clips live in <set>/davis, the set generated
# on first use (synthetic.fashion_dataset, synthetic_dataset).
BUILT_IN_VOS = ("fashion", "synthetic")


def get_args(argv=None):
    """Parse and check every option (a bad one stops here, before any weight or frame is read)."""
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    # ============ what to evaluate ============
    p.add_argument("--ckpt", default="random", help="one of our checkpoints (stores its architecture), a released "
                   "SIGMA / VideoMAE checkpoint (then pass --arch), or 'random' for a random-init baseline of --arch")
    p.add_argument("--arch", default=None, help=f"{' | '.join(PRESETS)}; default: our checkpoints' own, tiny for "
                   "'random'; released checkpoints need it")
    p.add_argument("--dataset", default="synthetic", choices=["davis2017", "davis2016", "ytvos", *BUILT_IN_VOS],
                   help="davis2017: val, instance ids; davis2016: val, binary; ytvos: seeded 20%% of train; "
                        "fashion / synthetic: the DAVIS-layout clips of train.py's built-in sets (moving "
                        "Fashion-MNIST, read as davis2017; the procedural set), generated on first use")
    p.add_argument("--data_root", default=None, help="davis2017 / davis2016 / ytvos: the folder holding "
                   "JPEGImages/ and Annotations/ (required); fashion / synthetic: the set's folder, as train.py's "
                   "--data_root (its davis/ holds the clips), default: the generated set (synthetic."
                   "fashion_dataset() / synthetic_dataset(), cached)")
    p.add_argument("--num_frames", type=int, default=0, help="frames per clip; 0 = the protocol's (16 DAVIS and "
                   "fashion, 4 YouTube-VOS; the model's own for synthetic). The encoder's position table follows")
    p.add_argument("--img_size", type=int, default=0, help="frame side in pixels; 0 = the model's (224, tiny 64)")
    p.add_argument("--sampling", default="uniform", choices=list(VOS_SAMPLING), help="uniform: TimeT's protocol, "
                   "one clip of T frames spread over each whole sequence (seeded by --seed); consecutive: "
                   "non-overlapping runs of T consecutive frames")
    p.add_argument("--feat_size", type=int, default=0, help="side of the maps that are clustered and scored; "
                   "0 = twice the token grid (28 for 224/16, as TimeT scores). Larger: finer masks, slower k-means")
    # ============ k-means ============
    p.add_argument("--features", default="timet", choices=list(FEATURE_PREP), help="timet: standardise each "
                   "channel over the clip's tokens, PCA to --pca_dim (TimeT's preparation, the reference); "
                   "l2: L2-normalise each token")
    p.add_argument("--pca_dim", type=int, default=50, help="PCA dimensions for --features timet (TimeT: 50)")
    p.add_argument("--k_over", type=int, default=6, help="clusters for overclustering, ~3x the mean object count "
                   "(background included); more clusters make the task easier")
    p.add_argument("--restarts", type=int, default=5, help="k-means++ restarts per clip; the run with the lowest "
                   "inertia is kept (TimeT: faiss nredo=5). Restarts run in parallel, in one tensor")
    p.add_argument("--iters", type=int, default=50, help="cap on Lloyd iterations (TimeT: faiss niter=50)")
    p.add_argument("--tol", type=float, default=1e-4, help="stop early once no centroid moves further than this")
    p.add_argument("--seed", type=int, default=0, help="seeds k-means (clip i uses seed + i), the YouTube-VOS "
                   "subset and the random-init encoder")
    p.add_argument("--max_clips", type=int, default=0, help="evaluate only the first N clips (0 = all); for smoke runs")
    # ============ output ============
    p.add_argument("--out", default="", help="JSON path; default: <ckpt dir>/vos_<dataset>.json, or "
                   "out/vos_<dataset>_random_<arch>.json for random")
    p.add_argument("--vis", type=int, default=0, help="draw PNGs for the first N clips: cluster maps (paper Fig. 3) "
                   "and the tubes that score highest on prototypes (Fig. 4, our checkpoints only)")
    p.add_argument("--protos", type=int, nargs="*", default=[], help="prototype ids for the Fig. 4 view; default: "
                   "the (up to) 3 that most of the clip's tubes choose")
    p.add_argument("--proto_frac", type=float, default=0.1, help="fraction of a clip's tubes highlighted per prototype")
    add_device_option(p, "the encoder runs in bf16 / fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (decoding processes) per GPU")
    p.add_argument("--bench", action="store_true", help="time feature extraction and clustering instead")
    p.add_argument("--bench_archs", nargs="+", default=["tiny", "vit_s", "vit_b"], help="random-init presets for --bench")
    return p


def check_args(p, args):
    """Every option's range and choice, before any weight or frame is read: a bad value stops here with
    argparse's usage line and one message per problem naming the option and a valid value (exit 2)."""
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(message)

    need(args.ckpt == "random" or os.path.isfile(args.ckpt), f"--ckpt {args.ckpt!r} does not exist (or pass 'random')")
    for name, archs in (("arch", [args.arch] if args.arch else []), ("bench_archs", args.bench_archs)):
        bad = [a for a in archs if a not in PRESETS]
        need(not bad, f"--{name} {' '.join(bad)}: choose from {', '.join(PRESETS)}")
    problems += below_minimum(args, [("num_frames", 0, 16), ("img_size", 0, 224), ("feat_size", 0, 28),
                                     ("pca_dim", 1, 50), ("k_over", 1, 6), ("restarts", 1, 5), ("iters", 1, 50),
                                     ("max_clips", 0, 0), ("vis", 0, 4), ("workers", 0, 2)])
    need(args.tol >= 0, f"--tol {args.tol}: must be >= 0, e.g. 1e-4")
    need(all(i >= 0 for i in args.protos), f"--protos {' '.join(map(str, args.protos))}: ids are >= 0, e.g. 0 1 2")
    need(0 < args.proto_frac <= 1, f"--proto_frac {args.proto_frac}: must be in (0, 1], e.g. 0.1")
    need(args.data_root is not None or args.dataset in BUILT_IN_VOS or args.bench, f"--data_root is required for "
         f"--dataset {args.dataset}: the folder holding JPEGImages/ and Annotations/, e.g. --data_root data/DAVIS")
    try:
        args.device = str(resolve_device(args.device))  # a name: the results JSON stores the settings
    except UsageError as err:
        problems.append(str(err))
    if problems:
        p.error(invalid_options(problems))


# ----------------------------------------------------------------------------------------------
# ============ the clips: DAVIS and YouTube-VOS ============

VOS_SAMPLING = ("uniform", "consecutive")


def uniform_frame_sample(num_frames, clip_len, rng):
    """TimeT's evaluation clip (its data loader, SamplingMode.UNIFORM): clip_len distinct positions drawn
    uniformly at random from range(num_frames), sorted, so the clip spans the whole sequence; a sequence
    shorter than clip_len is drawn with replacement, as TimeT does. rng: a random.Random. -> sorted list."""
    if num_frames < clip_len:
        return sorted(rng.choices(range(num_frames), k=clip_len))
    return sorted(rng.sample(range(num_frames), clip_len))


def ytvos_categories(meta_path):
    """YouTube-VOS meta.json -> {video: {instance id: category id}}, category ids 1..C in sorted order of the
    category names over all videos of the file, 0 = background (as TimeT's make_categories_dict). Two objects
    of one category in a video get the same id: the paper's appendix scores categories, not instances."""
    videos = json.loads(Path(meta_path).read_text())["videos"]
    names = sorted({o["category"] for v in videos.values() for o in v["objects"].values()})
    ids = {name: i + 1 for i, name in enumerate(names)}
    return {vid: {int(k): ids[o["category"]] for k, o in v["objects"].items()} for vid, v in videos.items()}


class VOSDataset(torch.utils.data.Dataset):
    """Unsupervised VOS evaluation clips (the paper's Table 4, TimeT's protocol) -> dict(frames, masks, name, frame_ids,
    sequence_frames).

    layout 'davis2017': <root>/JPEGImages/480p/<seq>/%05d.jpg, <root>/Annotations/480p/<seq>/%05d.png (palette
    PNGs, value = instance id, 0 = background), sequences from <root>/ImageSets/2017/val.txt. 'davis2016': the
    same folders, binary masks ({0, 255} -> {0, 1}), ImageSets/2016/val.txt. 'ytvos': YouTube-VOS train,
    <root>/JPEGImages/<vid>/*.jpg, <root>/Annotations/<vid>/*.png and <root>/meta.json; a random `fraction` of
    the videos (seeded, since only train has full masks); labels are category ids from meta.json
    (ytvos_categories), not instance ids. Only annotated frames are used (clip_len 16 DAVIS, 4 YTVOS).
    sampling (where each clip's frames come from):
      'uniform' (default, TimeT's protocol): one clip per sequence, clip_len frames drawn at random over the
                whole sequence and sorted (uniform_frame_sample), seeded by (seed, sequence name) so the frames
                are the same on every run and do not depend on which other sequences are listed.
      'consecutive': floor(len / clip_len) non-overlapping runs of consecutive annotated frames; leftover
                frames at the end are dropped. Consecutive frames hold much less motion than TimeT's clips.
    frames: uint8 (3, T, S, S) (normalize() on the device), masks: int64 (T, S, S); both resized (squashed) to
    size x size, masks nearest-neighbour. frame_ids: the file stems of the T frames used.
    """

    def __init__(self, root, layout="davis2017", clip_len=None, size=224, fraction=0.2, seed=0, sampling="uniform"):
        root = Path(root).expanduser()
        if sampling not in VOS_SAMPLING:
            raise ValueError(f"unknown VOS sampling {sampling!r}; choose one of {VOS_SAMPLING}")
        self.categories = None  # {video: {instance id: category id}}, YouTube-VOS only
        if layout in ("davis2017", "davis2016"):
            self.frame_root, self.mask_root = root / "JPEGImages" / "480p", root / "Annotations" / "480p"
            listing = root / "ImageSets" / layout[-4:] / "val.txt"
            if not listing.is_file():
                raise FileNotFoundError(f"{layout}: no sequence list {listing}; expected {root}/JPEGImages/480p/"
                                        f"<seq>/%05d.jpg, Annotations/480p/<seq>/%05d.png, ImageSets/"
                                        f"{layout[-4:]}/val.txt. Point the root at the DAVIS folder.")
            names = listing.read_text().split()
        elif layout == "ytvos":
            self.frame_root, self.mask_root = root / "JPEGImages", root / "Annotations"
            if not self.mask_root.is_dir() or not (root / "meta.json").is_file():
                raise FileNotFoundError(f"ytvos: no {self.mask_root} or no {root / 'meta.json'}; expected the "
                                        f"YouTube-VOS train folder with JPEGImages/<video>/*.jpg, "
                                        f"Annotations/<video>/*.png and meta.json")
            self.categories = ytvos_categories(root / "meta.json")
            everything = sorted(p.name for p in self.mask_root.iterdir() if p.is_dir())
            names = sorted(random.Random(seed).sample(everything, max(1, round(fraction * len(everything)))))
        else:
            raise ValueError(f"unknown VOS layout {layout!r}; choose davis2017, davis2016 or ytvos")
        self.binary, self.size, self.sampling = layout == "davis2016", size, sampling
        clip_len = clip_len or (4 if layout == "ytvos" else 16)
        self.clips = []  # (sequence name, [frame ids], frames in the sequence)
        for name in names:
            ids = sorted(p.stem for p in (self.mask_root / name).glob("*.png")
                         if (self.frame_root / name / f"{p.stem}.jpg").is_file())
            if not ids:
                raise FileNotFoundError(f"{layout}: sequence {name!r} has no annotated frames: expected masks "
                                        f"{self.mask_root / name}/*.png beside frames {self.frame_root / name}/*.jpg")
            if self.categories is not None and name not in self.categories:
                raise ValueError(f"ytvos: video {name!r} is not in meta.json")
            if sampling == "uniform":
                picked = uniform_frame_sample(len(ids), clip_len, random.Random(f"{seed}/{name}"))
                self.clips.append((name, [ids[i] for i in picked], len(ids)))
            else:
                self.clips += [(name, ids[i:i + clip_len], len(ids))
                               for i in range(0, len(ids) - clip_len + 1, clip_len)]

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        name, ids, length = self.clips[index]
        frames = torch.from_numpy(np.stack([np.asarray(Image.open(self.frame_root / name / f"{i}.jpg")
                                                       .convert("RGB")) for i in ids]))  # (T, H, W, 3) uint8
        masks = torch.from_numpy(np.stack([np.asarray(Image.open(self.mask_root / name / f"{i}.png"))
                                           for i in ids]))  # (T, H, W) uint8: palette index = instance id
        frames = crop_resize(frames, (0, 0, *frames.shape[1:3]), self.size)  # (3, T, S, S) uint8
        masks = F.interpolate(masks[None], size=(self.size, self.size), mode="nearest-exact")[0].long()
        if self.binary:
            masks = (masks > 0).long()  # DAVIS-2016: 255 = object
        if self.categories is not None:
            masks = self._to_categories(name, masks)
        return dict(frames=frames, masks=masks, name=name, frame_ids=list(ids), sequence_frames=length)

    def _to_categories(self, name, masks):
        """Instance ids (T, S, S) -> category ids through a lookup table; an id meta.json lacks is an error."""
        lut = torch.full((256,), -1, dtype=torch.long)
        lut[0] = 0
        for instance, category in self.categories[name].items():
            lut[instance] = category
        out = lut[masks]  # (T, S, S)
        if (out < 0).any():
            raise ValueError(f"ytvos: video {name!r} has mask values {sorted(set(masks[out < 0].tolist()))} that "
                             f"meta.json does not list as objects")
        return out


# ============ dense features ============

@torch.no_grad()
def dense_features(encoder, videos):
    """Frozen tokens as feature maps at the token grid: videos (B, 3, T, H, W) -> (B, t, D, h, w), fp32.

    The encoder sees every token (no mask), in eval mode. Its tokens come in (t, h, w) row-major
    order (model.py), so they reshape straight into one (h, w) map per tube slice. segment()
    prepares them and upsamples them to the scoring resolution.
    """
    t, h, w = encoder.cfg.grid
    with inference_autocast(videos.device):  # bf16 / fp16 by compute capability, fp32 on CPU
        x = encoder(videos)  # (B, N, D)
    B, N, D = x.shape
    return x.float().reshape(B, t, h, w, D).permute(0, 1, 4, 2, 3)  # (B, t, D, h, w)


def standardise_pca(x, dim):
    """TimeT's feature preparation (its normalize_and_transform): x (P, D) -> (P, min(dim, D)).

    Each channel is standardised over the P points (mean 0, population std 1; a constant channel is
    only centred, as sklearn's StandardScaler does), then projected on the `dim` principal axes of the
    result (faiss PCAMatrix without whitening: the eigenvectors of the covariance with the largest
    eigenvalues, in decreasing order). Computed in float64; signs of the axes are arbitrary.
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False)  # (D,) each
    z = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))  # (P, D), centred
    evals, evecs = torch.linalg.eigh(z.t() @ z / len(z))  # ascending eigenvalues, (D,) and (D, D)
    return (z @ evecs.flip(1)[:, :dim]).float()  # (P, dim), largest variance first


# What is clustered (--features). TimeT fits its scaler and PCA on the 14x14 tokens of an evaluation
# batch before upsampling; here on one clip's tokens (the clip is the unit k-means runs on).
FEATURE_PREP = {"timet": "per-clip channel standardisation + PCA on the tokens, then bilinear upsampling "
                         "(TimeT's preparation)",
                "l2": "bilinear upsampling, then L2 normalisation of every point"}


def label_maps(masks, size):
    """Ground truth at the scoring resolution: (T, H, W) int64 -> (T, size, size), nearest.

    'nearest-exact' samples the centre of each output cell (plain 'nearest' takes its top-left pixel).
    """
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0].long()


# ============ k-means (vectorised over points and restarts) ============
# Euclidean (L2) k-means, as TimeT's faiss k-means (niter 50, nredo 5; faiss seeds with random points,
# ours with k-means++). With --features l2 the points are unit vectors, |a - b|^2 = 2 - 2 cos(a, b),
# so they are grouped by cosine similarity; centroids are plain means (not spherical k-means).

def sq_dists(x, c):
    """Squared Euclidean distances x (P, D), centroids c (R, K, D) -> (R, P, K), via |x|^2 - 2x.c + |c|^2."""
    return ((x * x).sum(1)[None, :, None] - 2 * x @ c.transpose(1, 2) + (c * c).sum(2)[:, None, :]).clamp_min(0)


def kmeans_pp(x, k, restarts, generator=None):
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) for `restarts` runs at once: x (P, D) -> (R, k, D).

    The first centroid is a uniformly drawn point; each next one is drawn with probability
    proportional to the squared distance to the nearest centroid already chosen.
    """
    P = len(x)
    first = torch.randint(P, (restarts,), generator=generator, device=x.device)  # (R,)
    centroids = x[first][:, None]  # (R, 1, D)
    d2 = sq_dists(x, centroids)[..., 0]  # (R, P)
    for _ in range(k - 1):
        # + tiny: points that coincide with a centroid are never drawn unless all of them do.
        nxt = x[torch.multinomial(d2 + 1e-12, 1, generator=generator)[:, 0]][:, None]  # (R, 1, D)
        centroids = torch.cat([centroids, nxt], dim=1)  # (R, j+1, D)
        d2 = torch.minimum(d2, sq_dists(x, nxt)[..., 0])  # (R, P)
    return centroids


def lloyd(x, centroids, iters=50, tol=1e-4):
    """Lloyd iterations for R runs in parallel: x (P, D), centroids (R, K, D) ->
    (assign (R, P) int64, centroids (R, K, D), inertia (R,) = summed squared distance to the centroid).
    An empty cluster keeps its centroid. Stops after `iters` or once no centroid moves more than tol."""
    K = centroids.shape[1]
    for _ in range(iters):
        onehot = F.one_hot(sq_dists(x, centroids).argmin(2), K).to(x.dtype)  # (R, P, K)
        counts = onehot.sum(1)[..., None]  # (R, K, 1)
        means = (onehot.transpose(1, 2) @ x) / counts.clamp_min(1)  # (R, K, D)
        new = torch.where(counts > 0, means, centroids)  # (R, K, D)
        shift = (new - centroids).norm(dim=2).max()
        centroids = new
        if shift <= tol:
            break
    d2, assign = sq_dists(x, centroids).min(2)  # (R, P) each
    return assign, centroids, d2.sum(1)


def kmeans(x, k, restarts=5, iters=50, tol=1e-4, generator=None):
    """Best of `restarts` k-means++ / Lloyd runs: x (P, D) -> (assign (P,) in [0, k), inertia (R,) of every run)."""
    assign, _, inertia = lloyd(x, kmeans_pp(x, k, restarts, generator), iters, tol)
    return assign[inertia.argmin()], inertia


# ============ matching clusters to labels, scoring ============

def confusion(pred, gt, k, n_labels):
    """Pixel counts: pred in [0, k), gt in [0, n_labels), same shape -> (k, n_labels) int64, [i, j] = |pred=i & gt=j|."""
    return torch.bincount((pred * n_labels + gt).flatten(), minlength=k * n_labels).reshape(k, n_labels)


def hungarian(conf):
    """Clustering protocol: one-to-one cluster -> label map maximising the summed IoU. conf (K, K) -> (K,).

    With K = L every label gets exactly one cluster, so this maximises the clip's mIoU itself.
    """
    conf = conf.double()
    iou = conf / (conf.sum(1, keepdim=True) + conf.sum(0, keepdim=True) - conf).clamp_min(1)  # (K, L)
    rows, cols = linear_sum_assignment(iou.cpu().numpy(), maximize=True)
    assert len(rows) == len(conf) == conf.shape[1], "the clustering protocol needs K = number of labels"
    return torch.as_tensor(cols[rows.argsort()], device=conf.device)


def many_to_one(conf):
    """Overclustering protocol: cluster -> the label it overlaps most precisely. conf (K, L) -> (K,).

    Precision |c & l| / |c| has the same denominator for every label of cluster c, so this is the
    label with the largest overlap, and the map labels the most pixels correctly of all L^K maps.
    """
    return conf.argmax(1)


def miou(pred, gt, n_labels):
    """Mean IoU over labels 0..n_labels-1, all present in gt (background included). pred, gt same shape."""
    conf = confusion(pred, gt, n_labels, n_labels).double()  # (L, L)
    inter = conf.diag()  # (L,)
    return (inter / (conf.sum(0) + conf.sum(1) - inter)).mean().item()


PROTOCOLS = {"clustering": hungarian, "overclustering": many_to_one}


def prepare(feats, size, features="timet", pca_dim=50):
    """feats (t, D, h, w) token maps -> points to cluster (t*size*size, D') in (t, y, x) order.

    timet: standardise + PCA on the t*h*w tokens (standardise_pca), then upsample the maps bilinearly
    to size x size (TimeT: 14x14 -> 28x28); l2: upsample, then L2-normalise each point.
    """
    t, D, h, w = feats.shape
    if features == "timet":
        tokens = standardise_pca(feats.permute(0, 2, 3, 1).reshape(-1, D), pca_dim)  # (t*h*w, D')
        feats = tokens.reshape(t, h, w, -1).permute(0, 3, 1, 2)  # (t, D', h, w)
    if (h, w) != (size, size):
        feats = F.interpolate(feats, size=(size, size), mode="bilinear", align_corners=False)  # (t, D', s, s)
    x = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])  # (t*s*s, D')
    return F.normalize(x, dim=1) if features == "l2" else x


def segment(feats, gt, k, match, features="timet", pca_dim=50, restarts=5, iters=50, tol=1e-4, generator=None):
    """Cluster one clip, name the clusters with labels, score them.

    feats (t, D, h, w) feature maps, one per tube slice, at the token grid (or already at s x s);
    gt (T, s, s) labels 0..L-1, all present, with T = tubelet * t. Each tube's cluster map covers
    its `tubelet` frames (a tube spans them). features / pca_dim: see prepare().
    Returns (mIoU, clusters (T, s, s) in [0, k), pred (T, s, s) in [0, L)).
    """
    t, s = feats.shape[0], gt.shape[-1]
    T, n_labels = len(gt), int(gt.max()) + 1
    x = prepare(feats, s, features, pca_dim)  # (t*s*s, D')
    assign, _ = kmeans(x, k, restarts, iters, tol, generator)  # (t*s*s,)
    clusters = assign.reshape(t, 1, s, s).expand(t, T // t, s, s).reshape(T, s, s)  # tube -> its frames
    pred = match(confusion(clusters, gt, k, n_labels))[clusters]  # (T, s, s) labels
    return miou(pred, gt, n_labels), clusters, pred


# ----------------------------------------------------------------------------------------------
# ============ pictures (paper Figs. 3 and 4) ============

PALETTE = torch.tensor([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                        [0, 128, 128], [170, 110, 40]]) / 255.0  # (12, 3) distinct colours


def to_rgb(videos, step):
    """ImageNet-normalised (1, 3, T, S, S) -> every `step`-th frame as (T/step, 3, S, S) in [0, 1]."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return (videos[0].float().cpu() * std + mean).clamp(0, 1)[:, ::step].transpose(0, 1)


def overlay(rgb, maps, tint_zero, alpha=0.55):
    """Colour label/cluster maps over frames: rgb (n, 3, S, S), maps (n, s, s) -> (n, 3, S, S).
    Label 0 (background) stays untinted unless tint_zero (raw cluster ids have no background)."""
    maps = F.interpolate(maps[:, None].float().cpu(), size=rgb.shape[-2:], mode="nearest")[:, 0].long()  # (n, S, S)
    colour = PALETTE[(maps - (0 if tint_zero else 1)) % len(PALETTE)].permute(0, 3, 1, 2)  # (n, 3, S, S)
    a = alpha * (torch.ones_like(maps) if tint_zero else maps > 0)[:, None].float()  # (n, 1, S, S)
    return rgb * (1 - a) + colour * a


def save_strip(path, rows, min_side=128):
    """Rows of equally sized frames (each (n, 3, S, S) in [0, 1]) -> one PNG, small frames upscaled."""
    n, S = len(rows[0]), rows[0].shape[-1]
    grid = make_grid(torch.cat(rows), nrow=n, padding=2, pad_value=1.0)  # (3, H, W)
    scale = max(1, -(-min_side // S))
    grid = F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0] if scale > 1 else grid
    Image.fromarray((grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(path)  # PIL: as data.py


def draw_clusters(path, videos, gt, maps, tubelet):
    """Fig. 3: one column per tube slice (its first frame); rows: frame, ground truth, clustering
    (matched, label colours as in the ground truth), overclustering clusters (one colour per
    cluster), overclustering after the many-to-one map."""
    rgb = to_rgb(videos, tubelet)  # (t, 3, S, S)
    rows = [rgb, overlay(rgb, gt[::tubelet], False), overlay(rgb, maps["clustering"][::tubelet], False),
            overlay(rgb, maps["overclustering_clusters"][::tubelet], True),
            overlay(rgb, maps["overclustering"][::tubelet], False)]
    save_strip(path, rows)


def load_sigma(path, overrides):
    """The whole pretraining module (phi + prototypes) of one of our checkpoints, or (None, why not)."""
    if path == "random":
        return None, "a random-init encoder has no learned prototypes"
    ckpt = load_checkpoint(path)
    if "model_config" not in ckpt:
        return None, "not one of our checkpoints (no model_config), so phi cannot be rebuilt"
    cfg = config_from_dict({**ckpt["model_config"], **overrides})
    if cfg.loss != "sigma":
        return None, f"loss={cfg.loss!r} has no prototypes"
    try:
        sigma = SIGMA(cfg)  # target='dino' needs the frozen DINO weights file named in the config
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        return None, f"cannot rebuild phi ({str(e).splitlines()[-1].strip()})"
    missing, _ = load_weights(sigma, ckpt)
    if missing:
        return None, f"checkpoint lacks {missing[:3]}"
    return sigma.eval(), ""


def prototype_model(args, overrides):
    """The model behind the prototype view (--vis), with --protos checked against its prototypes: (SIGMA or
    None, why not). Every rank calls it before any clip: an error here stops all of them, not only the ranks
    whose clips are drawn (the others would wait for them in the gather of results)."""
    with ranks.together("loading the prototypes for --vis"):
        sigma, why = load_sigma(args.ckpt, overrides)
        K = len(sigma.prototypes) if sigma is not None else None
        if K is not None and not all(p < K for p in args.protos):
            raise UsageError(f"--protos {' '.join(map(str, args.protos))}: {args.ckpt} has prototypes 0..{K - 1}")
    return sigma, why


@torch.no_grad()
def draw_prototypes(path, sigma, videos, protos, frac):
    """Fig. 4: for each prototype, the clip's tubes that phi scores highest on it, lit up (the
    rest dimmed); one row per prototype, one column per tube slice. Returns one dict per row."""
    cfg = sigma.cfg
    t, h, w = cfg.grid
    everything = torch.ones(1, cfg.num_tokens, dtype=torch.bool, device=videos.device)  # phi of every tube
    z = F.normalize(sigma.targets(videos, everything)[0].float(), dim=-1)  # (N, D)
    scores = z @ F.normalize(sigma.prototypes.float(), dim=-1).t()  # (N, K) cosine, as the loss scores them (sinkhorn.py)
    usage = scores.argmax(1).bincount(minlength=scores.shape[1])  # (K,) tubes choosing each prototype
    protos = protos or [p for p in usage.topk(min(3, len(usage))).indices.tolist() if usage[p] > 0]
    n_top = max(1, round(frac * len(z)))
    rgb = to_rgb(videos, cfg.tubelet_size)  # (t, 3, S, S)
    rows, info = [], []
    for p in protos:
        lit = torch.zeros(len(z), device=z.device)  # (N,) 1 = among this prototype's top tubes
        lit[scores[:, p].topk(n_top).indices] = 1.0
        lit = F.interpolate(lit.reshape(t, 1, h, w).cpu(), size=rgb.shape[-2:], mode="nearest")  # (t, 1, S, S)
        rows.append(rgb * (0.25 + 0.75 * lit))  # (t, 3, S, S), the rest dimmed
        info.append(dict(prototype=p, tubes_choosing_it=int(usage[p]), lit_tubes=n_top,
                         top_score=round(scores[:, p].max().item(), 4)))
    save_strip(path, rows)
    return info


# ----------------------------------------------------------------------------------------------
# ============ evaluation ============

def build_dataset(args, num_frames, img_size):
    if args.dataset in BUILT_IN_VOS:
        generate = fashion_dataset if args.dataset == "fashion" else synthetic_dataset
        root, layout = Path(args.data_root or generate()) / "davis", "davis2017"
    else:
        root, layout = Path(args.data_root), args.dataset
        if not root.is_dir():
            raise FileNotFoundError(f"--data_root {args.data_root!r} is not a folder: point it at the {args.dataset} "
                                    "folder that holds JPEGImages/ and Annotations/ (or use --dataset synthetic)")
    return VOSDataset(root, layout, clip_len=num_frames, size=img_size, seed=args.seed, sampling=args.sampling)


def evaluate_clip(encoder, item, args, feat_size, generator):
    """Both protocols on one clip. Returns (result dict, maps for the pictures)."""
    videos = normalize(item["frames"][None].to(args.device))  # (1, 3, T, S, S) uint8 -> normalised
    feats = dense_features(encoder, videos)[0]  # (t, D, h, w)
    # Labels present = those visible at the scoring resolution; they are renumbered 0..L-1 (0 = background).
    ids, gt = label_maps(item["masks"].to(args.device), feat_size).unique(return_inverse=True)  # (T, s, s)
    result = dict(name=item["name"], frame_ids=list(item["frame_ids"]), sequence_frames=int(item["sequence_frames"]),
                  labels=ids.tolist())
    maps = {"gt": gt}
    for name, match in PROTOCOLS.items():
        k = len(ids) if name == "clustering" else args.k_over
        result[name], clusters, maps[name] = segment(feats, gt, k, match, args.features, args.pca_dim, args.restarts,
                                                     args.iters, args.tol, generator)
        maps[name + "_clusters"] = clusters
    return result, (videos, maps)


def protocol_line(args):
    """One line saying whether this run follows the reference (TimeT) protocol, and if not, how not."""
    ref = args.sampling == "uniform" and args.features == "timet" and args.pca_dim == 50
    return (f"{'TimeT reference protocol' if ref else 'NOT the TimeT reference protocol'}: sampling={args.sampling}, "
            f"features={args.features}" + (f" (PCA {args.pca_dim})" if args.features == "timet" else ""))


def frozen_encoder(args):
    """The encoder at the benchmark's clip length (16 DAVIS, 4 YouTube-VOS) unless --num_frames says
    otherwise; its position table follows. -> (encoder, cfg, arch, the config overrides used)."""
    overrides = {}
    if args.num_frames or args.dataset in PROTOCOL_FRAMES:
        overrides["num_frames"] = args.num_frames or PROTOCOL_FRAMES[args.dataset]
    if args.img_size:
        overrides["img_size"] = args.img_size
    arch = args.arch or ("tiny" if args.ckpt == "random" else None)
    torch.manual_seed(args.seed)  # the random-init baseline is reproducible
    encoder, cfg = open_encoder(args.ckpt, arch, **overrides)  # a misfit: UsageError naming the options
    return encoder.to(args.device).eval().requires_grad_(False), cfg, arch, overrides


def evaluate_clips(encoder, cfg, loader, indices, args, feat_size, vis_dir, sigma, show):
    """Both protocols on every clip of this rank (clip i seeds its k-means with seed + i, so the clusters
    do not depend on the sharding); draws the pictures of the first --vis clips. -> one dict per clip."""
    results = []
    bar = tqdm(zip(indices, loader), total=len(indices), disable=None if show else True, desc="clips")
    for i, item in bar:
        generator = torch.Generator(args.device).manual_seed(args.seed + i)
        result, (videos, maps) = evaluate_clip(encoder, item, args, feat_size, generator)
        result["index"] = i
        if i < args.vis:
            stem = f"{i:04d}_{result['name'].replace('/', '_')}"
            draw_clusters(vis_dir / f"{stem}_clusters.png", videos, maps["gt"], maps, cfg.tubelet_size)
            if sigma is not None:
                result["prototype_view"] = draw_prototypes(vis_dir / f"{stem}_prototypes.png", sigma, videos,
                                                           args.protos, args.proto_frac)
        results.append(result)
        bar.set_postfix({name: f"{sum(r[name] for r in results) / len(results):.3f}" for name in PROTOCOLS})
    return results


def write_report(out, results, args, cfg, feat_size, world):
    """Mean mIoU of both protocols, every clip's result and the config -> JSON at `out`; returns the report."""
    mean = {name: sum(r[name] for r in results) / max(1, len(results)) for name in PROTOCOLS}
    report = dict(mean=mean, num_clips=len(results), clips=results,
                  config=dict(vars(args), num_frames=cfg.num_frames, img_size=cfg.img_size, grid=list(cfg.grid),
                              feat_size=feat_size, enc_dim=cfg.enc_dim, enc_depth=cfg.enc_depth,
                              feature_prep=FEATURE_PREP[args.features], kmeans="Euclidean k-means++, best of "
                              f"{args.restarts} restarts", world_size=world),
                  protocol=protocol_line(args))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


# ============ the first look at the end of `python train.py`: what did pretraining learn? ============

def first_look(ckpt, arch, seed, root, out, num_pictured=8):
    """The end of `python train.py`: segment the fashion set's val clips (root/davis) without labels, with the
    checkpoint `ckpt` and with the random-init encoder of `arch` it started from (same seed), by main() with
    study.py's read-out (so the numbers are the study's headline for that arm and seed); print both mIoUs and
    draw <out>/first_look.png: one column per clip, rows = frame, ground truth, random-init clusters, the
    checkpoint's clusters (background darkened). Returns ({"random init": mIoU, "this run": mIoU}, chance)."""
    root = Path(root)
    common = ["--dataset", "davis2017", "--data_root", str(root / "davis"), "--sampling", "consecutive",
              "--features", "l2", "--device", "cpu", "--workers", "0"]
    print("first look: segmenting the val clips with the random-init encoder and with this run's", flush=True)
    reports = {"random init": main(["--ckpt", "random", "--arch", arch, "--seed", str(seed), *common,
                                    "--out", os.path.join(out, "first_look_random.json")]),
               "this run": main(["--ckpt", ckpt, *common, "--out", os.path.join(out, "first_look.json")])}
    chance = vos_chance(root)
    mious = {name: 100 * r["mean"]["clustering"] for name, r in reports.items()}
    print(f"VOS clustering mIoU over {reports['this run']['num_clips']} val clips: random init "
          f"{mious['random init']:.1f} -> this run {mious['this run']:.1f} (all-background {chance:.1f})")

    # The picture: the middle frame of evenly spaced clips, with the maps main() scored (same k-means seeds).
    dataset = VOSDataset(root / "davis", "davis2017", clip_len=16, size=64, seed=seed, sampling="consecutive")
    picked = torch.linspace(0, len(dataset) - 1, num_pictured).round().long().tolist()
    rows = {"frame": [], "ground truth": [], "random init": [], "this run": []}
    for name, path, kmeans_seed in (("random init", "random", seed), ("this run", ckpt, 0)):
        torch.manual_seed(seed)  # the random-init encoder of this seed, as main() builds it
        encoder, cfg = load_encoder(path, arch, num_frames=16)
        encoder.eval().requires_grad_(False)
        vos_args = get_args(["--ckpt", path, *common, "--seed", str(kmeans_seed)])
        for i in picked:
            item = dataset[i]
            generator = torch.Generator("cpu").manual_seed(kmeans_seed + i)
            _, (videos, maps) = evaluate_clip(encoder, item, vos_args, 2 * cfg.grid[1], generator)
            t = item["masks"].shape[0] // 2  # the middle frame
            if name == "random init":
                rgb = item["frames"][:, t]  # (3, 64, 64) uint8
                rows["frame"].append(rgb)
                rows["ground truth"].append(paint(rgb, maps["gt"][t]))
            rows[name].append(paint(rows["frame"][picked.index(i)], maps["clustering"][t]))
    grid = make_grid(torch.stack([img for row in rows.values() for img in row]).float() / 255, nrow=num_pictured,
                     padding=2, pad_value=1.0)  # (3, H, W): one row per entry of `rows`
    picture = os.path.join(out, "first_look.png")
    save_image(F.interpolate(grid[None], scale_factor=2, mode="nearest")[0], picture)
    print(f"  picture: {picture}  (rows: {', '.join(rows)})")
    return mious, chance


def paint(rgb, labels):
    """Show what a (h, w) label map calls the object: a uint8 (3, S, S) frame with its background (label 0) darkened."""
    labels = F.interpolate(labels[None, None].float(), size=rgb.shape[-2:], mode="nearest")[0, 0]
    return draw_segmentation_masks(rgb, labels == 0, alpha=0.7, colors="black")


def main(argv=None):
    args = get_args(argv)  # every option checked before anything is read
    if args.bench:
        return bench(args)
    had_group = dist.is_initialized()  # train.py's first look under torchrun: that group stays for its owner
    rank, world, _ = setup_distributed(args.device)  # each rank takes every world-th clip
    encoder, cfg, arch, overrides = frozen_encoder(args)
    feat_size = args.feat_size or 2 * cfg.grid[1]  # scoring maps: twice the token grid (28 for 224 / 16)

    # ============ data: this rank's clips ============
    with ranks.together("reading the dataset"):  # a rank that cannot read its copy stops every rank
        dataset = build_dataset(args, cfg.num_frames, cfg.img_size)
    # Clip i must be the same clip on every rank: results are gathered by index.
    ranks.agree(f"the {args.dataset} clips", f"{len(dataset)} clips of {len({c[0] for c in dataset.clips})} sequences",
                dataset.clips, fix="Give every node the same dataset (--data_root).")
    n_clips = min(len(dataset), args.max_clips or len(dataset))
    indices = list(range(rank, n_clips, world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=None,
                                         num_workers=args.workers)
    out = Path(args.out or (Path("out") / f"vos_{args.dataset}_random_{arch}.json" if args.ckpt == "random"
                            else Path(args.ckpt).parent / f"vos_{args.dataset}.json"))
    vis_dir = out.with_name(out.stem + "_vis")
    if rank == 0:
        print(f"{args.dataset}: {n_clips} clips of {cfg.num_frames} frames at {cfg.img_size}px, token grid {cfg.grid}, "
              f"scored at {feat_size}x{feat_size}; encoder {args.ckpt} on {args.device}\n"
              f"protocol: {protocol_line(args)}")

    # ============ cluster and score every clip ============
    sigma = None
    if args.vis:
        vis_dir.mkdir(parents=True, exist_ok=True)
        sigma, why = prototype_model(args, overrides)
        sigma = sigma.to(args.device) if sigma is not None else None
        if sigma is None and rank == 0:
            print(f"prototype view (Fig. 4) skipped: {why}")
    results = evaluate_clips(encoder, cfg, loader, indices, args, feat_size, vis_dir, sigma, show=rank == 0)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = sorted(itertools.chain(*gathered), key=lambda r: r["index"])
    if dist.is_initialized() and not had_group:  # a group started here ends here
        dist.destroy_process_group()
    if rank:
        return None

    # ============ report ============
    report = write_report(out, results, args, cfg, feat_size, world)
    mean = report["mean"]
    print(f"mIoU over {len(results)} clips ({protocol_line(args)}): clustering {100 * mean['clustering']:.1f}, "
          f"overclustering {100 * mean['overclustering']:.1f}  -> {out}" + (f", pictures in {vis_dir}" if args.vis else ""))
    return report


# ============ benchmark ============

def bench(args):
    """Seconds per DAVIS-sized clip: encoder forward and each protocol's k-means + matching,
    random-init encoders, ground truth of 3 labels (2 objects + background, as in DAVIS-2017)."""
    print(f"device {args.device}, {torch.get_num_threads()} threads; median of 3 after a warm-up; features {args.features}; "
          f"k-means: {args.restarts} restarts, <= {args.iters} iterations")
    print(f"{'model':6s} {'clip':>10s} {'tokens':>6s} {'map':>5s} {'features s':>10s} "
          f"{'clustering s':>12s} {'overclust. s':>12s}")
    for arch in args.bench_archs:
        torch.manual_seed(0)
        encoder, cfg = load_encoder("random", arch)  # each preset's own clip: tiny 8x64x64, ViTs 16x224x224
        encoder = encoder.to(args.device).eval()
        T, S, s = cfg.num_frames, cfg.img_size, 2 * cfg.grid[1]
        videos = torch.randn(1, 3, T, S, S, device=args.device)  # (1, 3, T, S, S)
        gt = torch.zeros(T, s, s, dtype=torch.long, device=args.device)  # (T, s, s) labels
        gt[:, : s // 2, : s // 3], gt[:, s // 2:, s // 2:] = 1, 2  # two "objects"
        feats = dense_features(encoder, videos)[0]  # (t, D, h, w)
        jobs = {"features": lambda: dense_features(encoder, videos)}
        for name, match in PROTOCOLS.items():
            k = 3 if name == "clustering" else args.k_over
            jobs[name] = lambda k=k, match=match: segment(feats, gt, k, match, args.features, args.pca_dim,
                                                          args.restarts, args.iters, args.tol,
                                                          torch.Generator(args.device).manual_seed(0))
        timings = {}
        for name, job in jobs.items():
            times = []
            for _ in range(4):
                t0 = time.perf_counter()
                job()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            timings[name] = sorted(times[1:])[1]
        print(f"{arch:6s} {T}x{S}x{S:<4d} {cfg.num_tokens:6d} {s:3d}^2 {timings['features']:10.3f} "
              f"{timings['clustering']:12.3f} {timings['overclustering']:12.3f}")
    return None


if __name__ == "__main__":
    sys.exit(run_cli(main, "eval_vos.py"))
