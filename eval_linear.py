"""
Frozen linear probe (the paper's Table 9): how well does a linear classifier on a frozen encoder's mean-pooled
features recognise actions?

The encoder is frozen, so its features never change: this script runs it once per clip and view, caches the
mean-pooled features on disk, and trains the normalisation + Linear head on the cache, so the 30-100 head epochs
take seconds. The released recipe (run_class_finetuning.py --linear_probing) decodes and encodes every training
clip again in every epoch: 30-100 backbone forward passes per training clip (twice that with the 2 clips per video
of its SSv2 script). Here it is 2, the clip and its mirror image (flip is the only augmentation of the Table 9
protocol), or 1 on SSv2, whose labels say left or right, and on the synthetic set (kept at one pass for speed).

    python eval_linear.py --ckpt out/ckpt.pth --dataset synthetic               # ours; arch from the file
    python eval_linear.py --ckpt random --arch tiny --dataset synthetic         # the baseline row
    python eval_linear.py --ckpt out/fashion_tiny_mlp_sigma/ckpt.pth --dataset fashion   # train.py's default set
    python eval_linear.py --ckpt sigma_vitb_k400.pth --arch vit_b --dataset ucf101 --data_root data/ucf101
    torchrun --nproc_per_node=8 eval_linear.py --ckpt sigma_vitb_k400.pth --arch vit_b \\
        --dataset k400 --data_root data/k400 --test_clips 5 --test_crops 3   # multi-view testing
    python eval_linear.py --ckpt out/ckpt.pth --dataset synthetic --bench       # what a probe costs

Protocol: the paper's Table 9, not the released probe's recipe; PROTOCOL below lists the known differences, and
every result says so (printed and in the JSON). SSv2 clips follow the released SSv2 loader by default (--sampling
segments: one frame from each of T equal segments of the whole video; tested on 2 temporal views x 3 crops); other
datasets take T frames `stride` apart.

Prints top-1 / top-5 on the test split and writes them as JSON next to the checkpoint (<ckpt>.linear_<dataset>.json)
or to --out. Features go to <that folder>/features/, one file per split and view set, named by a hash of everything
they depend on (checkpoint path, size and mtime; dataset, root, split, views; frames, size, stride): a rerun with
other head settings skips the backbone; touching the checkpoint or changing the data recomputes. Under torchrun
every rank encodes its share of the clips; rank 0 gathers them (through the process group), trains the head and
alone reads and writes the cache, so --cache_dir may sit on rank 0's local disk.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import ranks
from cli import (HelpFormatter, UsageError, add_device_option, below_minimum, grouped_values, invalid_options,
                 open_encoder, preset_values, resolve_device, run_cli, setup_distributed)
from data import DEFAULT_STRIDE, Video, VideoClips, build_video_dataset, make_loader, normalize
from model import PRESETS, describe_state_dict, inference_autocast, load_weights
from probes import one_cpu_thread, topk_accuracy, linear_converged_probe, knn_probe, token_labels, dense_probe, attentive_probe

# The built-in sets (generated on first use, as train.py's --dataset of the same name), then the benchmarks' layouts.
BUILT_IN = ["fashion", "synthetic"]
VIDEO_DATASETS = [*BUILT_IN, "k400", "ssv2", "ucf101", "hmdb51", "list"]
IMAGE_DATASETS = ["imagenet", "cifar100"]
# The paper's Table 9 protocol: head epochs per dataset (everything else 100), and flip everywhere except SSv2, whose
# labels name directions ("pushing something from left to right"): a mirrored clip shows another class. The synthetic
# set's classes are mirror-symmetric (--flip is valid); off by default to keep the README's study at one pass per clip.
EPOCHS = {"ssv2": 30, "k400": 40, "imagenet": 30}
NO_FLIP = {"ssv2", *BUILT_IN}
# Clip sampling per dataset (data.VideoClips sampling=): the released SSv2 loader samples TSN-style segments over the
# whole video and tests 2 temporal views x 3 crops; the others: stride sampling, one centre view (the released
# K400 / UCF / HMDB probes test more views: --test_clips).
SAMPLING = {"ssv2": "segments"}
SEGMENT_TEST_VIEWS = (2, 3)
# What a number from this script is, stated with every result (printed and stored in the JSON).
PROTOCOL = dict(
    name="Table-9 protocol (paper, Table 9): frozen encoder, mean-pooled tokens, LayerNorm + Linear head, AdamW lr 1e-3 "
         "(not scaled by batch size), wd 0.05, batch 128, cosine (warmup: --warmup_epochs, default 0), "
         "augmentation: flip (and --aug_views crops) only",
    differences_from_released_probe=[
        "no mixup (released: mixup 0.8)", "no cutmix (released: cutmix 1.0)",
        "no label smoothing (released: 0.1)", "no RandAugment (released: rand-m7-n4-mstd0.5-inc1)",
        "no random erasing (released: reprob 0.25)",
        "lr used as given (released: lr x total batch / 256)",
        "no warmup by default (released: 5 warmup epochs; --warmup_epochs 5)",
        "features cached once per view (centre clip, its mirror, --aug_views random crops) instead of "
        "re-augmented clips in every epoch"])

# ============ settings ============


def default_workers():
    return min(8, os.cpu_count() or 1)


def get_args(argv=None):
    """Parse, check every option (a bad one stops here, before any file is read), fill the per-dataset defaults."""
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    args.epochs = args.epochs or EPOCHS.get(args.dataset, 100)
    args.flip = args.dataset not in NO_FLIP if args.flip is None else args.flip
    args.probes_given = args.probes is not None  # named ones must run; the default drops what the data lacks
    args.probes = default_probes(args.dataset) if args.probes is None else args.probes
    args.sampling = args.sampling or SAMPLING.get(args.dataset, "stride")
    views = SEGMENT_TEST_VIEWS if args.sampling == "segments" else (1, 1)
    args.test_clips, args.test_crops = args.test_clips or views[0], args.test_crops or views[1]
    args.workers = default_workers() if args.workers is None else args.workers
    if args.out is None:
        base = (f"out/random_{args.arch or 'tiny'}" if args.ckpt == "random" else os.path.splitext(args.ckpt)[0])
        args.out = f"{base}.linear_{args.dataset}.json"
    args.cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "features")
    return args


def build_parser():
    p = argparse.ArgumentParser(description="Frozen linear probe of a SIGMA / VideoMAE encoder (the paper's Table 9).",
                                formatter_class=HelpFormatter)
    a = p.add_argument
    # what to evaluate
    a("--ckpt", required=True, help="our checkpoint (carries its architecture), a released SIGMA / VideoMAE "
      "pretraining checkpoint (pass --arch), or 'random' (randomly initialised --arch: the baseline row)")
    a("--arch", default=None, help=f"{' | '.join(PRESETS)}; default: our checkpoints' own, tiny for 'random'; "
      "released checkpoints need it")
    a("--num_frames", type=int, default=None, help="clip length; default: our checkpoints' own, else the --arch "
      f"preset's: {preset_values('num_frames')}")
    a("--img_size", type=int, default=None, help="input side; default: our checkpoints' own, else the --arch "
      f"preset's: {preset_values('img_size')}")
    a("--final_norm", action="store_true", help="pool the encoder's output after its last LayerNorm; the "
      "released probe drops that norm (its mean-pooling ViT sets norm = Identity) and learns fc_norm instead")
    # data
    a("--dataset", required=True, choices=VIDEO_DATASETS + IMAGE_DATASETS, help="fashion (moving Fashion-MNIST) and "
      "synthetic: the built-in sets train.py pretrains on, generated on first use; the others: data.py LAYOUTS, "
      "torchvision ImageFolder (imagenet) or CIFAR-100 (cifar100)")
    a("--data_root", default=None, help="dataset folder (data.py LAYOUTS; ImageFolder train/ val/ for imagenet, "
      "the torchvision CIFAR-100 folder for cifar100); default for fashion / synthetic: the generated set "
      "(synthetic.fashion_dataset() / synthetic_dataset(), cached); required for the others")
    a("--train_split", default="train", help="split the head is trained on")
    a("--test_split", default="val", help="split it is tested on; 'val' is the official test list for ucf101 / "
      "hmdb51, the test set of cifar100")
    a("--fold", type=int, default=1, help="UCF101 / HMDB51 split (1-3); papers report split 1")
    a("--stride", type=int, default=None, help="frames between sampled frames with --sampling stride; default: "
      f"data.py's per dataset: {per_dataset(DEFAULT_STRIDE, VIDEO_DATASETS)}")
    a("--sampling", default=None, choices=["stride", "segments"], help="clip frames: 'segments' = one per "
      "equal segment of the whole video (the released SSv2 loader), 'stride' = consecutive frames --stride apart; "
      "default: segments for ssv2, stride for the others")
    a("--flip", action=argparse.BooleanOptionalAction, default=None,
      help="cache a mirrored copy of each training clip; costs one backbone pass per clip. Default: on, except "
      f"for {', '.join(sorted(NO_FLIP))} (SSv2's labels name left / right; the built-in sets: for speed)")
    a("--aug_views", type=int, default=0, help="also cache this many random multi-scale crops per training clip "
      "(one backbone pass each); 0 keeps the probe at 2 passes per clip")
    a("--test_clips", type=int, default=None, help="temporal clips per test video, softmax scores averaged; "
      f"default: 1, or {SEGMENT_TEST_VIEWS[0]} with --sampling segments (the released SSv2 probe; VideoMAE K400 "
      "fine-tuning tests 5 x 3)")
    a("--test_crops", type=int, default=None, help="spatial crops per test clip along the long side; default: "
      f"1 (the centre), or {SEGMENT_TEST_VIEWS[1]} with --sampling segments (the released SSv2 probe)")
    # the head (the paper's Table 9; PROTOCOL lists where the released linear_probing_ssv2.sh differs)
    a("--head_norm", default="layernorm", choices=["layernorm", "batchnorm"],
      help="layernorm: the released fc_norm (learned); batchnorm: MAE's BatchNorm without affine")
    a("--epochs", type=int, default=None, help="head epochs; cheap on cached features, so more is fine if the train "
      f"accuracy is still rising. Default: {per_dataset(EPOCHS, VIDEO_DATASETS + IMAGE_DATASETS, 100)}")
    a("--lr", type=float, default=1e-3, help="AdamW peak lr, used as given (not scaled by batch size)")
    a("--weight_decay", type=float, default=0.05, help="on the Linear weight only (not biases, not the norm)")
    a("--batch_size", type=int, default=128, help="cached features per head step (the head trains in one process)")
    a("--warmup_epochs", type=int, default=0, help="linear warmup before the cosine (the released script: 5)")
    # system
    a("--extract_batch", type=int, default=32, help="clips per backbone forward pass per GPU; lower it on OOM")
    a("--workers", type=int, default=None, help=f"DataLoader workers (decoding processes) per GPU; default: "
      f"min(8, CPU cores) = {default_workers()} here")
    add_device_option(p, "the encoder runs in bf16 / fp16 on CUDA, fp32 on the CPU")
    a("--out", default=None, help="results JSON; default: <ckpt without .pth>.linear_<dataset>.json, "
      "out/random_<arch>.linear_<dataset>.json for 'random'")
    a("--cache_dir", default=None, help="feature cache, safe to delete; default: features/ beside the JSON")
    a("--seed", type=int, default=0, help="random encoder init, head init and view sampling")
    a("--probes", type=parse_probes, default=None, help=f"probes to run beside the Table 9 head, comma-separated "
      f"from {','.join(PROBES)} or 'none'; default: all on the built-in sets ({', '.join(BUILT_IN)}), "
      f"linear_converged,knn elsewhere (dense and attentive cache every output token: clips x tokens x D x 2 bytes)")
    a("--bench", action="store_true", help="recompute the features (ignore the cache) and report the cost of "
      "a probe: backbone passes per training clip, extraction and head-training wall time")
    return p


def per_dataset(values, datasets, otherwise=None):
    """'2 (fashion, synthetic, ssv2), 4 (k400, ...)': each dataset's value (`otherwise` where it has none)."""
    return grouped_values({d: values.get(d, otherwise) for d in datasets})


def check_args(p, args):
    """Every option's range and choice, before any weight or clip is read: a bad value stops here with
    argparse's usage line and one message per problem naming the option and a valid value (exit 2)."""
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(message)

    need(args.ckpt == "random" or os.path.isfile(args.ckpt), f"--ckpt {args.ckpt!r} does not exist (or pass 'random')")
    need(args.arch is None or args.arch in PRESETS, f"--arch {args.arch}: choose one of {', '.join(PRESETS)}")
    need(args.data_root is not None or args.dataset in BUILT_IN, f"--data_root is required for --dataset "
         f"{args.dataset}: the folder holding its layout (data.py LAYOUTS), e.g. --data_root data/{args.dataset}")
    # Unset (None) options take a per-dataset default later; a value given must be in range.
    problems += below_minimum(args, [("num_frames", 2, 16), ("img_size", 1, 224), ("stride", 1, 4),
                                     ("test_clips", 1, 1), ("test_crops", 1, 3), ("epochs", 1, 100),
                                     ("batch_size", 1, 128), ("extract_batch", 1, 32), ("aug_views", 0, 0),
                                     ("warmup_epochs", 0, 5), ("workers", 0, 8)])
    need(args.fold in (1, 2, 3), f"--fold {args.fold}: UCF101 / HMDB51 have splits 1, 2 and 3, e.g. 1")
    need(args.lr > 0, f"--lr {args.lr}: must be > 0, e.g. 1e-3")
    need(args.weight_decay >= 0, f"--weight_decay {args.weight_decay}: must be >= 0, e.g. 0.05")
    epochs = args.epochs or EPOCHS.get(args.dataset, 100)
    need(args.warmup_epochs < epochs, f"--warmup_epochs {args.warmup_epochs} must be shorter than the {epochs} "
         f"head epochs (the lr would never reach its peak), e.g. --warmup_epochs {min(5, epochs - 1)}")
    try:
        args.device = str(resolve_device(args.device))  # a name: the results JSON stores the settings
    except UsageError as err:
        problems.append(str(err))
    if problems:
        p.error(invalid_options(problems))


# ============ data: videos from data.py, images as clips of one repeated frame ============


class FrameClips(torch.utils.data.Dataset):
    """An image dataset as clips of one repeated frame (the paper's Table 9 evaluates IN-1K / CIFAR-100 so).

    Items: (clip (3, T, S, S), label), or with repeats R > 1 (random crops, each drawn anew)
    (clips (R, 3, T, S, S), labels (R,)) -- the same contract as data.VideoClips. As there, item i's random
    crops depend on (seed, i) alone, not on the rank or DataLoader worker that reads it.
    """

    def __init__(self, images, num_frames, num_classes, repeats=1):
        self.images, self.num_frames, self.num_classes, self.repeats = images, num_frames, num_classes, repeats
        self.seed = 0

    def __len__(self):
        return len(self.images)

    @property
    def samples(self):
        """(path, label) per image (ImageFolder), or (index, label) (CIFAR-100: one file holds every image)."""
        return getattr(self.images, "samples", None) or list(enumerate(self.images.targets))

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):  # torchvision's random crops draw from the global CPU RNG
            torch.manual_seed(self.seed * 1_000_003 + i)
            views = [self.images[i] for _ in range(self.repeats)]  # R x ((3, S, S), label)
        clips = torch.stack([img[:, None].expand(-1, self.num_frames, -1, -1) for img, _ in views])  # (R, 3, T, S, S)
        label = views[0][1]
        return (clips[0], label) if self.repeats == 1 else (clips, torch.full((self.repeats,), label))


def image_dataset(name, root, split, num_frames, size, train=False, flip=False, repeats=1):
    import torchvision.datasets as tvd
    import torchvision.transforms as T
    bicubic = T.InterpolationMode.BICUBIC
    if train:  # only for --aug_views; the default views are the deterministic centre crop (+ mirror)
        crop = [T.RandomResizedCrop(size, interpolation=bicubic)] + [T.RandomHorizontalFlip()] * flip
    else:  # IN-1K: the usual resize to size/0.875 + centre crop; CIFAR's 32 px images: upsample whole
        crop = [T.Resize(size if name == "cifar100" else int(size / 0.875), interpolation=bicubic), T.CenterCrop(size)]
    tf = T.Compose(crop + [T.PILToTensor()])  # uint8 (3, S, S), like the video clips: normalised on the device
    try:
        if name == "cifar100":
            images = tvd.CIFAR100(root or "", train=split == "train", download=False, transform=tf)
        else:
            images = tvd.ImageFolder(os.path.join(root or "", split), transform=tf)
    except (RuntimeError, FileNotFoundError) as e:  # torchvision's messages do not say what layout it wanted
        want = ("<root>/cifar-100-python/{train,test,meta} (torchvision's CIFAR-100; nothing is downloaded)"
                if name == "cifar100" else f"<root>/{split}/<class>/*.JPEG")
        raise FileNotFoundError(f"{name}: cannot read split {split!r} under --data_root {root!r}: {e}\n"
                                f"  expected layout: {want}") from None
    return FrameClips(images, num_frames, len(images.classes), repeats)


def build_dataset(args, cfg, split, train=False, repeats=1, clips=1, crops=1):
    """Clips of this encoder's length and size; items (3, T, S, S) or (V, 3, T, S, S) for V views.
    train=True: random crops (data.py's multi-scale crop), randomly mirrored if --flip."""
    flip = train and args.flip
    if args.dataset in IMAGE_DATASETS:
        return image_dataset(args.dataset, args.data_root, split, cfg.num_frames, cfg.img_size, train, flip, repeats)
    kwargs = dict(num_frames=cfg.num_frames, size=cfg.img_size, train=train, flip=flip, repeats=repeats,
                  num_clips=clips, num_crops=crops, sampling=args.sampling)
    if args.stride:
        kwargs["stride"] = args.stride
    return build_video_dataset(args.dataset, args.data_root, split, fold=args.fold, **kwargs)


def agree_on_samples(name, dataset, data_root):
    """Stop every rank unless all of them list the same (path, label) items in the same order: clip i of a
    rank with another copy of the data is another video, and its features would land in another clip's
    row. Paths are compared relative to --data_root, so nodes may mount the same copy at different places."""
    where = lambda p: os.path.relpath(p, data_root) if data_root and isinstance(p, str) else p
    kind = "videos" if isinstance(dataset, VideoClips) else "images"
    ranks.agree(f"the {name} {kind}", f"{len(dataset)} {kind}", [(where(p), y) for p, y in dataset.samples],
                fix="Give every node the same dataset (--data_root).")

# ============ feature cache ============


def checkpoint_identity(path, seed):
    """What the features depend on about the weights: the file (path, size, mtime) or the random init."""
    if path == "random":
        return f"random init, seed {seed}"
    st = os.stat(path)
    return dict(path=os.path.abspath(path), size=st.st_size, mtime_ns=st.st_mtime_ns)


def cache_path(cache_dir, key):
    """One file per key: <dataset>_<split>_<views>_<hash of the whole key>.pt."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{key['dataset']}_{key['split']}_{key['views']}_{digest}.pt")


def save_features(path, key, feats, labels, passes):
    """feats (N, V, D) float32, labels (N,) int64; passes = backbone forward passes it took."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(dict(key=json.loads(json.dumps(key, default=str)), feats=feats, labels=labels, passes=passes), tmp)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a truncated cache file


def load_features(path, key):
    """The cached entry for `key`, or None. The stored key is compared too (hash collisions, renames)."""
    if not os.path.isfile(path):
        return None
    entry = torch.load(path, map_location="cpu", weights_only=True)
    return entry if entry["key"] == json.loads(json.dumps(key, default=str)) else None

# ============ extracting features (every rank encodes its share) ============


@torch.no_grad()
def extract(encoder, loader, device, flip, show=True, desc="extracting"):
    """Mean-pooled features of every clip the loader yields.

    Returns feats (N, V*F, D) float32 (V views per item, F = 2 with the mirrored copy, view-major:
    view v's mirror is column v*F+1), labels (N,), and the number of backbone forward passes.
    """
    # Eval mode, as the frozen protocol of Table 9 asks: in train mode an encoder built with drop path (the released
    # fine-tuning default 0.1; model.Encoder's drop_path) would keep dropping blocks of the frozen backbone.
    encoder.eval()
    autocast = inference_autocast(device)  # bf16 / fp16 by compute capability (model.autocast_dtype), fp32 on CPU
    feats, labels, passes = [], [], 0
    for clips, y in tqdm(loader, desc=desc, disable=None if show else True, leave=False, dynamic_ncols=True):
        if clips.dim() == 5:
            clips, y = clips[:, None], y[:, None]  # one view: (B, 1, 3, T, S, S)
        B, V = clips.shape[:2]
        x = normalize(clips.flatten(0, 1).to(device, non_blocking=True))  # (B*V, 3, T, S, S) uint8 -> normalised
        views = [x, x.flip(-1)] if flip else [x]  # flip(-1): mirror along the width
        out = []
        for v in views:
            with autocast:
                tokens = encoder(v)  # (B*V, N, D): all tokens, no mask
            out.append(tokens.float().mean(dim=1))  # (B*V, D) mean over tokens, in fp32
            passes += len(v)
        feats.append(torch.stack(out, dim=1).view(B, V * len(views), -1).cpu())  # (B, V*F, D)
        labels.append(y[:, 0])
    return torch.cat(feats), torch.cat(labels).long(), passes


def cached_features(encoder, dataset, key, args, device, rank, world, desc):
    """Features of one split and view set, from the cache or extracted (sharded over ranks).

    The cache is rank 0's: it alone reads and writes it, and every rank follows its decision (extract or not), so
    all ranks issue the same collectives even where --cache_dir is a node-local folder that holds the file on one
    node only. Returns (feats (N, V, D), labels (N,), passes, seconds spent extracting) on rank 0, None elsewhere.
    """
    path = cache_path(args.cache_dir, key)
    with ranks.together(f"reading the feature cache {path}"):
        entry = load_features(path, key) if rank == 0 and not args.bench else None
    if ranks.from_rank0(entry is not None, world):
        return (entry["feats"], entry["labels"], entry["passes"], 0.0) if rank == 0 else None
    t0 = time.perf_counter()
    V = key["views_per_item"]
    # Shard r holds clips r, r+world, ... (no padding, unlike DistributedSampler: every clip counts once).
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = make_loader(shard, max(1, args.extract_batch // V), args.workers, shuffle=False,
                         drop_last=False, seed=args.seed, distributed=False)
    # A rank past the last clip (fewer clips than ranks) has nothing to encode, but still joins the gather.
    part = extract(encoder, loader, device, key["flip"], show=rank == 0,
                   desc=f"{desc} ({len(dataset)} clips x {V * (1 + key['flip'])} views)") if len(shard) else None
    parts = ranks.gather_to_rank0(part, rank, world)  # per rank: (feats (N_r, V, D), labels (N_r,), passes) or None
    if rank != 0:
        return None
    row = parts[0][0].shape[1:]  # (V, D); rank 0 always holds clip 0
    feats, labels = torch.empty(len(dataset), *row), torch.empty(len(dataset), dtype=torch.long)  # (N, V, D), (N,)
    for r, part in enumerate(parts):
        if part is not None:
            feats[r::world], labels[r::world] = part[0], part[1]  # undo the strided sharding
    passes = sum(part[2] for part in parts if part is not None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    save_features(path, key, feats, labels, passes)
    return feats, labels, passes, seconds


# ============ the linear head (trained on cached features) ============


class LinearHead(nn.Module):
    """normalisation + Linear: (B, D) pooled features -> (B, C) logits."""

    def __init__(self, dim, num_classes, norm="layernorm"):
        super().__init__()
        # layernorm: the released probe's fc_norm (eps 1e-6, weight and bias learned with the head);
        # batchnorm: MAE's linear probe, BatchNorm1d(affine=False, eps=1e-6) -- pure standardisation.
        self.norm = (nn.LayerNorm(dim, eps=1e-6) if norm == "layernorm"
                     else nn.BatchNorm1d(dim, affine=False, eps=1e-6))
        self.fc = nn.Linear(dim, num_classes)
        # The released head starts at trunc-normal(0.02) x init_scale 0.001 (~0); the problem is convex: start at 0.
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.norm(x))


def train_head(feats, labels, num_classes, epochs=100, lr=1e-3, weight_decay=0.05, batch_size=128,
               norm="layernorm", warmup_epochs=0, seed=0, device="cpu", show=True):
    """Train a LinearHead on cached features.

    feats (N, V, D): V cached views per clip; every step draws one view per clip at random, which is how the cached
    mirror (and --aug_views crops) become augmentation. AdamW betas (0.9, 0.999), per-step cosine to 0 after an
    optional linear warmup (the paper's Table 9 protocol). The last partial batch of an epoch is dropped, as released.
    """
    g = torch.Generator().manual_seed(seed)
    feats, labels = feats.to(device), labels.to(device)
    N, V, D = feats.shape
    head = LinearHead(D, num_classes, norm).to(device)
    decay = [p for p in head.parameters() if p.ndim > 1]  # the Linear weight; not biases or norms (train.param_groups)
    rest = [p for p in head.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)],
                            lr=lr, betas=(0.9, 0.999))
    bs = min(batch_size, N)
    steps_per_epoch = N // bs
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    head.train()
    bar = tqdm(range(epochs), desc="head", disable=None if show else True, leave=False, dynamic_ncols=True)
    step = 0
    with one_cpu_thread(device):
        for _ in bar:
            order = torch.randperm(N, generator=g)  # (N,) clip order this epoch
            view = torch.randint(V, (N,), generator=g)  # (N,) the cached view each of them shows
            correct = 0
            for i in range(steps_per_epoch):
                batch = slice(i * bs, (i + 1) * bs)
                x = feats[order[batch].to(device), view[batch].to(device)]  # (bs, D)
                y = labels[order[batch].to(device)]  # (bs,)
                rate = lr * step / warmup if step < warmup else \
                    0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
                for group in opt.param_groups:
                    group["lr"] = rate
                logits = head(x)  # (bs, C)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", train_top1=f"{100 * correct / (steps_per_epoch * bs):.1f}")
    return head.eval()


@torch.no_grad()
def predict(head, feats, chunk=8192):
    """feats (N, V, D) -> (N, C): softmax scores averaged over the V views (multi-view testing)."""
    head.eval()
    device = next(head.parameters()).device
    out = []
    for x in feats.split(chunk):
        N, V, D = x.shape
        probs = head(x.to(device).flatten(0, 1)).float().softmax(-1)  # (N*V, C)
        out.append(probs.view(N, V, -1).mean(1).cpu())  # (N, C)
    return torch.cat(out)


# ============ probes beside Table 9: what the features hold, not what the optimiser found ============
# The Table 9 head above is AdamW for a fixed number of epochs: on small sets it stops far from the optimum of its
# convex problem, so part of a "pretrained beats random" gap it measures is the head. The probes (probes.py: what
# each is, and its maths) read the same frozen encoder; linear_converged's train accuracy shows how separable the
# features are. linear_converged and knn read the cached mean-pooled features (train: the unmirrored centre view;
# test: every view, scores summed); dense and attentive every clip's output tokens, cached in fp16 (clips x tokens x
# D x 2 bytes: tiny on the built-in set 800 x 256 x 192 x 2 = 79 MB; ViT-B on K400 train 240k x 1568 x 768 x 2 =
# 578 GB), so they are opt-in (--probes) except on the built-in sets.
PROBES = ("linear_converged", "knn", "dense", "attentive")
TOKEN_PROBES = ("dense", "attentive")


def parse_probes(text):
    """--probes 'a,b' -> ('a', 'b'); 'none' -> (). An argparse type, so a bad name fails at start."""
    names = () if text.strip() == "none" else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown probe(s) {', '.join(unknown)}; valid: {','.join(PROBES)} "
                                         f"(comma-separated), or 'none'")
    return names


def default_probes(dataset):
    """All four on the built-in sets (their videos carry dense-label sidecars); the pooled ones elsewhere."""
    return PROBES if dataset in BUILT_IN else ("linear_converged", "knn")

# ---- token features (dense and attentive probes) ----


@torch.no_grad()
def extract_tokens(encoder, loader, device, show=True):
    """Every output token of every clip (one centre view, no mirror): tokens (N, t*h*w, D) float16 in the
    encoder's (t, h, w) row-major token order, labels (N,). fp16 halves the cache; the probes compute in fp32."""
    encoder.eval()
    autocast = inference_autocast(device)  # bf16 / fp16 by compute capability (model.autocast_dtype), fp32 on CPU
    tokens, labels = [], []
    for clips, y in tqdm(loader, desc="token features", disable=None if show else True, leave=False):
        with autocast:
            tokens.append(encoder(normalize(clips.to(device, non_blocking=True))).half().cpu())  # (B, N, D)
        labels.append(torch.as_tensor(y))
    return torch.cat(tokens), torch.cat(labels).long()


def cached_tokens(encoder, dataset, key, args, device):
    """Token features of one split from the cache (same folder and rules as the pooled ones) or extracted on
    this process alone (under torchrun: rank 0). -> tokens (N, n_tokens, D) float16, labels (N,)."""
    path = cache_path(args.cache_dir, key)
    entry = None if args.bench else load_features(path, key)
    if entry is None:
        loader = make_loader(dataset, args.extract_batch, args.workers, shuffle=False, drop_last=False,
                             seed=args.seed, distributed=False)
        tokens, labels = extract_tokens(encoder, loader, device)
        save_features(path, key, tokens, labels, passes=len(dataset))
        entry = dict(feats=tokens, labels=labels)
    return entry["feats"], entry["labels"]

# ---- per-token labels from the sidecar masks ----


def sidecar_path(video_path):
    """<dir>/<name>.mp4 -> <dir>/<name>.mask.npy: uint8 (T, H, W), the video's per-pixel dense label for all
    its T frames (0 = background, k >= 1 = dense class k), written by synthetic.py beside each video."""
    return os.path.splitext(video_path)[0] + ".mask.npy"


def dense_class_names(video_path):
    """meta.json's "dense_classes" (index 0 = 'background') of the set holding this video, or None."""
    for folder in list(Path(video_path).parents)[:4]:  # <root>/<split>/<class>/<name>.mp4 -> <root>/meta.json
        if (folder / "meta.json").is_file():
            return json.loads((folder / "meta.json").read_text()).get("dense_classes")
    return None


def dense_problem(dataset, cfg):
    """Why the dense probe cannot run on this eval dataset (a message), or None. Token labels come from the
    mask pixels under each token, so the clip must be the video at native resolution: data.py's eval view is
    the central short-side square resized to img_size, which is the identity only for img_size x img_size
    videos (bilinear resampling at the same size returns the input exactly)."""
    path = dataset.samples[0][0]
    if not os.path.isfile(sidecar_path(path)):
        return f"no dense-label sidecar {sidecar_path(path)} (uint8 (T, H, W) per video)"
    if not dense_class_names(path):
        return f"no \"dense_classes\" in a meta.json above {path}"
    T, H, W = np.load(sidecar_path(path), mmap_mode="r").shape
    if (H, W) != (cfg.img_size, cfg.img_size):
        return (f"videos are {W}x{H} but the encoder's clips are {cfg.img_size}x{cfg.img_size}: the eval crop / "
                f"resize would move pixels off their mask; the dense probe needs videos at the encoder's size")
    with Video(path) as video:
        if video.num_frames != T:
            return f"{sidecar_path(path)} has {T} frames, its video {video.num_frames}"
    return None


def eval_clip_positions(dataset, video_frames):
    """The frame positions data.VideoClips decodes for its single centred eval clip (LongTensor (T,)): start
    room // 2 (room = frames past one clip span), then every stride-th frame, clamped to the last frame."""
    start = max(video_frames - dataset.span, 0) // 2
    return (start + dataset.stride * torch.arange(dataset.num_frames)).clamp(max=video_frames - 1)


def dense_labels(dataset, cfg, num_classes):
    """(N, t*h*w) int64 token labels of every clip of an eval dataset (one centre view), from the sidecars."""
    out = []
    for path, _ in dataset.samples:
        mask = np.load(sidecar_path(path))  # (T_video, H, W) uint8
        if mask.shape[1:] != (cfg.img_size, cfg.img_size):
            raise ValueError(f"{sidecar_path(path)}: masks {mask.shape[1:]}, clips {cfg.img_size}x{cfg.img_size}")
        out.append(token_labels(mask, eval_clip_positions(dataset, len(mask)), cfg, num_classes))
    return torch.stack(out)

# ---- running them beside the Table 9 head ----


def usable_probes(args, cfg, train_set, test_set, say=print):
    """--probes, checked against the data before any encoding: a dense probe the data cannot support is an
    error when asked for by name and skipped with a note when it is only the built-in sets' default."""
    probes = args.probes
    if "dense" in probes:
        problem = ("dense labels exist only for video sets" if not isinstance(train_set, VideoClips)
                   else dense_problem(train_set, cfg) or dense_problem(test_set, cfg))
        if problem and args.probes_given:
            raise UsageError(f"--probes dense: {problem}")
        if problem:
            say(f"dense probe skipped: {problem}")
            probes = tuple(p for p in probes if p != "dense")
    return probes


def token_probes(probes, encoder, cfg, args, base_key, device):
    """The dense and attentive probes: token features of both splits (one centre view each, cached fp16),
    then each probe. -> {name: results dict with 'seconds'}."""
    tokens = {}
    for name, split in (("train", args.train_split), ("test", args.test_split)):
        dataset = build_dataset(args, cfg, split)
        gb = len(dataset) * cfg.num_tokens * cfg.enc_dim * 2 / 1e9
        print(f"token features, {name}: {len(dataset)} clips x {cfg.num_tokens} tokens x {cfg.enc_dim} x 2 bytes "
              f"= {gb:.2f} GB (fp16, cached in {args.cache_dir})")
        key = dict(base_key, split=split, views="tokens", views_per_item=1, flip=False, dtype="float16")
        tokens[name] = (*cached_tokens(encoder, dataset, key, args, device), dataset)
    (xtr, ytr, train_set), (xte, yte, test_set) = tokens["train"], tokens["test"]
    out = {}
    if "dense" in probes:
        names = dense_class_names(train_set.samples[0][0])
        out["dense"] = timed(lambda: dense_probe(xtr, dense_labels(train_set, cfg, len(names)), xte,
                                                 dense_labels(test_set, cfg, len(names)), names, args.seed, device))
    if "attentive" in probes:
        with one_cpu_thread(device):  # small batches: see probes.one_cpu_thread
            out["attentive"] = timed(lambda: attentive_probe(xtr, ytr, xte, yte, test_set.num_classes,
                                                             cfg.enc_heads, args.seed, device))
    return out


def timed(probe):
    """probe() -> its results dict plus 'seconds' (wall) and 'cpu_seconds' (this process: unlike the wall time,
    it does not grow with the load of other processes)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = probe()
    return dict(out, seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)


def pooled_probes(probes, train_feats, train_labels, test_feats, test_labels, num_classes, device, seed=0):
    """The probes on mean-pooled features: train_feats (N, V, D) (column 0, the unmirrored centre view, is
    used), test_feats (M, V, D). -> {name: results dict with 'seconds'}."""
    x, y = train_feats[:, 0].to(device), train_labels.to(device)
    tx, ty = test_feats.to(device), test_labels.to(device)
    run = dict(linear_converged=lambda: linear_converged_probe(x, y, tx, ty, num_classes, seed),
               knn=lambda: knn_probe(x, y, tx, ty, num_classes))
    out = {}
    for name in [n for n in run if n in probes]:
        out[name] = timed(run[name])
    return out


def print_probe_table(table9, probes):
    """One compact table: the Table 9 head's row, then each probe's (metrics in percent)."""
    rows = [("table9 (AdamW head)", f"{table9['top1']:.2f}", f"{table9['train_top1']:.1f}", "")]
    for name, r in probes.items():
        if name == "dense":
            rows.append((name, f"mIoU {r['miou']:.2f}", f"{r['train_token_accuracy']:.1f}",
                         f"token acc {r['token_accuracy']:.1f}, {r['seconds']:.1f} s"))
        else:
            extra = (f"lambda {r['weight_decay']:g}, " if name == "linear_converged" else "") + f"{r['seconds']:.1f} s"
            rows.append((name, f"{r['top1']:.2f}", f"{r['train_top1']:.1f}" if "train_top1" in r else "-", extra))
    print(f"{'probe':<22}{'test':>14}{'train':>8}  notes")
    for name, test, train, extra in rows:
        print(f"{name:<22}{test:>14}{train:>8}  {extra}")


# ============ main ============


def frozen_encoder(args, device, world, say):
    """The encoder to probe, frozen, in eval mode, on `device` (a misfit architecture fails here, naming the
    preset that fits). -> (encoder, cfg, missing keys, unexpected keys)."""
    overrides = {k: v for k, v in (("num_frames", args.num_frames), ("img_size", args.img_size)) if v}
    encoder, cfg = open_encoder(args.ckpt, args.arch, **overrides)  # a misfit: UsageError naming the options
    missing, unexpected = [], []
    if args.ckpt != "random":
        # load_encoder already refused missing encoder weights; read the file once more for the exact key
        # report (decoder / phi / prototype keys are not the encoder's and are left out on purpose).
        missing, unexpected = load_weights(encoder, args.ckpt)
    if not args.final_norm:
        encoder.norm = nn.Identity()  # the released probe pools the last block's tokens (its norm = Identity)
    encoder.requires_grad_(False).eval().to(device)
    say(f"encoder: {describe_state_dict(encoder.state_dict())}, {cfg.num_frames}x{cfg.img_size}x{cfg.img_size} "
        f"clips, {sum(p.numel() for p in encoder.parameters()):,} parameters, frozen, on {device}"
        + (f" x {world} ranks" if world > 1 else ""))
    if args.ckpt != "random":
        say(f"weights: {args.ckpt}; missing keys: {missing or 'none'}; unexpected keys: {unexpected or 'none'}")
    return encoder, cfg, missing, unexpected


def build_view_sets(args, cfg, say):
    """Every view set of both splits, built before any encoding so that a missing split file or root fails
    now. A view set = one pass over a split; each item yields V views (data.py decodes a video once for all
    of them), and with flip each view is encoded mirrored too.
    -> [(name, cache tag, views per item V, mirrored too?, dataset)], test views 'clips x crops'."""
    clips, crops = args.test_clips, args.test_crops
    if args.dataset in IMAGE_DATASETS and clips * crops > 1:
        say("note: image datasets are tested on one centre crop; --test_clips / --test_crops ignored")
        clips = crops = 1
    view_sets = [("train", "centre", 1, args.flip, build_dataset(args, cfg, args.train_split)),
                 ("test", f"{clips}x{crops}", clips * crops, False,
                  build_dataset(args, cfg, args.test_split, clips=clips, crops=crops))]
    if args.aug_views:  # random crops (mirrored at random if --flip), drawn once per clip and cached like the rest
        augmented = build_dataset(args, cfg, args.train_split, train=True, repeats=args.aug_views)
        # Each clip's crops are drawn from (seed, clip index) alone (data.VideoClips, FrameClips), so they are the
        # same for any world size, --workers and --extract_batch: the cache key needs none of them.
        augmented.seed = args.seed
        view_sets.insert(1, ("train_aug", f"aug{args.aug_views}-seed{args.seed}", args.aug_views, False, augmented))
    train, test = view_sets[0][-1], view_sets[-1][-1]
    if train.num_classes != test.num_classes:
        raise UsageError(f"--train_split {args.train_split} has {train.num_classes} classes, --test_split "
                         f"{args.test_split} {test.num_classes}: both splits must list the same classes")
    return view_sets, f"{clips}x{crops}"


def all_features(encoder, view_sets, base_key, args, device, rank, world):
    """Features of every view set, from the cache or extracted (every rank takes part, rank 0 gathers).
    -> on rank 0: {name: (feats (N, V, D), labels (N,))}, {name: seconds}, {name: backbone passes}."""
    features, seconds, passes = {}, {}, {}
    for name, tag, views, flip, dataset in view_sets:
        split = args.test_split if name == "test" else args.train_split
        key = dict(base_key, split=split, views=tag + ("+flip" if flip else ""), views_per_item=views, flip=flip)
        got = cached_features(encoder, dataset, key, args, device, rank, world, desc=f"{name} features")
        if got is not None:  # rank 0
            features[name], passes[name], seconds[name] = got[:2], got[2], got[3]
    return features, seconds, passes


def fit_and_test_head(features, num_classes, args, device):
    """Train the Table 9 head on the cached training views, test it on every test view.
    -> (top-k dict, train top-1 on the unmirrored view, head training seconds, train feats (N, V_train, D))."""
    train_names = [name for name in features if name != "test"]
    train_feats = torch.cat([features[n][0] for n in train_names], dim=1)  # (N, V_train, D)
    train_labels = features["train"][1]  # (N,)
    test_feats, test_labels = features["test"]  # (M, V_test, D), (M,)
    t0 = time.perf_counter()
    head = train_head(train_feats, train_labels, num_classes, args.epochs, args.lr, args.weight_decay,
                      args.batch_size, args.head_norm, args.warmup_epochs, args.seed, device, show=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    head_seconds = time.perf_counter() - t0
    acc = topk_accuracy(predict(head, test_feats), test_labels)
    train_acc = topk_accuracy(predict(head, train_feats[:, :1]), train_labels)["top1"]  # unmirrored view
    return acc, train_acc, head_seconds, train_feats


def print_results(results, args, seconds, device):
    """The result line, the protocol it was measured under, and with --bench what the probe cost."""
    print(f"linear probe {args.dataset} ({args.test_split}, {results['num_train']} train / {results['num_test']} "
          f"test clips, {results['num_classes']} classes, {results['test_views']} test views): top-1 "
          f"{results['top1']:.2f}  top-5 {results['top5']:.2f}  (train top-1 {results['train_top1']:.1f})  -> "
          f"{args.out}\nprotocol: {PROTOCOL['name']}; clips: {args.sampling} sampling.\n  Known differences from "
          f"the released probe: " + "; ".join(PROTOCOL["differences_from_released_probe"]))
    if args.bench:
        passes_per_clip = results["forward_passes_per_train_clip"]
        per_view = seconds["train"] / (1 + args.flip)  # one pass over the training clips
        print(f"bench ({device}, {results['num_train']} training clips, {args.epochs} head epochs):\n"
              f"  backbone forward passes per training clip: {passes_per_clip:.2f} "
              f"(released recipe: {args.epochs}, one per head epoch)\n"
              f"  feature extraction: train {seconds['train'] + seconds.get('train_aug', 0):.1f} s, "
              f"test {seconds['test']:.1f} s (decoding included)\n"
              f"  head training on cached features: {results['head_train_seconds']:.2f} s for {args.epochs} epochs\n"
              f"  the released recipe's backbone work on the training clips alone: ~{args.epochs} x "
              f"{per_view:.1f} s = {args.epochs * per_view:.0f} s")


def main(argv=None):
    args = get_args(argv)  # every option checked before anything is read
    rank, world, device = setup_distributed(args.device)
    ddp = dist.is_initialized()  # under torchrun
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # the 'random' encoder's init
    encoder, cfg, missing, unexpected = frozen_encoder(args, device, world, say)
    with ranks.together("reading the datasets"):  # a rank that cannot read its copy stops every rank
        view_sets, test_views = build_view_sets(args, cfg, say)
        datasets = {name: ds for name, _, _, _, ds in view_sets}
        probes = usable_probes(args, cfg, datasets["train"], datasets["test"], say)  # before any encoding
    for name in ("train", "test"):  # train_aug lists the train split's items again
        agree_on_samples(name, datasets[name], args.data_root)
    num_classes = datasets["test"].num_classes
    say("settings: " + json.dumps(vars(args)))

    # ---- features of every view set: extracted once, then cached (the key says what they depend on) ----
    base_key = dict(ckpt=checkpoint_identity(args.ckpt, args.seed), encoder=asdict(cfg), final_norm=args.final_norm,
                    dataset=args.dataset, root=os.path.abspath(args.data_root) if args.data_root else "default",
                    fold=args.fold, stride=getattr(datasets["train"], "stride", None),  # data.py's resolved stride
                    sampling=args.sampling)
    features, seconds, passes = all_features(encoder, view_sets, base_key, args, device, rank, world)
    if ddp:
        dist.barrier()  # the other ranks are done: the head is trained on rank 0 alone (seconds)
        if rank != 0:
            dist.destroy_process_group()
            return None

    # ---- the Table 9 head on cached features, then the probes beside it ----
    acc, train_acc, head_seconds, train_feats = fit_and_test_head(features, num_classes, args, device)
    train_labels, (test_feats, test_labels) = features["train"][1], features["test"]
    n_train = len(train_labels)
    results = dict(top1=acc["top1"], top5=acc["top5"], train_top1=train_acc, dataset=args.dataset,
                   test_split=args.test_split, test_views=test_views,
                   num_train=n_train, num_test=len(test_labels), num_classes=num_classes, ckpt=args.ckpt,
                   encoder=asdict(cfg), missing_keys=missing, unexpected_keys=unexpected,
                   forward_passes_per_train_clip=sum(passes[n] for n in features if n != "test") / n_train,
                   head_train_seconds=head_seconds, extract_seconds=seconds, protocol=PROTOCOL, args=vars(args))
    if probes:
        results["probes"] = pooled_probes(probes, train_feats, train_labels, test_feats, test_labels,
                                          num_classes, device, args.seed)
        if any(p in TOKEN_PROBES for p in probes):
            results["probes"].update(token_probes(probes, encoder, cfg, args, base_key, device))
        print_probe_table(results, results["probes"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print_results(results, args, seconds, device)
    if ddp:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main, "eval_linear.py"))
