"""
Full fine-tuning (the paper's Tables 2, 3, 5-7): the pretrained encoder, every weight trained, with a
mean-pooling + LayerNorm + Linear head, stochastic depth, layer-wise lr decay, RandAugment, random-resized crops,
random erasing, MixUp / CutMix and label smoothing; multi-view testing at the end. The K400 and SSv2 presets are
the released fine-tuning scripts (scripts_finetune/finetune_kinetics.sh, finetune_ssv2.sh) value by value; see
docs/finetune.md for every setting, its released value and source file.

    python eval_finetune.py --ckpt out/synthetic_tiny_mlp_sigma/ckpt.pth --dataset synthetic   # laptop, minutes
    python eval_finetune.py --ckpt random --arch tiny --dataset synthetic                      # the baseline row
    python eval_finetune.py --ckpt out/fashion_tiny_mlp_sigma/ckpt.pth --dataset fashion      # train.py's default set
    torchrun --nproc_per_node=8 eval_finetune.py --ckpt out/k400_vit_b_mlp_sigma/ckpt.pth \\
        --dataset k400 --data_root /data/k400                                          # Table 3 (K400)
    torchrun --nproc_per_node=8 eval_finetune.py --ckpt sigma_vitb_k400_mlp.pth --arch vit_b \\
        --dataset ssv2 --data_root /data/ssv2                                          # Table 2 (SSv2)
    python eval_finetune.py --bench --arch vit_b --dataset k400     # FLOPs per clip, memory per GPU (estimate)

Why not a mode of eval_linear.py: the probe trains a head on cached features of a frozen encoder (seconds);
this is a training run with its own recipe (per-layer learning rates, drop path, augmentation that must be
re-drawn every epoch, so nothing can be cached), checkpoints and exact resume like train.py. It imports the
release's augmentation on clips (augment.py), the probe's dataset building and top-k code, train.py's seeding, lr
schedule and checkpointing, the step log (monitor.py), --bench's cost tools (bench.py) and the command line every
script shares (cli.py). Batch sizes mean what they mean in train.py (the defaults block below).

Outputs go to --out (default <ckpt folder>/finetune_<dataset>/): ckpt.pth (atomic, every --save_every epochs;
rerun the same command to resume it exactly), log.jsonl (one line per step) and results.json (top-1 / top-5
of the multi-view test, the resolved config, the missing / unexpected keys of the loaded weights).
"""
import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import ranks
from augment import AugmentedClips, ClipErasing, ClipTransform, build_mixer, erase_clips, mix_batch
from bench import finetune_bench
from data import make_loader, normalize, set_epoch
from data import DEFAULT_STRIDE
from cli import (HelpFormatter, UsageError, add_device_option, below_minimum, invalid_options, open_encoder,
                 preset_values, resolve_device, run_cli, setup_distributed, show)
from eval_linear import BUILT_IN, SAMPLING, VIDEO_DATASETS, build_dataset, per_dataset, topk_accuracy
from monitor import StepLog
from model import PRESETS, Encoder, build_config, describe_state_dict, load_checkpoint, load_weights
from train import CheckpointWriter, choose_precision, git_hash, lr_at, relative_samples, seed_everything

# ============ defaults: the released fine-tuning recipe ============
# One block: COMMON for every dataset, then per-dataset changes; every value can be overridden on the command
# line (an option left at None takes it from here). "released" = the default of the released
# run_class_finetuning.py that both published scripts keep; "scripts" = a value both scripts set. As in train.py,
# batch_size is the total clips per optimizer step over all GPUs, micro_batch the clips per GPU per forward, and
# gradient accumulation makes up the difference (the release's --update_freq): the scripts run 8 GPUs x 4 clips x
# update_freq 1 = 32 clips per step, which these defaults keep on any number of GPUs. The lr follows the total,
# lr_abs = lr x batch_size / 256 (also min_lr): 1e-3 x 32 / 256 = 1.25e-4, as released.
COMMON = dict(
    lr=1e-3,             # per 256 clips (scripts); AdamW, eps 1e-8
    min_lr=1e-6,         # end of the cosine, per 256 clips (released)
    warmup_epochs=5,     # linear from 0, then per-step cosine (released; the SSv2 script's --warmup_lr is unused)
    weight_decay=0.05,   # constant; not on norms, biases, positional / cls parameters (scripts)
    betas=(0.9, 0.999),  # (scripts)
    layer_decay=0.75,    # block i's lr is x 0.75^(depth - i); the tube embedding x 0.75^(depth + 1) (released)
    drop_path=0.1,       # stochastic depth of the last block, rising linearly from 0 at the first (released)
    mixup=0.8,           # MixUp Beta(alpha, alpha); 0 = off (released)
    cutmix=1.0,          # CutMix Beta(alpha, alpha); 0 = off. Each batch gets one of the two, 50 / 50 (released)
    smoothing=0.1,       # label smoothing on the (mixed) targets (released)
    randaug=(4, 7.0, 0.5),        # RandAugment ops, magnitude, magnitude std: 'rand-m7-n4-mstd0.5-inc1' (released)
    crop_scale=(0.25, 1.0),       # random-resized crop: area fraction (released --finetuning_crops, always on)
    crop_ratio=(0.75, 1.3333),    # and aspect ratio w / h (released kinetics.py / ssv2.py)
    reprob=0.25,         # random erasing: probability per clip, one box, per-pixel N(0, 1) values (released)
    flip=True,           # random horizontal flip of training clips (not SSV2, kinetics.py / ssv2.py)
    batch_size=32,       # clips per optimizer step, all GPUs (scripts: 8 GPUs x 4, update_freq 1)
    micro_batch=4,       # clips per GPU per forward (scripts: --batch_size 4)
    repeats=1,           # augmented clips per decoded video (scripts: --num_sample 1)
    epochs=100,          # for datasets without a released script (ours)
    test_clips=5, test_crops=3,  # multi-view test: temporal clips x spatial crops per video, scores averaged
    workers=min(8, os.cpu_count() or 1),
    save_every=1,
)
# Laptop scale: the built-in videos (64x64, square, so one crop), tiny encoder, 5 short epochs, one process.
# A 10x higher base lr than the release's, because 16 clips per step make lr_abs tiny (1e-2 x 16/256).
BUILT_IN_RECIPE = dict(epochs=5, warmup_epochs=1, lr=1e-2, batch_size=16, micro_batch=16, test_clips=2, test_crops=1,
                       workers=2)
RECIPES = {
    "k400": dict(epochs=100, test_clips=7),              # scripts_finetune/finetune_kinetics.sh
    # SSv2's labels name directions ("pushing something from left to right"): no flip.
    "ssv2": dict(epochs=40, flip=False, test_clips=2),   # scripts_finetune/finetune_ssv2.sh
    # ours (no released script): 16 clips per GPU on 8 GPUs
    "ucf101": dict(batch_size=128, micro_batch=16), "hmdb51": dict(batch_size=128, micro_batch=16),
    "synthetic": BUILT_IN_RECIPE, "fashion": BUILT_IN_RECIPE,
}
# --recipe paper: where the paper's text (its Table 10, the VideoMAE recipe) states other values than the
# released scripts ran, these replace them (applied after RECIPES; explicit options still win).
PAPER = {"all": dict(randaug=(2, 9.0, 0.5)), "k400": dict(epochs=75, test_clips=5), "ssv2": dict(epochs=50)}
# A run folder is tied to these: resuming with others would mix two runs (micro_batch: MixUp / CutMix pair the
# clips of one forward, so another split of the step draws other pairs).
RESUME_MUST_MATCH = ("ckpt", "arch", "dataset", "data_root", "batch_size", "micro_batch", "epochs", "seed",
                     "world_size", "repeats")


def get_args(argv=None):
    """Parse, fill the recipe's values, check every option (a bad one stops here, before any file is read)."""
    p = build_parser()
    args = p.parse_args(argv)
    resolve_recipe(args)
    problems = check_options(args)
    if problems:
        p.error(invalid_options(problems))  # usage + the messages on stderr, exit status 2, no traceback
    if args.out is None and not args.bench:
        base = (f"out/random_{args.arch or 'tiny'}" if args.ckpt == "random"
                else os.path.dirname(os.path.abspath(args.ckpt)))
        args.out = os.path.join(base, f"finetune_{args.dataset}")
    return args


def recipe_default(key, show=show):
    """The help's 'default: ...' of a recipe value: each dataset's (--recipe release), and where --recipe paper
    changes it, its values."""
    text = "default: " + per_dataset({d: show(recipe(d)[key]) for d in VIDEO_DATASETS}, VIDEO_DATASETS)
    paper = {d: show(recipe(d, "paper")[key]) for d in VIDEO_DATASETS if recipe(d, "paper")[key] != recipe(d)[key]}
    return text + (f"; --recipe paper: {per_dataset(paper, paper)}" if paper else "")


def build_parser():
    p = argparse.ArgumentParser(description="Full fine-tuning of a SIGMA / VideoMAE encoder, as released.",
                                formatter_class=HelpFormatter)
    a = p.add_argument
    # what to fine-tune
    a("--ckpt", default=None, help="our checkpoint (carries its architecture), a released SIGMA / VideoMAE "
      "checkpoint (pass --arch), or 'random' (randomly initialised --arch: the baseline row); required, except "
      "with --bench (no default)")
    a("--arch", default=None, help=f"{' | '.join(PRESETS)}; default: our checkpoints' own, tiny for 'random' "
      "(vit_b with --bench); released checkpoints need it")
    a("--num_frames", type=int, default=None, help="clip length; default: our checkpoints' own, else the --arch "
      f"preset's: {preset_values('num_frames')}")
    a("--img_size", type=int, default=None, help="input side; default: our checkpoints' own, else the --arch "
      f"preset's: {preset_values('img_size')}")
    # data
    a("--dataset", required=True, choices=VIDEO_DATASETS, help="fashion (moving Fashion-MNIST) and synthetic: "
      "the built-in sets train.py pretrains on, generated on first use; the others: data.py LAYOUTS")
    a("--recipe", default="release", choices=["release", "paper"], help="'release': the released scripts' "
      "values; 'paper': the paper's Table 10 where it differs (RandAugment 2 9 0.5, K400 75 epochs 5x3 views, "
      "SSv2 50 epochs)")
    a("--data_root", default=None, help="dataset folder (data.py LAYOUTS); default for fashion / synthetic: the "
      "generated set (synthetic.fashion_dataset() / synthetic_dataset(), cached); required for the others")
    a("--train_split", default="train", help="split to fine-tune on")
    a("--test_split", default="val", help="split to test on; 'val' is the official test list for ucf101 / hmdb51")
    a("--fold", type=int, default=1, help="UCF101 / HMDB51 split (1-3)")
    a("--stride", type=int, default=None, help="frames between sampled frames with --sampling stride; default: "
      f"data.py's per dataset: {per_dataset(DEFAULT_STRIDE, VIDEO_DATASETS)}")
    a("--sampling", default=None, choices=["stride", "segments"], help="clip frames: 'segments' = one per equal "
      "segment of the whole video (the released SSv2 loader), 'stride' = frames --stride apart; default: segments "
      "for ssv2, stride for the others")
    a("--repeats", type=int, default=None, help="clips per decoded training video, each augmented on its own (the "
      f"release's --num_sample); --batch_size and --micro_batch count clips; {recipe_default('repeats')}")
    # augmentation (docs/finetune.md: what each does in the release)
    a("--randaug", type=float, nargs=3, default=None, metavar=("OPS", "MAG", "MSTD"),
      help=f"RandAugment ops per clip, magnitude 0-10, magnitude std; 0 0 0 = off; {recipe_default('randaug')}")
    a("--crop_scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="random-resized crop area "
      f"fraction (0.08 1 without the release's --finetuning_crops); {recipe_default('crop_scale')}")
    a("--crop_ratio", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
      help=f"crop aspect ratio w / h; {recipe_default('crop_ratio')}")
    a("--reprob", type=float, default=None, help=f"random erasing probability per clip; 0 = off; "
      f"{recipe_default('reprob')}")
    a("--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flip of training "
      f"clips; {recipe_default('flip', lambda v: 'on' if v else 'off')}")
    a("--mixup", type=float, default=None, help=f"MixUp Beta alpha; 0 = off; {recipe_default('mixup')}")
    a("--cutmix", type=float, default=None, help="CutMix Beta alpha; 0 = off (with both on, each batch gets one of "
      f"the two); {recipe_default('cutmix')}")
    a("--smoothing", type=float, default=None, help=f"label smoothing; {recipe_default('smoothing')}")
    a("--test_clips", type=int, default=None, help="temporal clips per test video, scores averaged; "
      f"{recipe_default('test_clips')}")
    a("--test_crops", type=int, default=None, help=f"spatial crops per test clip; {recipe_default('test_crops')}")
    # optimisation
    a("--epochs", type=int, default=None, help=recipe_default("epochs"))
    a("--warmup_epochs", type=int, default=None, help=f"linear warmup from 0, then per-step cosine; "
      f"{recipe_default('warmup_epochs')}")
    a("--batch_size", type=int, default=None, help="total clips per optimizer step, over all GPUs and accumulation "
      "(as train.py; the release's GPUs x --batch_size x --update_freq); a multiple of GPUs x --micro_batch. "
      f"{recipe_default('batch_size')}: on any number of GPUs the released 32 = 8 GPUs x 4 clips")
    a("--micro_batch", type=int, default=None, help="clips per GPU per forward (the release's --batch_size); "
      f"gradient accumulation fills the rest of --batch_size. {recipe_default('micro_batch')}, lowered to divide "
      "--batch_size / GPUs. Also the test's clips per GPU per forward")
    a("--lr", type=float, default=None, help="base lr per 256 clips: lr_abs = lr x batch_size / 256; "
      f"{recipe_default('lr')}")
    a("--min_lr", type=float, default=None, help=f"final lr per 256 clips; {recipe_default('min_lr')}")
    a("--weight_decay", type=float, default=None, help="AdamW weight decay (not on norms, biases, positional "
      f"parameters); {recipe_default('weight_decay')}")
    a("--layer_decay", type=float, default=None, help="layer-wise lr decay; 1 = the same lr everywhere; "
      f"{recipe_default('layer_decay')}")
    a("--drop_path", type=float, default=None, help="stochastic depth rate of the last block; "
      f"{recipe_default('drop_path')}")
    a("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"), help=f"AdamW betas; "
      f"{recipe_default('betas')}")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="auto: bf16 autocast on GPUs with native bf16, fp16 + loss scaling on older ones (V100, T4), fp32 on CPU")
    add_device_option(p, "--precision sets the arithmetic")
    # bookkeeping
    a("--out", default=None, help="run folder; default: <ckpt folder>/finetune_<dataset>, out/random_<arch>/"
      "finetune_<dataset> for 'random'")
    a("--workers", type=int, default=None, help=f"DataLoader workers (decoding processes) per GPU; default: "
      f"{BUILT_IN_RECIPE['workers']} for {' / '.join(BUILT_IN)}, else min(8, CPU cores) = {COMMON['workers']} here")
    a("--save_every", type=int, default=None, help="epochs between checkpoints (always one at the end); "
      f"{recipe_default('save_every')}")
    a("--max_epochs_this_run", type=int, default=0, help="stop after this many epochs (checkpointed); rerun to go "
      "on; 0 = all")
    a("--log_every", type=int, default=10, help="steps between reads of the loss from the GPU (each read waits for "
      "the GPU to finish; a non-finite loss is found at the next read, always before a checkpoint)")
    a("--seed", type=int, default=0, help="random init of 'random' and of the head, data order, augmentation")
    a("--bench", action="store_true", help="print FLOPs per clip and the estimated memory per GPU of a training "
      "step of --arch at --micro_batch, then exit (no data needed)")
    return p


def recipe(dataset, which="release"):
    """The preset of `dataset`: COMMON, its RECIPES entry, and with which='paper' the PAPER values."""
    values = {**COMMON, **RECIPES.get(dataset, {})}
    if which == "paper":
        values.update({**PAPER["all"], **PAPER.get(dataset, {})})
    return values


def resolve_recipe(args):
    """Fill every option left at None from the preset (in place). A --micro_batch left at None is the recipe's,
    lowered to the largest value that divides --batch_size / GPUs (torchrun's WORLD_SIZE)."""
    micro_given = args.micro_batch is not None
    for k, v in recipe(args.dataset, args.recipe).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.randaug, args.betas = tuple(args.randaug), tuple(args.betas)
    args.crop_scale, args.crop_ratio = tuple(args.crop_scale), tuple(args.crop_ratio)
    args.sampling = args.sampling or SAMPLING.get(args.dataset, "stride")  # as eval_linear.py (data.py samplings)
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not micro_given:
        per_gpu = args.batch_size // args.world_size
        args.micro_batch = next((m for m in range(min(args.micro_batch, per_gpu), 0, -1)
                                 if per_gpu % m == 0 and m % max(args.repeats, 1) == 0), args.micro_batch)


def check_options(args):
    """Every problem with the options, each naming the option and a valid value ([] = all good)."""
    ops, magnitude, std = args.randaug
    world, micro = args.world_size, args.micro_batch
    repeats = max(args.repeats, 1)
    fits = [m for m in range(max(micro, 1), 0, -1) if args.batch_size % (world * m) == 0 and m % repeats == 0]
    checks = [
        (args.ckpt is not None or args.bench, "--ckpt is required: a checkpoint file or 'random'"),
        (args.ckpt in (None, "random") or os.path.isfile(args.ckpt),
         f"--ckpt {args.ckpt!r} does not exist (or pass 'random')"),
        (args.arch is None or args.arch in PRESETS, f"--arch {args.arch}: choose one of {', '.join(PRESETS)}"),
        (args.bench or args.data_root is not None or args.dataset in BUILT_IN, f"--data_root is required for "
         f"--dataset {args.dataset}: the folder holding its layout (data.py LAYOUTS), e.g. --data_root "
         f"data/{args.dataset}"),
        (args.lr > 0, f"--lr {args.lr} must be > 0, e.g. 1e-3"),
        (args.lr <= 0 or 0 <= args.min_lr <= args.lr, f"--min_lr {args.min_lr} must be in [0, --lr], e.g. 1e-6"),
        (args.weight_decay >= 0, f"--weight_decay {args.weight_decay} must be >= 0, e.g. 0.05"),
        (all(0 <= b < 1 for b in args.betas), f"--betas {args.betas}: each in [0, 1), e.g. 0.9 0.999"),
        (0 <= args.drop_path < 1, f"--drop_path {args.drop_path} must be in [0, 1), e.g. 0.1"),
        (0 < args.layer_decay <= 1, f"--layer_decay {args.layer_decay} must be in (0, 1], e.g. 0.75"),
        (0 <= args.smoothing < 1, f"--smoothing {args.smoothing} must be in [0, 1), e.g. 0.1"),
        (args.mixup >= 0 and args.cutmix >= 0, "--mixup / --cutmix are Beta alphas: >= 0 (0 = off), e.g. 0.8 / 1.0"),
        (ops >= 0 and ops == int(ops) and 0 <= magnitude <= 10 and std >= 0,
         f"--randaug {ops:g} {magnitude:g} {std:g}: ops a whole number >= 0, magnitude in [0, 10], std >= 0, "
         f"e.g. 4 7 0.5"),
        (0 < args.crop_scale[0] <= args.crop_scale[1] <= 1, f"--crop_scale {args.crop_scale}: 0 < min <= max <= 1, "
         f"e.g. 0.25 1"),
        (0 < args.crop_ratio[0] <= args.crop_ratio[1],
         f"--crop_ratio {args.crop_ratio}: 0 < min <= max, e.g. 0.75 1.3333"),
        (0 <= args.reprob <= 1, f"--reprob {args.reprob} must be in [0, 1], e.g. 0.25"),
        (args.epochs < 1 or 0 <= args.warmup_epochs < args.epochs, f"--warmup_epochs {args.warmup_epochs} must be "
         f"in [0, --epochs {args.epochs}), e.g. 5"),
        (micro >= 1 and micro % repeats == 0,
         f"--micro_batch {micro} must be a positive multiple of --repeats {args.repeats}, e.g. 4"),
        (args.batch_size < 1 or micro < 1 or args.batch_size % (world * micro) == 0,
         f"--batch_size {args.batch_size} is not a multiple of {world} GPU(s) x --micro_batch {micro}, "
         + (f"e.g. --micro_batch {fits[0]}" if fits else f"nor of {world} GPU(s) x --repeats {args.repeats}, "
            f"e.g. --batch_size {world * repeats * 2}")),
        (args.mixup == args.cutmix == 0 or micro // repeats >= 2,
         "--mixup / --cutmix mix clips of different videos in one forward: --micro_batch must hold 2 or more "
         "videos, e.g. 4"),
        (args.fold in (1, 2, 3), f"--fold {args.fold} must be 1, 2 or 3")]
    problems = [message for ok, message in checks if not ok] + below_minimum(args, [
        ("epochs", 1, 100), ("repeats", 1, 1), ("batch_size", 1, 32), ("test_clips", 1, 5), ("test_crops", 1, 3),
        ("stride", 1, 4), ("num_frames", 1, 16), ("img_size", 1, 224), ("workers", 0, 8), ("save_every", 1, 1),
        ("log_every", 1, 10), ("max_epochs_this_run", 0, 0), ("seed", 0, 0)])
    try:
        args.device = str(resolve_device(args.device))  # a name: the config stores it
    except UsageError as err:
        problems.append(str(err))
    return problems

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
    scores, labels = [], []  # per batch: (B, C) scores averaged over the views, (B,) labels
    for clips, y in tqdm(loader, desc=desc, disable=None if rank == 0 else True, leave=False, dynamic_ncols=True):
        if clips.dim() == 5:
            clips, y = clips[:, None], y[:, None]  # one view: (B, 1, 3, T, S, S)
        B, V = clips.shape[:2]
        with autocast():
            logits = model(normalize(clips.flatten(0, 1).to(device, non_blocking=True)))  # (B*V, C)
        scores.append(logits.float().softmax(-1).view(B, V, -1).mean(1).cpu())  # (B, C)
        labels.append(y[:, 0])
    if world > 1:
        # The lists of batches travel, not one tensor per rank: with fewer test videos than ranks a rank has no
        # batch at all (nothing to concatenate), and its empty list adds nothing to the others'.
        parts = [None] * world
        dist.all_gather_object(parts, (scores, labels))
        scores, labels = [s for part, _ in parts for s in part], [y for _, part in parts for y in part]
    scores, labels = torch.cat(scores), torch.cat(labels).long()  # (N, C), (N,)
    return dict(topk_accuracy(scores, labels), num_test=len(labels))

# ============ the run: data, model and optimizer, resume, training, test ============


def main(argv=None):
    args = get_args(argv)
    if args.bench:
        return bench(args)
    rank, world, device = setup_distributed(args.device)
    try:
        return finetune(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def finetune(args, rank, world, device):
    """The whole run -> the results dict (rank 0, after the test), 0 (other ranks, or stopped early by
    --max_epochs_this_run) or 1 (a non-finite loss)."""
    say = print if rank == 0 else (lambda *a, **k: None)
    precision, autocast, scaler = choose_precision(args, device)  # train.py's rule (fp16 comes with loss scaling)
    torch.manual_seed(args.seed)  # the 'random' encoder's init, then the head's
    data = build_data(args, world)
    run = build_run(args, data, world, device, precision)
    run.scaler = scaler
    report(args, data, run, say)
    start_epoch, step = resume(args, run, say)
    if world > 1:
        run.model = DDP(run.raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    end_epoch = min(args.epochs, start_epoch + args.max_epochs_this_run) if args.max_epochs_this_run else args.epochs
    # Rank 0 writes checkpoints in the background (train.py's CheckpointWriter): no rank waits for the disk. An
    # epoch's checkpoint is written only after its steps were read and found finite (StepLog.flush).
    writer, t_train = CheckpointWriter(), time.perf_counter()
    with open(run.log_path, "a") if rank == 0 else open(os.devnull, "w") as log:
        for epoch in range(start_epoch, end_epoch):
            steps = StepLog(log, world, run.total_batch)
            step = train_epoch(args, data, run, epoch, step, rank, device, autocast, steps, say)
            if step is None:  # on every rank at the same step: each read the loss averaged over ranks
                writer.wait()  # the last good checkpoint, complete on disk
                last_good = run.ckpt_path if os.path.exists(run.ckpt_path) else "none"
                say(f"\nloss is {steps.last['loss']} at step {steps.last['step']} (epoch {epoch}); stopping. The last "
                    f"good checkpoint is {last_good}. Try a lower --lr or --precision fp32.", file=sys.stderr)
                return 1
            if rank == 0 and ((epoch + 1) % args.save_every == 0 or epoch + 1 == end_epoch):
                writer.save(run.ckpt_path, dict(model=run.raw_model.state_dict(), optimizer=run.optimizer.state_dict(),
                                                scaler=run.scaler.state_dict(), epoch=epoch + 1, step=step,
                                                config=run.config, model_config=dataclasses.asdict(data.cfg)))
    # Nobody goes on to the test (or exits) before the last checkpoint is on disk, and a failed write stops every
    # rank with its message (ranks.together: one exchange, which is also the barrier).
    with ranks.together(f"writing the checkpoint {run.ckpt_path}"):
        writer.wait()
    if end_epoch < args.epochs:
        say(f"stopped after epoch {end_epoch}/{args.epochs} (--max_epochs_this_run); rerun the same command to go on")
        return 0
    acc = evaluate(run.raw_model, data.test_set, args.micro_batch, args.workers, device, autocast, rank, world)
    return write_results(args, data, run, acc, time.perf_counter() - t_train) if rank == 0 else 0


def build_data(args, world):
    """The encoder to start from and both splits (a missing split or root fails here, before any training).

    Training clips: the release's augmentation (ClipTransform) on the frames data.py decodes; test clips:
    data.py's clips x crops views (short-side squares, resized), as the release's test loader."""
    overrides = {k: v for k, v in (("num_frames", args.num_frames), ("img_size", args.img_size)) if v}
    source, cfg = open_encoder(args.ckpt, args.arch, **overrides)  # the architecture; a misfit: UsageError
    parsed = build_dataset(args, cfg, args.train_split, train=True, repeats=args.repeats)
    test_set = build_dataset(args, cfg, args.test_split, clips=args.test_clips, crops=args.test_crops)
    # Each rank lists the videos of its own file system (a node-local copy of the dataset): the samplers' indices
    # mean the same clips on every rank, and every rank runs the same number of steps and test batches, only if
    # the lists are identical. Compared as train.py does: relative to the dataset folder, labels included.
    if world > 1:
        for split, clips in (("train", parsed), ("test", test_set)):
            ranks.agree(f"the {split} videos", f"{len(clips.samples):,} videos", relative_samples(clips.samples),
                        fix="Give every node the same dataset (the same files under --data_root).")
    train_set = AugmentedClips(parsed, ClipTransform(cfg.img_size, args.randaug, args.crop_scale, args.crop_ratio,
                                                     args.flip))
    if train_set.num_classes != test_set.num_classes:
        raise UsageError(f"--train_split {args.train_split} has {train_set.num_classes} classes, --test_split "
                         f"{args.test_split} {test_set.num_classes}: both splits must list the same classes")
    # Micro-batches: --micro_batch clips (--micro_batch / --repeats videos) per GPU and forward.
    loader = make_loader(train_set, args.micro_batch // args.repeats, args.workers, shuffle=True,
                         drop_last=True, seed=args.seed)
    if len(loader) < args.batch_size // (world * args.micro_batch):
        raise UsageError(f"{len(train_set)} training videos give no full step of --batch_size {args.batch_size} "
                         f"on {world} GPU(s): lower --batch_size")
    return SimpleNamespace(source=source, cfg=cfg, train_set=train_set, test_set=test_set, loader=loader,
                           num_classes=test_set.num_classes)


def build_run(args, data, world, device, precision):
    """Model, optimizer, augmentation on the batch, lr schedule and the resolved config."""
    model, missing, unexpected = build_classifier(args, data.source, data.num_classes)
    model.to(device)
    groups = finetune_param_groups(model, args.weight_decay, args.layer_decay)
    # batch_size = world x micro_batch x accum (checked at start): a step takes accum micro-batches per GPU, and the
    # last micro-batches of an epoch that make no full step are left out (every rank runs the same steps).
    total_batch, accum = args.batch_size, args.batch_size // (world * args.micro_batch)
    steps_per_epoch = len(data.loader) // accum
    lr, min_lr = args.lr * total_batch / 256, args.min_lr * total_batch / 256  # linear scaling, as released
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr,
                                  betas=args.betas, fused=device.type == "cuda")
    config = {**vars(args), "world_size": world, "accum": accum, "total_batch": total_batch, "lr_abs": lr,
              "min_lr_abs": min_lr,
              "steps_per_epoch": steps_per_epoch, "precision": precision, "num_classes": data.num_classes,
              "git": git_hash()}
    return SimpleNamespace(
        model=model, raw_model=model, groups=groups, optimizer=optimizer, missing=missing, unexpected=unexpected,
        mixer=build_mixer(args.mixup, args.cutmix, data.num_classes),
        eraser=ClipErasing(args.reprob) if args.reprob > 0 else None,
        lr=lr, min_lr=min_lr, total_batch=total_batch, accum=accum, steps_per_epoch=steps_per_epoch,
        total_steps=args.epochs * steps_per_epoch, warmup_steps=args.warmup_epochs * steps_per_epoch,
        config=config, ckpt_path=os.path.join(args.out, "ckpt.pth"), log_path=os.path.join(args.out, "log.jsonl"))


def report(args, data, run, say):
    """The resolved config and what will be trained, on rank 0."""
    cfg, world = data.cfg, run.config["world_size"]
    say("config: " + json.dumps(run.config, default=str))
    say(f"encoder: {describe_state_dict(run.model.encoder.state_dict())}, {cfg.num_frames}x{cfg.img_size}x"
        f"{cfg.img_size} clips, drop path {args.drop_path}; {sum(p.numel() for p in run.model.parameters()):,} "
        f"parameters, all trained; {len(data.train_set)} train / {len(data.test_set)} test videos, "
        f"{data.num_classes} classes; {world} GPU(s) x {args.micro_batch} clips x {run.accum} accumulation = "
        f"{run.total_batch} clips/step, lr {run.lr:.2e}; "
        f"{run.steps_per_epoch} steps/epoch; {run.config['precision']}")
    if args.ckpt != "random":
        say(f"weights: {args.ckpt}; missing keys: {run.missing or 'none'}; unexpected keys: {run.unexpected or 'none'}")
    say("lr scale per layer: " + ", ".join(f"{g['layer']}: {g['lr_scale']:.3g}" for g in run.groups
                                           if not g["weight_decay"]))


def resume(args, run, say):
    """(start_epoch, step): 0, 0 for a new run folder; else the state of <out>/ckpt.pth, loaded into the model
    and optimizer, refused if it was trained with other RESUME_MUST_MATCH settings.

    Every rank reads <out>/ckpt.pth itself, and only rank 0 writes it: on a node-local disk the other nodes find
    none (or an old one) and would train from another epoch with another optimizer state until the ranks' steps
    no longer pair up and they wait for each other forever. So the ranks first compare what they found, and a
    refusal or a disagreement on any rank stops all of them before any state is loaded.
    """
    os.makedirs(args.out, exist_ok=True)
    ckpt = None
    with ranks.together(f"reading {run.ckpt_path}"):
        if os.path.exists(run.ckpt_path):
            ckpt = load_checkpoint(run.ckpt_path)
            changed = {k: (ckpt["config"].get(k), run.config[k]) for k in RESUME_MUST_MATCH
                       if ckpt["config"].get(k) != run.config[k]}
            if changed:
                raise UsageError(f"{run.ckpt_path} was trained with other settings {changed} (saved, now): use "
                                 f"another --out")
    found = (ckpt["epoch"], ckpt["step"]) if ckpt else (0, 0)  # a checkpoint holds at least one epoch
    ranks.agree("the checkpoint to resume from",
                f"epoch {found[0]}, step {found[1]} in {run.ckpt_path}" if ckpt else f"no {run.ckpt_path}", found,
                fix="Put --out on storage that every node sees (the cluster's shared file system, not a node-local "
                    "disk): only rank 0 writes checkpoints.")
    if ckpt is None:
        return found
    run.raw_model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):  # empty unless saved by an fp16 run
        run.scaler.load_state_dict(ckpt["scaler"])
    say(f"resumed from {run.ckpt_path}: epoch {ckpt['epoch']}, step {ckpt['step']}")
    return ckpt["epoch"], ckpt["step"]


def train_epoch(args, data, run, epoch, step, rank, device, autocast, steps, say):
    """One epoch of steps, logged by `steps` (a StepLog) -> the step count after it, or None if the loss stopped
    being finite (steps.last is then the first such step)."""
    # Randomness (shuffle, augmentation, erasing, mixing, drop path) from (seed, epoch, rank) only: a run
    # resumed from an end-of-epoch checkpoint replays the uninterrupted one exactly.
    seed_everything(args.seed, epoch, rank)
    set_epoch(data.loader, epoch)
    run.model.train()
    bar = tqdm(accumulation_groups(data.loader, run.accum, run.steps_per_epoch), total=run.steps_per_epoch,
               desc=f"epoch {epoch + 1}/{args.epochs}", disable=None if rank == 0 else True, leave=False,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    for i, group in enumerate(bar):
        t_data = time.perf_counter() - t0
        micro_batches = (prepare_batch(videos, labels, run, data.num_classes, args.smoothing, device)
                         for videos, labels in group)  # prepared one at a time, as train_step reaches it
        rate = lr_at(step, run.total_steps, run.warmup_steps, run.lr, run.min_lr)
        loss, grad_norm = train_step(run, micro_batches, rate, autocast)  # 0-d device tensors
        step += 1
        # No .item() per step: a read makes the host wait until the GPU has finished this step, so the next one
        # could not be queued behind it. The values are read every --log_every steps.
        steps.record(step, epoch + (i + 1) / run.steps_per_epoch, rate, loss, grad_norm, t_data)
        if step % args.log_every == 0:
            if not steps.flush():
                return None
            bar.set_postfix(loss=f"{steps.last['loss']:.3f}", lr=f"{rate:.1e}", data=f"{steps.last['data_wait']:.0%}")
        t0 = time.perf_counter()
    if not steps.flush():  # the epoch's last steps, always read: a checkpoint may follow
        return None
    say(f"epoch {epoch + 1}/{args.epochs}: loss {steps.last['loss']:.4f}, lr {rate:.2e}, "
        f"{steps.last['clips_per_s']:.1f} clips/s")
    return step


def accumulation_groups(loader, accum, steps):
    """The loader's micro-batches, `accum` per optimizer step, for `steps` steps (micro-batches past the epoch's last
    full step are not drawn)."""
    batches = iter(loader)
    for _ in range(steps):
        yield [next(batches) for _ in range(accum)]


def prepare_batch(videos, labels, run, num_classes, smoothing, device):
    """One micro-batch from the loader -> (normalised, erased, mixed clips (B, 3, T, S, S), soft targets (B, C)) on
    the device. MixUp / CutMix pair clips within the micro-batch, as the release does with --update_freq."""
    # uint8 clips travel to the device (a quarter of float32's bytes) and are normalised there.
    videos, labels = normalize(videos.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
    if videos.dim() == 6:  # repeated sampling: (B, R, 3, T, S, S) -> (B*R, ...)
        videos, labels = videos.flatten(0, 1), labels.flatten()
    videos = erase_clips(videos, run.eraser)  # (B, 3, T, S, S), after normalisation as released
    return mix_batch(videos, labels.long(), run.mixer, num_classes, smoothing)  # (B, 3, T, S, S), (B, C)


def train_step(run, micro_batches, rate, autocast):
    """One optimizer step at lr `rate` (scaled per layer) on run.accum micro-batches, (clips, soft targets) pairs ->
    (this rank's loss, gradient norm), 0-d device tensors (read later by StepLog, so the host need not wait for the
    step). Each micro-batch's loss is divided by run.accum, so the accumulated gradient is the mean over all the
    step's clips, as one batch of them would give; under DDP the ranks' gradients are averaged once, after the
    last micro-batch. The step is taken whatever the loss: a non-finite one is found at the next read, which stops
    every rank before the next checkpoint is written. Under fp16 the loss is scaled before backward (run.scaler;
    disabled otherwise) and a step whose scaled gradients overflow is skipped while the scale backs off, as in the
    released fine-tuning loop."""
    for g in run.optimizer.param_groups:  # per-step cosine, scaled per layer
        g["lr"] = rate * g["lr_scale"]
    run.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, (videos, targets) in enumerate(micro_batches):
        last = i == run.accum - 1
        with contextlib.nullcontext() if last or not isinstance(run.model, DDP) else run.model.no_sync():
            with autocast():
                logits = run.model(videos)  # (B, C)
            loss = F.cross_entropy(logits.float(), targets) / run.accum  # soft-target cross-entropy
            run.scaler.scale(loss).backward()
        total = total + loss.detach()
    run.scaler.unscale_(run.optimizer)  # the logged norm is of the true gradients
    # No clipping in the released recipe; max_norm=inf only measures the norm for the log.
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), float("inf"))
    run.scaler.step(run.optimizer)  # = optimizer.step() unless fp16 gradients overflowed
    run.scaler.update()
    return total, grad_norm


def write_results(args, data, run, acc, train_seconds):
    """results.json beside the checkpoint (top-1 / top-5, the config, the weights' key report) -> its dict."""
    results = dict(top1=acc["top1"], top5=acc["top5"], num_test=acc["num_test"], dataset=args.dataset,
                   test_split=args.test_split, test_views=f"{args.test_clips}x{args.test_crops}",
                   num_train=len(data.train_set), num_classes=data.num_classes, ckpt=args.ckpt, epochs=args.epochs,
                   missing_keys=run.missing, unexpected_keys=run.unexpected, train_seconds_this_run=train_seconds,
                   encoder=dataclasses.asdict(data.cfg), config=run.config)
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"fine-tuned {args.dataset} ({args.test_split}, {len(data.train_set)} train / {acc['num_test']} test "
          f"videos, {data.num_classes} classes, {results['test_views']} views): top-1 {acc['top1']:.2f}  "
          f"top-5 {acc['top5']:.2f}  -> {path}")
    return results

# ============ --bench: FLOPs and memory of a training step, without data or a GPU ============


def bench(args, num_classes=400):
    """A Classifier of --arch in train mode and the training augmentation, measured by bench.finetune_bench: FLOPs
    per clip, the estimated memory per GPU at --micro_batch, the augmentation's CPU time per clip."""
    overrides = {k: v for k, v in (("num_frames", args.num_frames), ("img_size", args.img_size)) if v}
    try:
        cfg = build_config(args.arch or "vit_b", target="pixel", loss="pixel", **overrides)  # the encoder's fields
    except ValueError as err:  # Config.validate: e.g. an --img_size that is not a multiple of the patch
        raise UsageError(f"--arch {args.arch or 'vit_b'} {' '.join(f'--{k} {v}' for k, v in overrides.items())}: "
                         f"{err}") from None
    model = Classifier(Encoder(cfg, drop_path=args.drop_path), num_classes).train()
    transform = ClipTransform(cfg.img_size, args.randaug, args.crop_scale, args.crop_ratio, args.flip)
    return finetune_bench(model, cfg, transform, args.arch or "vit_b", args.micro_batch, args.randaug, num_classes)


if __name__ == "__main__":
    sys.exit(run_cli(main, "eval_finetune.py"))
