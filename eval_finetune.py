"""
Full fine-tuning (the paper's Tables 2, 3, 5-7 and the recipe of its Table 10): the pretrained encoder,
every weight trained, with a mean-pooling + LayerNorm + Linear head, stochastic depth, layer-wise lr decay,
RandAugment, MixUp / CutMix and label smoothing; multi-view testing at the end.

    python eval_finetune.py --ckpt out/synthetic_tiny_mlp_sigma/ckpt.pth --dataset synthetic   # laptop, minutes
    python eval_finetune.py --ckpt random --arch tiny --dataset synthetic                      # the baseline row
    torchrun --nproc_per_node=8 eval_finetune.py --ckpt out/k400_vit_b_mlp_sigma/ckpt.pth \\
        --dataset k400 --data_root /data/k400                                          # Table 3 (K400)
    torchrun --nproc_per_node=8 eval_finetune.py --ckpt sigma_vitb_k400_mlp.pth --arch vit_b \\
        --dataset ssv2 --data_root /data/ssv2                                          # Table 2 (SSv2)
    python eval_finetune.py --bench --arch vit_b --dataset k400     # FLOPs per clip, memory per GPU (estimate)

Why not a mode of eval_linear.py: the probe trains a head on cached features of a frozen encoder (seconds);
this is a training run with its own recipe (per-layer learning rates, drop path, augmentation that must be
re-drawn every epoch, so nothing can be cached), checkpoints and exact resume like train.py. It imports the
probe's dataset building and top-k code, and train.py's DDP set-up, seeding, lr schedule and checkpointing.

Outputs go to --out (default <ckpt folder>/finetune_<dataset>/): ckpt.pth (atomic, every --save_every epochs;
rerun the same command to resume it exactly), log.jsonl (one line per step) and results.json (top-1 / top-5
of the multi-view test, the resolved config, the missing / unexpected keys of the loaded weights).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from data import IMAGENET_MEAN, make_loader, normalize, set_epoch
from eval_linear import SAMPLING, VIDEO_DATASETS, build_dataset, topk_accuracy
from model import Encoder, build_config, describe_state_dict, load_checkpoint, load_encoder, load_weights
from train import choose_precision, git_hash, lr_at, save_checkpoint, seed_everything, setup_distributed

# ============ defaults: the paper's Table 10 (the VideoMAE fine-tuning recipe the paper follows) ============
# One block: COMMON for every dataset, then per-dataset changes. Every value can be overridden on the command
# line (an option left at None takes it from here). batch_size is clips per GPU, as in the released script
# (run_class_finetuning.py --batch_size); the total is batch_size x GPUs and the lr follows the total:
# lr_abs = lr x total / 256 (also min_lr). On 8 GPUs: K400 16 x 8 = 128 clips, SSv2 32 x 8 = 256; VideoMAE's
# published scripts ran 64 GPUs x 6 clips x 2 repeated samples (--num_sample 2) = 768 clips per step.
COMMON = dict(
    lr=1e-3,             # base lr per 256 clips (AdamW, betas 0.9 / 0.999)
    min_lr=1e-6,         # end of the cosine, per 256 clips (released default)
    warmup_epochs=5,     # linear warmup from 0, then per-step cosine
    weight_decay=0.05,   # not on norms, biases, positional / cls parameters
    layer_decay=0.75,    # block i's lr is x 0.75^(depth - i); the tube embedding x 0.75^(depth + 1)
    drop_path=0.1,       # stochastic depth of the last block, rising linearly from 0 at the first
    mixup=0.8,           # MixUp Beta(alpha, alpha); 0 = off
    cutmix=1.0,          # CutMix Beta(alpha, alpha); 0 = off. Each batch gets one of the two, 50 / 50
    smoothing=0.1,       # label smoothing on the (mixed) targets
    randaug=(2, 9.0, 0.5),  # RandAugment: ops per clip, magnitude (0-10), magnitude std = timm 'rand-m9-mstd0.5'
    flip=True,           # random horizontal flip of training clips
    batch_size=16,       # clips per GPU per step
    epochs=100,
    test_clips=5, test_crops=3,  # multi-view test: temporal clips x spatial crops per video, scores averaged
    num_workers=min(8, os.cpu_count() or 1),
    save_every=1,
)
RECIPES = {
    "k400": dict(epochs=75),
    # SSv2's labels name directions ("pushing something from left to right"): no flip.
    "ssv2": dict(epochs=50, batch_size=32, flip=False, test_clips=2, test_crops=3),
    # Laptop scale: the built-in synthetic videos (64x64, square, so one crop), tiny encoder, 5 short epochs.
    # A 10x higher base lr than the paper's, because 16 clips per step make lr_abs tiny (1e-3 x 16/256).
    "synthetic": dict(epochs=5, warmup_epochs=1, lr=1e-2, test_clips=2, test_crops=1, num_workers=2),
}
# A run folder is tied to these: resuming with others would mix two runs.
RESUME_MUST_MATCH = ("ckpt", "arch", "dataset", "data_root", "batch_size", "epochs", "seed", "world_size", "repeats")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Full fine-tuning of a SIGMA / VideoMAE encoder (paper Table 10).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # what to fine-tune
    a("--ckpt", default=None, help="required (except with --bench): our checkpoint (carries its architecture), "
      "a released SIGMA / VideoMAE checkpoint (pass --arch), or 'random' (randomly initialised --arch: the baseline row)")
    a("--arch", default=None, help="tiny | vit_s | vit_b, for released checkpoints and 'random' (default tiny)")
    a("--num_frames", type=int, default=None, help="clip length for released checkpoints / random (preset's)")
    a("--img_size", type=int, default=None, help="input side for released checkpoints / random (preset's)")
    # data
    a("--dataset", required=True, choices=VIDEO_DATASETS)
    a("--data_root", default=None, help="dataset folder (data.py LAYOUTS); synthetic: generated if omitted")
    a("--train_split", default="train")
    a("--test_split", default="val", help="'val' is the official test list for ucf101 / hmdb51")
    a("--fold", type=int, default=1, help="UCF101 / HMDB51 split (1-3)")
    a("--stride", type=int, default=None, help="frames between sampled frames (data.py default: 4, SSv2 2)")
    a("--sampling", default=None, choices=["stride", "segments"], help="clip frames: 'segments' = one per equal "
      "segment of the whole video (the released SSv2 loader; default for ssv2), 'stride' elsewhere")
    a("--repeats", type=int, default=1, help="clips per decoded training video, each augmented on its own "
      "(VideoMAE's --num_sample; its published scripts use 2); batch_size counts clips")
    a("--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flip (not SSv2)")
    a("--randaug", type=float, nargs=3, default=None, metavar=("OPS", "MAG", "MSTD"),
      help="RandAugment ops per clip, magnitude 0-10, magnitude std; the VideoMAE code's default is 4 7 0.5; "
      "0 0 0 = off")
    a("--mixup", type=float, default=None)
    a("--cutmix", type=float, default=None)
    a("--smoothing", type=float, default=None)
    a("--test_clips", type=int, default=None)
    a("--test_crops", type=int, default=None)
    # optimisation
    a("--epochs", type=int, default=None, help="75 K400 / 50 SSv2 / 100 others")
    a("--warmup_epochs", type=int, default=None)
    a("--batch_size", type=int, default=None, help="clips per GPU per step (16; SSv2 32)")
    a("--lr", type=float, default=None, help="base lr per 256 clips: lr_abs = lr x batch_size x GPUs / 256")
    a("--min_lr", type=float, default=None, help="final lr per 256 clips")
    a("--weight_decay", type=float, default=None)
    a("--layer_decay", type=float, default=None, help="layer-wise lr decay; 1 = the same lr everywhere")
    a("--drop_path", type=float, default=None, help="stochastic depth rate of the last block")
    a("--betas", type=float, nargs=2, default=(0.9, 0.999))
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on CUDA, fp32 on CPU")
    # bookkeeping
    a("--out", default=None, help="run folder (default <ckpt folder>/finetune_<dataset>, out/random_<arch>_... "
      "for 'random')")
    a("--num_workers", type=int, default=None, help="decoding processes per GPU")
    a("--save_every", type=int, default=None, help="epochs between checkpoints (always one at the end)")
    a("--max_epochs_this_run", type=int, default=0, help="stop after this many epochs (checkpointed); rerun to go on")
    a("--seed", type=int, default=0)
    a("--bench", action="store_true", help="print FLOPs per clip and the estimated memory per GPU of a training "
      "step of --arch at --batch_size, then exit (no data needed)")
    args = p.parse_args(argv)

    args.recipe = {**COMMON, **RECIPES.get(args.dataset, {})}
    for k, v in args.recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.randaug = (int(args.randaug[0]), float(args.randaug[1]), float(args.randaug[2]))
    args.sampling = args.sampling or SAMPLING.get(args.dataset, "stride")  # as eval_linear.py (data.py samplings)
    problems = [msg for bad, msg in [
        (args.ckpt is None and not args.bench, "--ckpt is required: a checkpoint file or 'random'"),
        (args.ckpt not in (None, "random") and not os.path.isfile(args.ckpt),
         f"--ckpt {args.ckpt!r} does not exist (or pass 'random')"),
        (args.lr <= 0 or args.min_lr < 0, "--lr must be > 0 and --min_lr >= 0"),
        (not 0 <= args.drop_path < 1, f"--drop_path {args.drop_path} must be in [0, 1), e.g. 0.1"),
        (not 0 < args.layer_decay <= 1, f"--layer_decay {args.layer_decay} must be in (0, 1], e.g. 0.75"),
        (not 0 <= args.smoothing < 1, f"--smoothing {args.smoothing} must be in [0, 1), e.g. 0.1"),
        (args.mixup < 0 or args.cutmix < 0, "--mixup / --cutmix are Beta alphas: >= 0 (0 = off)"),
        (args.randaug[0] < 0 or not 0 <= args.randaug[1] <= 10 or args.randaug[2] < 0,
         f"--randaug {args.randaug}: ops >= 0, magnitude in [0, 10], std >= 0, e.g. 2 9 0.5"),
        (args.epochs < 1 or not 0 <= args.warmup_epochs < args.epochs,
         f"--epochs {args.epochs} / --warmup_epochs {args.warmup_epochs}: need 0 <= warmup < epochs"),
        (args.batch_size < 1 or args.batch_size % args.repeats,
         f"--batch_size {args.batch_size} must be a positive multiple of --repeats {args.repeats}"),
        ((args.mixup > 0 or args.cutmix > 0) and args.batch_size // args.repeats < 2,
         "--mixup / --cutmix mix clips of different videos: --batch_size must hold 2 or more videos"),
        (args.test_clips < 1 or args.test_crops < 1, "--test_clips / --test_crops must be >= 1"),
        (args.save_every < 1, "--save_every must be >= 1")] if bad]
    if problems:
        p.error("; ".join(problems))
    if args.out is None and not args.bench:
        base = (f"out/random_{args.arch or 'tiny'}" if args.ckpt == "random"
                else os.path.dirname(os.path.abspath(args.ckpt)))
        args.out = os.path.join(base, f"finetune_{args.dataset}")
    return args

# ============ the fine-tuning model ============


class Classifier(nn.Module):
    """encoder (all tokens, no mask) -> mean over tokens -> LayerNorm (fc_norm) -> Linear: (B, 3, T, H, W) -> (B, C).

    As in the released fine-tuning model with mean pooling, the encoder's own final LayerNorm is dropped
    (Identity) and a fresh fc_norm follows the pooling, so a pretraining checkpoint's `norm.*` is unused.
    The head starts at trunc-normal(std 0.02; bounds +-2, so effectively normal, as timm's) x init_scale 0.001
    with a zero bias (released --init_scale):
    near-zero logits, so the first steps do not wreck the pretrained features with large gradients.
    """

    def __init__(self, encoder, num_classes, init_scale=0.001):
        super().__init__()
        self.encoder = encoder
        self.encoder.norm = nn.Identity()
        dim = encoder.embed_dim
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)
        nn.init.zeros_(self.head.bias)

    def forward(self, videos):
        x = self.encoder(videos)  # (B, N, D)
        return self.head(self.fc_norm(x.mean(dim=1)))  # (B, C)


def build_classifier(args, source, num_classes):
    """The weights of `source` (load_encoder's encoder of --ckpt, or the seeded random one) in an encoder with
    drop path, inside a Classifier. Returns (model, missing, unexpected): the key report of --ckpt's weights
    as loaded into that encoder (empty for 'random')."""
    model = Classifier(Encoder(source.cfg, drop_path=args.drop_path), num_classes)
    if args.ckpt == "random":
        model.encoder.load_state_dict(source.state_dict(), strict=False)  # its final norm is not used
        return model, [], []
    # Loaded from the file (not from `source`) for the exact report: the pretraining checkpoint's encoder
    # `norm.*` is unexpected here (dropped, see Classifier); decoder / phi / prototype keys are not looked at.
    missing, unexpected = load_weights(model.encoder, args.ckpt)
    if missing:  # load_encoder already refuses these; kept as the contract of this function
        raise ValueError(f"{args.ckpt} lacks encoder weights {missing[:6]}")
    return model, missing, unexpected

# ============ optimisation: layer-wise lr decay and weight decay groups ============


def layer_id(name, depth):
    """Layer of a parameter for the lr decay (released get_num_layer_for_vit): 0 = tube embedding (and
    positional / cls parameters, which our encoder does not have), i + 1 = block i, depth + 1 = the rest
    (fc_norm, head)."""
    if name.startswith("encoder.patch_embed") or name.split(".")[-1] in ("pos_embed", "cls_token"):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def finetune_param_groups(model, weight_decay, layer_decay):
    """AdamW groups, one per (layer, decay or not), each with lr_scale = layer_decay^(depth + 1 - layer).

    No weight decay on 1-D parameters (norms), biases, positional or cls parameters, as released (its skip
    list is the model's no_weight_decay(): pos_embed, cls_token). train.param_groups is pretraining's rule
    (mask token instead); this one also splits by layer.
    """
    depth = len(model.encoder.blocks)
    groups = {}
    for name, p in model.named_parameters():
        layer = layer_id(name, depth)
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in ("pos_embed", "cls_token")
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = dict(params=[], names=[], layer=layer, weight_decay=0.0 if no_decay else weight_decay,
                               lr_scale=layer_decay ** (depth + 1 - layer))
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]

# ============ augmentation: RandAugment per clip, MixUp / CutMix per batch (torchvision transforms v2) ============

FILL = [round(255 * m) for m in IMAGENET_MEAN]  # geometric ops fill with the mean colour, as timm's RandAugment


class RandAugmentClips(torch.utils.data.Dataset):
    """Training clips (data.py: multi-scale crop, optional flip) with RandAugment on top, one draw per clip.

    Items as the wrapped dataset: (clip (3, T, S, S), label) or, with repeats R, ((R, 3, T, S, S), (R,)),
    each of the R clips augmented on its own. The clip is uint8 (data.py; normalised on the device), its T
    frames form one batch for v2.RandAugment, which draws the ops and magnitude once per call,
    so every frame gets the same ones (a per-frame draw would make the clip flicker).
    Magnitude: timm's mstd, a per-clip N(magnitude, std) clipped to [0, 10], on torchvision's scale through
    101 bins (bin 10 m = m/10 of each op's range, the same fraction timm uses).
    """

    def __init__(self, clips, num_ops, magnitude, magnitude_std):
        self.clips, self.num_ops, self.magnitude, self.magnitude_std = clips, num_ops, magnitude, magnitude_std

    def __len__(self):
        return len(self.clips)

    @property
    def num_classes(self):
        return self.clips.num_classes

    def __getitem__(self, i):
        clip, label = self.clips[i]
        views = clip if clip.dim() == 5 else clip[None]  # (V, 3, T, S, S)
        out = torch.stack([self.augment(v) for v in views])
        return (out if clip.dim() == 5 else out[0]), label

    def augment(self, clip):
        """(3, T, S, S) uint8 -> the same, RandAugmented."""
        m = min(10.0, max(0.0, self.magnitude + self.magnitude_std * torch.randn(()).item()))
        op = v2.RandAugment(num_ops=self.num_ops, magnitude=round(10 * m), num_magnitude_bins=101, fill=FILL)
        frames = op(clip.transpose(0, 1))  # (T, 3, S, S) uint8: one draw for all T frames
        return frames.transpose(0, 1)  # (3, T, S, S) uint8, normalised on the device


def build_mixer(mixup, cutmix, num_classes):
    """MixUp and/or CutMix (v2), one of them per batch with probability 1/2 each (released switch_prob 0.5,
    mixup_prob 1); None when both alphas are 0."""
    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    return None if not ops else ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


def mix_batch(videos, labels, mixer, num_classes, smoothing):
    """videos (B, 3, T, H, W), labels (B,) -> (mixed videos, soft targets (B, C), each row summing to 1).

    v2's MixUp / CutMix pair clip b with clip b-1 (a roll of the batch) and return the mixed one-hot labels
    lam * onehot(y_b) + (1 - lam) * onehot(y_b-1), lam corrected to the pasted area for CutMix; CutMix cuts
    the same box out of every frame. Smoothing is applied afterwards, t * (1 - s) + s / C: since the mixed
    one-hot sums to 1 this equals timm's order (smooth each one-hot, then mix) exactly.
    """
    if mixer is None:
        soft = F.one_hot(labels, num_classes).float()
    else:
        mixed, soft = mixer(tv_tensors.Video(videos.transpose(1, 2)), labels)  # v2 wants videos (B, T, C, H, W)
        videos = mixed.as_subclass(torch.Tensor).transpose(1, 2)  # (B, 3, T, H, W)
    return videos, soft * (1 - smoothing) + smoothing / num_classes

# ============ multi-view test ============


@torch.no_grad()
def evaluate(model, dataset, batch_size, num_workers, device, autocast, rank=0, world=1, desc="test"):
    """Top-1 / top-5 of the softmax scores averaged over each video's views (clips x crops), on every rank's
    share of the test videos (rank r takes r, r + world, ...), gathered: dict(top1, top5, num_test)."""
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    views = max(1, getattr(dataset, "views", 1))
    loader = make_loader(shard, max(1, batch_size // views), num_workers, shuffle=False, drop_last=False,
                         distributed=False)
    scores, labels = [], []
    for clips, y in tqdm(loader, desc=desc, disable=None if rank == 0 else True, leave=False, dynamic_ncols=True):
        if clips.dim() == 5:
            clips, y = clips[:, None], y[:, None]  # one view: (B, 1, 3, T, S, S)
        B, V = clips.shape[:2]
        with autocast():
            logits = model(normalize(clips.flatten(0, 1).to(device, non_blocking=True)))  # (B*V, C)
        scores.append(logits.float().softmax(-1).view(B, V, -1).mean(1).cpu())  # (B, C)
        labels.append(y[:, 0])
    scores, labels = torch.cat(scores), torch.cat(labels).long()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (scores, labels))
        scores, labels = torch.cat([s for s, _ in parts]), torch.cat([y for _, y in parts])
    return dict(topk_accuracy(scores, labels), num_test=len(labels))

# ============ main ============


def main(argv=None):
    args = get_args(argv)
    if args.bench:
        return bench(args)
    rank, world, device = setup_distributed()
    try:
        return finetune(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def finetune(args, rank, world, device):
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    precision, autocast, _ = choose_precision(args, device)  # train.py's rule; no fp16 here, so no GradScaler

    # ============ data (a missing split or root fails here, before any training) ============
    # The probe's dataset builder (eval_linear.build_dataset): training clips get data.py's multi-scale crop
    # and, with --flip, a random mirror; RandAugment is added on top. Test clips: clips x crops views.
    torch.manual_seed(args.seed)  # the 'random' encoder's init, then the head's
    overrides = {k: v for k, v in (("num_frames", args.num_frames), ("img_size", args.img_size)) if v}
    source, cfg = load_encoder(args.ckpt, args.arch, **overrides)  # the architecture; a misfit fails here
    train_set = build_dataset(args, cfg, args.train_split, train=True, repeats=args.repeats)
    if args.randaug[0] > 0:
        train_set = RandAugmentClips(train_set, *args.randaug)
    test_set = build_dataset(args, cfg, args.test_split, clips=args.test_clips, crops=args.test_crops)
    num_classes = test_set.num_classes
    if train_set.num_classes != num_classes:
        raise ValueError(f"train split has {train_set.num_classes} classes, test split {num_classes}")
    loader = make_loader(train_set, args.batch_size // args.repeats, args.num_workers, shuffle=True,
                         drop_last=True, seed=args.seed)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training videos give no full step of --batch_size {args.batch_size} "
                         f"on {world} GPUs: lower --batch_size")
    total_batch = args.batch_size * world
    lr, min_lr = args.lr * total_batch / 256, args.min_lr * total_batch / 256  # linear scaling, as released
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch

    # ============ model, optimizer ============
    model, missing, unexpected = build_classifier(args, source, num_classes)
    model.to(device)
    groups = finetune_param_groups(model, args.weight_decay, args.layer_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr,
                                  betas=tuple(args.betas), fused=device.type == "cuda")
    mixer = build_mixer(args.mixup, args.cutmix, num_classes)
    config = {**vars(args), "world_size": world, "total_batch": total_batch, "lr_abs": lr, "min_lr_abs": min_lr,
              "steps_per_epoch": steps_per_epoch, "precision": precision, "num_classes": num_classes,
              "git": git_hash()}
    say("config: " + json.dumps(config, default=str))
    say(f"encoder: {describe_state_dict(model.encoder.state_dict())}, {cfg.num_frames}x{cfg.img_size}x{cfg.img_size} "
        f"clips, drop path {args.drop_path}; {sum(p.numel() for p in model.parameters()):,} parameters, all trained; "
        f"{len(train_set)} train / {len(test_set)} test videos, {num_classes} classes; {world} x {args.batch_size} "
        f"= {total_batch} clips/step, lr {lr:.2e}; {steps_per_epoch} steps/epoch; {device}, {precision}")
    if args.ckpt != "random":
        say(f"weights: {args.ckpt}; missing keys: {missing or 'none'}; unexpected keys: {unexpected or 'none'}")
    say("lr scale per layer: " + ", ".join(f"{g['layer']}: {g['lr_scale']:.3g}" for g in groups
                                           if not g["weight_decay"]))

    # ============ resume (the same command restarts from <out>/ckpt.pth) ============
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pth"), os.path.join(args.out, "log.jsonl")
    start_epoch, step = 0, 0
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        changed = {k: (ckpt["config"].get(k), config[k]) for k in RESUME_MUST_MATCH
                   if ckpt["config"].get(k) != config[k]}
        if changed:
            raise ValueError(f"{ckpt_path} was trained with other settings {changed} (saved, now): use another --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        say(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}")
    raw_model = model
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ============ training ============
    log = open(log_path, "a") if master else None
    end_epoch = min(args.epochs, start_epoch + args.max_epochs_this_run) if args.max_epochs_this_run else args.epochs
    t_train = time.perf_counter()
    for epoch in range(start_epoch, end_epoch):
        # Randomness (shuffle, crops, RandAugment, mixing, drop path) from (seed, epoch, rank) only: a run
        # resumed from an end-of-epoch checkpoint replays the uninterrupted one exactly.
        seed_everything(args.seed, epoch, rank)
        set_epoch(loader, epoch)
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=None if master else True,
                   leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        for i, (videos, labels) in enumerate(bar):
            t_data = time.perf_counter() - t0
            videos, labels = normalize(videos.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
            if videos.dim() == 6:  # repeated sampling: (B, R, 3, T, S, S) -> (B*R, ...)
                videos, labels = videos.flatten(0, 1), labels.flatten()
            videos, targets = mix_batch(videos, labels.long(), mixer, num_classes, args.smoothing)  # (B, C) soft
            rate = lr_at(step, total_steps, warmup_steps, lr, min_lr)
            for g in optimizer.param_groups:  # per-step cosine, scaled per layer
                g["lr"] = rate * g["lr_scale"]
            with autocast():
                logits = model(videos)  # (B, C)
            loss = F.cross_entropy(logits.float(), targets)  # soft-target cross-entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # No clipping in the released recipe; max_norm=inf only measures the norm for the log.
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), float("inf")).item()
            # Every rank sees the mean loss, so a non-finite one on any rank stops all of them together.
            loss_mean = loss.detach().double().reshape(1)
            if world > 1:
                dist.all_reduce(loss_mean)
                loss_mean /= world
            if not math.isfinite(loss_mean.item()):
                say(f"\nloss is {loss_mean.item()} at step {step} (epoch {epoch}); stopping. The last good checkpoint "
                    f"is {ckpt_path if os.path.exists(ckpt_path) else 'none'}. Try a lower --lr or --precision fp32.",
                    file=sys.stderr)
                return 1
            optimizer.step()
            step += 1
            dt = time.perf_counter() - t0
            last = dict(step=step, epoch=epoch + (i + 1) / steps_per_epoch, lr=rate, loss=round(loss_mean.item(), 5),
                        grad_norm=grad_norm, clips_per_s=total_batch / dt, data_wait=t_data / dt)
            if master:
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{rate:.1e}", data=f"{last['data_wait']:.0%}")
            t0 = time.perf_counter()
        say(f"epoch {epoch + 1}/{args.epochs}: loss {last['loss']:.4f}, lr {rate:.2e}, "
            f"{last['clips_per_s']:.1f} clips/s")
        if master and ((epoch + 1) % args.save_every == 0 or epoch + 1 == end_epoch):
            save_checkpoint(ckpt_path, dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                                            epoch=epoch + 1, step=step, config=config,
                                            model_config=dataclasses.asdict(cfg)))
        if world > 1:
            dist.barrier()  # nobody goes on (or exits) before the checkpoint exists
    if master:
        log.close()
    if end_epoch < args.epochs:
        say(f"stopped after epoch {end_epoch}/{args.epochs} (--max_epochs_this_run); rerun the same command to go on")
        return 0

    # ============ multi-view test, results JSON beside the checkpoint ============
    train_seconds = time.perf_counter() - t_train
    acc = evaluate(raw_model, test_set, args.batch_size, args.num_workers, device, autocast, rank, world)
    if master:
        results = dict(top1=acc["top1"], top5=acc["top5"], num_test=acc["num_test"], dataset=args.dataset,
                       test_split=args.test_split, test_views=f"{args.test_clips}x{args.test_crops}",
                       num_train=len(train_set), num_classes=num_classes, ckpt=args.ckpt, epochs=args.epochs,
                       missing_keys=missing, unexpected_keys=unexpected, train_seconds_this_run=train_seconds,
                       encoder=dataclasses.asdict(cfg), config=config)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"fine-tuned {args.dataset} ({args.test_split}, {len(train_set)} train / {acc['num_test']} test videos, "
              f"{num_classes} classes, {results['test_views']} views): top-1 {acc['top1']:.2f}  top-5 {acc['top5']:.2f}"
              f"  -> {os.path.join(args.out, 'results.json')}")
        return results
    return 0

# ============ --bench: FLOPs and memory of a training step, without data or a GPU ============


def bench(args, num_classes=400):
    """FLOPs per clip of forward + backward (torch.utils.flop_counter) and per-GPU memory: fp32 weights, grads
    and AdamW moments (16 bytes per parameter) + the tensors autograd saves for backward, counted on one clip
    under bf16 autocast and scaled to --batch_size. An estimate: allocator slack and workspaces not included."""
    overrides = {k: v for k, v in (("num_frames", args.num_frames), ("img_size", args.img_size)) if v}
    cfg = build_config(args.arch or "vit_b", target="pixel", loss="pixel", **overrides)  # the encoder's fields
    model = Classifier(Encoder(cfg, drop_path=args.drop_path), num_classes).train()
    videos = torch.randn(1, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    with FlopCounterMode(display=False) as counter:
        model(videos).sum().backward()
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(videos)
    params = sum(p.numel() for p in model.parameters())
    static, acts = 16 * params / 2 ** 30, args.batch_size * sum(saved.values()) / 2 ** 30
    print(f"{args.arch or 'vit_b'} {cfg.num_frames}x{cfg.img_size}x{cfg.img_size}, {cfg.num_tokens} tokens, "
          f"{params:,} parameters ({num_classes} classes):\n"
          f"  {counter.get_total_flops() / 1e9:.1f} GFLOP per training clip (forward + backward)\n"
          f"  estimated memory per GPU at --batch_size {args.batch_size}: {static + acts:.1f} GiB = {static:.1f} "
          f"weights+grads+AdamW + {acts:.1f} saved activations (bf16 autocast; +10-20% allocator slack)")
    return 0


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
