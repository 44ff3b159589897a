"""
SIGMA pretraining with plain DDP. One script for a laptop and for a GPU cluster.

    python train.py                       # tiny model, built-in synthetic videos, 2-core CPU, minutes
    torchrun --nproc_per_node=8 train.py --dataset k400 --data_root /data/k400     # paper's ViT-B K400 run
    torchrun --nproc_per_node=8 train.py --dataset ssv2 --data_root /data/ssv2 --target dino \
        --dino_weights /weights/dino_vitbase16_pretrain.pth                        # SIGMA-DINO on SSv2
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER:29500 \
        train.py --dataset k400 --data_root /data/k400                             # 2 nodes x 8 GPUs
    python train.py --bench --arch vit_s  # step time, clips/s, FLOP/s vs. this machine's matmul peak

The same command restarts an interrupted run: it resumes from <out>/ckpt.pth (model, optimizer,
scaler, step, config; randomness is re-derived from (seed, epoch, rank) at every epoch start, so
a resumed run replays the uninterrupted one exactly). Every step is logged to <out>/log.jsonl.

A run that cannot silently go wrong: every option is checked before anything is read; a NaN loss or a
sustained collapse stops it (keeping the last checkpoint); a restart refuses settings that change the
result; ranks that find different checkpoints stop at once; a DataLoader worker stuck in FFmpeg stops
its rank after --loader_timeout; skipped videos are listed in <out>/bad_videos.txt.

Read in run order: recipes -> options and their checks -> distributed set-up -> precision ->
optimizer and schedule -> checkpoints and resume -> train() and the loop. What the loop reports and when it
stops itself (the log, the NaN stop, the collapse alarm) is in monitor.py; the command-line behaviour every
script shares (help, exit status 2 on a user's mistake, --device) in cli.py; what is not part of a run
(--bench, --dry_run's plan, the memory estimate) in bench.py.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import ranks
from bench import accumulation_note, bench, device_memory_gib, plan
from cli import (HelpFormatter, UsageError, add_device_option, below_minimum, grouped_values, invalid_options,
                 preset_values, resolve_device, run_cli, setup_distributed)
from data import LAYOUTS, build_video_dataset, make_loader, normalize, prefetch, set_epoch, to_device, tube_mask
from model import PRESETS, autocast_dtype, build_config, build_model, load_checkpoint, tf32_in_fp32_regions
from monitor import Run
from synthetic import MotionObjects, fashion_dataset

# ============ defaults: the released recipes (scripts_pretrain/*.sh of the SIGMA release) ============
# Keyed by dataset, or dataset_arch where the release has a second recipe. Every value can be
# overridden on the command line. batch_size is the total over all GPUs and accumulation steps;
# micro_batch is clips per GPU per forward (the released per-GPU batch); the difference is made
# up with gradient accumulation, so 8 GPUs reach the released 640 of 16 GPUs.
RECIPES = {
    # Moving Fashion-MNIST (synthetic.fashion_dataset: 2000 clips of real garment images), the laptop benchmark of
    # study.py: tiny ViT, 6 epochs, ~5 minutes on a 2-core CPU. The default: `python train.py` runs this.
    "fashion": dict(arch="tiny", batch_size=32, micro_batch=32, epochs=6, warmup_epochs=1, lr=8e-3,
                    min_lr=1e-4, stride=2, sk_eps=0.05, num_prototypes=256, save_every=3, workers=2),
    # Built-in synthetic motion videos (data.py), 64x64x8 tiny ViT: minutes on a 2-core CPU.
    "synthetic": dict(arch="tiny", batch_size=32, micro_batch=32, epochs=20, warmup_epochs=2, lr=8e-3,
                      min_lr=1e-4, stride=2, sk_eps=0.05, num_prototypes=256, save_every=5, workers=2),
    # K400 ViT-B: 16 GPUs x 40 clips, stride 4, eps 0.05, K 3000, 800 epochs (40 warmup).
    "k400": dict(arch="vit_b", batch_size=640, micro_batch=40, epochs=800, warmup_epochs=40, lr=1.5e-4,
                 min_lr=1e-5, stride=4, sk_eps=0.05, num_prototypes=3000, save_every=1, workers=10),
    # SSv2 ViT-B: 16 GPUs x 32 clips, stride 2, eps 0.03.
    "ssv2": dict(arch="vit_b", batch_size=512, micro_batch=32, epochs=800, warmup_epochs=40, lr=1.5e-4,
                 min_lr=1e-5, stride=2, sk_eps=0.03, num_prototypes=3000, save_every=1, workers=10),
    # SSv2 ViT-S: 8 GPUs x 16 clips, stride 2, eps 0.05, 2400 epochs.
    "ssv2_vit_s": dict(arch="vit_s", batch_size=128, micro_batch=16, epochs=2400, warmup_epochs=40, lr=1.5e-4,
                       min_lr=1e-5, stride=2, sk_eps=0.05, num_prototypes=3000, save_every=5, workers=10),
}
RECIPES["noise"] = {**RECIPES["synthetic"], "motion_objects": 2}  # SMILE's no-natural-video set, laptop scale


# ============ command line: options, then every value checked before anything is built or read ============

def per_recipe(key, otherwise=None):
    """Help text of an option whose value comes from the recipe: its value in each recipe of RECIPES (`otherwise`
    where the recipe does not set it)."""
    return "default per recipe: " + grouped_values({name: r.get(key, otherwise) for name, r in RECIPES.items()})


def per_arch(field):
    """Help text of an option whose value comes from the --arch preset: the model Config's value per preset."""
    return "default per --arch: " + preset_values(field)


def build_parser():
    p = argparse.ArgumentParser(description="SIGMA pretraining", formatter_class=HelpFormatter)
    a = p.add_argument
    own = [d for d in LAYOUTS if d not in RECIPES]
    a("--dataset", default="fashion", help=f"{' | '.join(LAYOUTS)} (data.py layouts; fashion, synthetic and noise "
      f"are generated on first use). It picks the recipe (RECIPES) that sets every option marked 'default per "
      f"recipe': <dataset>_<arch> where one exists ({', '.join(r for r in RECIPES if r not in LAYOUTS)}), else "
      f"<dataset>'s, else k400's ({', '.join(own)})")
    a("--data_root", default=None, help="dataset folder (or list file for 'list'); fashion / synthetic / noise: the "
      "folder they are generated into (default: data.py's cache folder)")
    a("--first_look", action=argparse.BooleanOptionalAction, default=True, help="--dataset fashion: at the end, "
      "segment the val clips with this run's encoder and with the random-init encoder it started from, print both "
      "mIoUs and draw first_look.png")
    a("--split", default="train", help="the dataset split to train on")
    a("--out", default=None, help="output folder for ckpt.pth and log.jsonl (default out/<dataset>_<arch>_<target>_<loss>); "
      "on several nodes it must be on a file system every node sees")
    add_device_option(p, "--precision auto follows it")
    # model
    a("--arch", default=None, help=f"{' | '.join(PRESETS)}; {per_recipe('arch')}")
    a("--target", default=None, help="projection phi: mlp (SIGMA-MLP) | dino (SIGMA-DINO) | pixel; default mlp, pixel for --loss pixel")
    a("--loss", default="sigma", help="sigma | l2 (Eq. 2; collapses with mlp) | pixel (VideoMAE)")
    a("--dino_weights", default="", help="local DINO ViT-*/16 checkpoint for --target dino")
    a("--dino_arch", default="vit_b", help="vit_b (D=768) | vit_s (D=384)")
    a("--num_prototypes", type=int, default=None, help=f"K; paper ablation peaks at 4000; {per_recipe('num_prototypes')}")
    a("--sk_eps", type=float, default=None, help=f"Sinkhorn entropy; lower = sharper codes; {per_recipe('sk_eps')}")
    a("--sk_iters", type=int, default=10, help="Sinkhorn iterations per step")
    a("--temperature", type=float, default=0.1, help="tau of the swapped-prediction cross-entropy")
    a("--soft_codes", action="store_true", help="paper's soft codes instead of the released hard argmax")
    a("--decoder_depth", type=int, default=None, help="decoder blocks; 0 = no decoder: mask tokens for "
      f"--predict_share of the masked tubes go through the encoder, a linear head predicts them (ViDROP; "
      f"docs/forking.md); {per_arch('dec_depth')}")
    a("--predict_share", type=float, default=0.25, help="--decoder_depth 0: share of the masked tubes that get a mask "
      "token in the encoder and are predicted; the rest are dropped")
    a("--clip_loss", type=float, default=0.0, help="weight of a clip-level swapped prediction between two views of "
      "each video (needs --repeats 2; docs/forking.md); 0 = off")
    a("--clip_prototypes", type=int, default=32, help="--clip_loss: prototypes of the clip-level term (Sinkhorn "
      "balances them over the clips of a micro-batch x GPUs)")
    a("--proj_hidden", type=int, nargs="+", default=None, help="hidden widths of the mlp phi (the paper describes a "
      f"shallower MLP, e.g. 1024 1024); {per_arch('proj_hidden')}")
    # data
    a("--num_frames", type=int, default=None, help=f"frames per clip; {per_arch('num_frames')}")
    a("--img_size", type=int, default=None, help=f"crop size; {per_arch('img_size')}")
    a("--stride", type=int, default=None, help=f"temporal stride between frames; {per_recipe('stride')}")
    a("--mask_ratio", type=float, default=0.9, help="share of spatial positions masked in every tube slice")
    a("--repeats", type=int, default=1, help="clips sampled per decoded video (repeated sampling amortises decoding)")
    a("--color_jitter", type=float, default=0.0, help="per-clip colour jitter of this strength (brightness, contrast, "
      "saturation +-S, hue +-S/4; SimCLR's is 0.4); 0 = off, as released")
    a("--motion_objects", type=int, default=None, help="moving cut-outs overlaid on every clip before crop and mask "
      f"(SMILE's synthetic motion; SMILE uses 2; docs/motion.md); 0 = off; {per_recipe('motion_objects', 0)}")
    a("--motion_objects_dir", default=None, help="folder of RGBA PNG cut-outs for --motion_objects (default: the "
      "Fashion-MNIST items shipped in assets/)")
    a("--workers", type=int, default=None, help=f"DataLoader workers per GPU; {per_recipe('workers')}")
    a("--loader_timeout", type=float, default=300, help="seconds to wait for one batch from the workers before "
      "stopping with a message (a worker stuck in FFmpeg); below the NCCL timeout (10 min); 0 = wait forever")
    # optimisation (the released pretraining scripts)
    a("--batch_size", type=int, default=None, help=f"total clips per optimizer step, over all GPUs; {per_recipe('batch_size')}")
    a("--micro_batch", type=int, default=None, help="clips per GPU per forward; accumulation fills the rest. "
      f"Sinkhorn balances over micro_batch x GPUs clips, so it is part of the recipe; {per_recipe('micro_batch')}")
    a("--epochs", type=int, default=None, help=f"passes over the training videos; {per_recipe('epochs')}")
    a("--warmup_epochs", type=int, default=None, help=f"linear warmup from 0, then per-step cosine; {per_recipe('warmup_epochs')}")
    a("--lr", type=float, default=None, help=f"base lr per 256 clips: lr = base * batch_size / 256; {per_recipe('lr')}")
    a("--min_lr", type=float, default=None, help=f"final lr per 256 clips; {per_recipe('min_lr')}")
    a("--weight_decay", type=float, default=0.05, help="not applied to biases, norms, 1-D params, mask token")
    a("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW's beta1 beta2")
    a("--precision", default="auto", help="auto (bf16 on GPUs of compute capability 8.0+, fp16 below, fp32 on CPU) | bf16 | fp16 (+GradScaler) | fp32")
    a("--compile", nargs="?", const="inductor", default=None, help="torch.compile the model, optionally naming the "
      "backend (--compile = inductor; aot_eager compiles fast, for checks); the first steps are slow; default: off")
    # bookkeeping
    a("--seed", type=int, default=0, help="initial weights, and with the epoch and rank every epoch's randomness")
    a("--save_every", type=int, default=None, help=f"epochs between checkpoints (always one at the end); "
      f"{per_recipe('save_every')}")
    a("--max_epochs_this_run", type=int, default=0, help="stop after this many epochs (with a checkpoint); "
      "re-run the same command to continue -- for time-limited cluster jobs")
    a("--log_every", type=int, default=10, help="steps between reads of the logged values from the GPU (each read "
      "waits for the GPU; every step still gets its log line)")
    a("--collapse_patience", type=int, default=100, help="stop when phi's assignments stay collapsed for this many "
      "steps in a row (--loss sigma); 0 = never stop")
    a("--dry_run", action="store_true", help="print the resolved configuration, the batch arithmetic, steps per "
      "epoch and the memory estimate, then exit without training (lists the dataset, decodes nothing)")
    a("--bench", action="store_true", help="time --bench_steps steps on random input and exit (bench.py)")
    a("--bench_steps", type=int, default=10, help="--bench: timed steps, after two warm-up steps")
    a("--bench_batch", type=int, default=None, help="clips per timed step (default: --micro_batch on GPU, 2 on "
      "CPU); the memory estimate is always for --micro_batch")
    return p


def get_args(argv=None):
    args = build_parser().parse_args(argv)
    # The most specific recipe that exists: dataset_arch, then dataset, then the K400 one.
    args.recipe = next((n for n in (f"{args.dataset}_{args.arch}", args.dataset) if n in RECIPES), "k400")
    for k, v in RECIPES[args.recipe].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.target is None:
        args.target = "pixel" if args.loss == "pixel" else "mlp"
    if args.motion_objects is None:
        args.motion_objects = 0
    if args.out is None:
        args.out = os.path.join("out", f"{args.dataset}_{args.arch}_{args.target}_{args.loss}")
    return args


def check_args(args, world):
    """Check every option before anything is built or read; returns the model Config.

    A bad value stops here with a message naming the option and a valid value, instead of running to
    the end (a negative eps, a warmup as long as the run, ...). All problems are listed at once.
    """
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(message)

    need(args.dataset in LAYOUTS, f"--dataset {args.dataset!r}: choose one of {', '.join(sorted(LAYOUTS))}")
    need(args.arch in PRESETS, f"--arch {args.arch!r}: unknown arch, choose one of {', '.join(PRESETS)}")
    need(args.target in ("mlp", "dino", "pixel"), f"--target {args.target!r}: choose mlp, dino or pixel")
    need(args.loss in ("sigma", "l2", "pixel"), f"--loss {args.loss!r}: choose sigma, l2 or pixel")
    need(args.precision in ("auto", "fp32", "bf16", "fp16"), f"--precision {args.precision!r}: choose auto, fp32, bf16 or fp16")
    problems += below_minimum(args, [(name, low, max(low, 1)) for name, low in [
        ("num_prototypes", 2), ("sk_iters", 1), ("stride", 1), ("repeats", 1), ("batch_size", 1), ("micro_batch", 1),
        ("epochs", 1), ("save_every", 1), ("log_every", 1), ("bench_steps", 1), ("workers", 0), ("warmup_epochs", 0),
        ("max_epochs_this_run", 0), ("collapse_patience", 0), ("motion_objects", 0)]])
    for name in ("sk_eps", "temperature", "lr"):
        need(getattr(args, name) > 0, f"--{name} {getattr(args, name)}: must be > 0, e.g. {RECIPES['k400'].get(name, 0.1)}")
    need(0 < args.mask_ratio < 1, f"--mask_ratio {args.mask_ratio}: must be in (0, 1), e.g. 0.9 (released)")
    need(0 <= args.min_lr <= args.lr, f"--min_lr {args.min_lr}: must be in [0, --lr {args.lr}], e.g. {args.lr / 15:.2g}")
    need(args.weight_decay >= 0, f"--weight_decay {args.weight_decay}: must be >= 0, e.g. 0.05")
    need(all(0 <= b < 1 for b in args.betas), f"--betas {args.betas}: each in [0, 1), e.g. 0.9 0.95")
    need(args.loader_timeout >= 0, f"--loader_timeout {args.loader_timeout}: seconds >= 0, e.g. 300 (0 = off)")
    need(args.bench_batch is None or args.bench_batch >= 1, f"--bench_batch {args.bench_batch}: must be >= 1")
    need(not args.motion_objects_dir or any(Path(args.motion_objects_dir).expanduser().glob("*.png")),
         f"--motion_objects_dir {args.motion_objects_dir}: no folder of *.png files; give a folder of RGBA PNGs or "
         "drop it (Fashion-MNIST items)")
    need(not os.path.exists(args.out) or os.path.isdir(args.out), f"--out {args.out} is a file: give a folder for "
         "ckpt.pth and log.jsonl, e.g. --out out/run1")
    if args.compile:  # an unknown backend would fail only at the first forward
        from torch._dynamo import list_backends
        need(args.compile in list_backends(exclude_tags=()), f"--compile {args.compile}: unknown backend, choose "
             "inductor (the default of --compile) or aot_eager")
    need(not args.proj_hidden or min(args.proj_hidden) >= 1, f"--proj_hidden {args.proj_hidden}: widths >= 1, e.g. 1024 1024 512")
    # Combinations.
    need(args.warmup_epochs < args.epochs, f"--warmup_epochs {args.warmup_epochs} must be shorter than --epochs "
         f"{args.epochs} (the lr would never reach its peak), e.g. --warmup_epochs {args.epochs // 20}")
    need(args.micro_batch % max(args.repeats, 1) == 0,
         f"--micro_batch {args.micro_batch} must be a multiple of --repeats {args.repeats}, e.g. --repeats "
         f"{max(r for r in range(1, max(args.repeats, 1) + 1) if args.micro_batch % r == 0)}")
    if args.micro_batch >= 1 and args.batch_size % (world * args.micro_batch):
        fits = [m for m in range(args.micro_batch, 0, -1) if args.batch_size % (world * m) == 0]
        problems.append(f"--batch_size {args.batch_size} is not a multiple of {world} GPUs x --micro_batch "
                        f"{args.micro_batch}; use --micro_batch {fits[0] if fits else 1} or change --batch_size")
    need(not args.soft_codes or args.loss == "sigma", "--soft_codes only applies to --loss sigma: drop it")
    need(not args.clip_loss or args.repeats >= 2, f"--clip_loss {args.clip_loss} needs two views of each video: add "
         "--repeats 2 (or drop --clip_loss)")
    need(args.color_jitter >= 0, f"--color_jitter {args.color_jitter}: a strength >= 0, e.g. 0.4 (0 = off)")
    need(not args.dino_weights or args.target == "dino", "--dino_weights is only read with --target dino: add "
         "--target dino or drop --dino_weights")
    if problems:
        raise UsageError(invalid_options(problems))
    try:
        cfg = build_config(args.arch, **model_options(args))  # the model's own checks (Config.validate)
    except ValueError as err:  # e.g. --img_size not a multiple of the patch: the message names it
        raise UsageError(str(err)) from None
    positions = cfg.grid[1] * cfg.grid[2]
    if not 1 <= int(args.mask_ratio * positions) < positions:
        raise UsageError(f"--mask_ratio {args.mask_ratio} masks {int(args.mask_ratio * positions)} of {positions} "
                         f"positions: at least one must be masked and one visible, e.g. --mask_ratio 0.9")
    return cfg


def model_options(args):
    """The model Config fields that come from the command line (the rest come from the --arch preset)."""
    options = dict(target=args.target, loss=args.loss, num_prototypes=args.num_prototypes, sk_eps=args.sk_eps,
                   sk_iters=args.sk_iters, temperature=args.temperature, soft_codes=args.soft_codes,
                   dino_weights=args.dino_weights, dino_arch=args.dino_arch, predict_share=args.predict_share,
                   clip_loss=args.clip_loss, clip_prototypes=args.clip_prototypes)
    options.update({k: getattr(args, k) for k in ("num_frames", "img_size") if getattr(args, k) is not None})
    if args.decoder_depth is not None:
        options["dec_depth"] = args.decoder_depth
    if args.proj_hidden:
        options["proj_hidden"] = tuple(args.proj_hidden)
    return options


# ============ distributed set-up: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK ============

def seed_everything(seed, epoch, rank):
    """Every epoch starts from a seed derived from (seed, epoch, rank): resuming from an
    end-of-epoch checkpoint replays exactly what the uninterrupted run would have done."""
    s = (seed * 1_000_003 + epoch * 1009 + rank) % 2 ** 31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s + 1)  # the tube-mask generator


def wrap_model(model, args, world, device):
    """The module the loop calls: compiled and/or wrapped in DDP; `model` itself stays what we save.

    forward_sync_buffers=False (torch 2.14's name for the deprecated broadcast_buffers=False): the only buffers
    are the fixed positional tables, identical on every rank by construction, so DDP's default re-broadcast of
    all buffers before each forward is pure overhead (the one broadcast at start stays).
    """
    if args.compile:
        model = torch.compile(model, backend=args.compile)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    return model


# ============ precision: one autocast context for the whole step ============

def choose_precision(args, device):
    """(precision, autocast, scaler). auto: bf16 autocast on GPUs with native bf16 (compute capability 8.0+; no
    loss scaling needed), fp16 + GradScaler below it (V100, T4: the released code's choice), fp32 on CPU --
    model.autocast_dtype, the rule the evaluation scripts share. Any choice can be forced (CPU runs fp16 too,
    slowly). Whatever the choice, prototype scores, Sinkhorn and the loss run in fp32 (model.py, sinkhorn.py),
    and so does the frozen DINO, outside the autocast (as released)."""
    precision = args.precision
    if precision == "auto":
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(device)]
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return precision, autocast, scaler


# ============ optimisation: parameter groups and the lr schedule (released `utils.py` cosine_scheduler) ============

def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norms and other 1-D params, nor the mask token."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # the frozen DINO
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name == "mask_token" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, total_steps, warmup_steps, lr, min_lr):
    """Linear warmup from 0 over warmup_steps, then cosine from lr down to min_lr, per step."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# ============ checkpoints and resume: atomic, unwrapped, released key layout ============

# An allow-list: these settings may change between restarts (where files are, how fast, how often to save
# or log, when to stop). Every other setting -- including micro_batch (Sinkhorn's batch), the GPU count and
# the steps per epoch (the dataset) -- changes the result, and resuming with a different value is refused.
# precision and device may change so that a run can move between GPU generations (fp16 <-> bf16) or machines;
# they change the rounding, not the recipe.
RESUME_MAY_CHANGE = ("out", "data_root", "device", "workers", "loader_timeout", "precision", "compile",
                     "save_every", "max_epochs_this_run", "log_every", "collapse_patience", "bench", "bench_steps",
                     "bench_batch", "dry_run", "git")


def save_checkpoint(path, obj):
    """Write to a temporary file, fsync, rename, fsync the folder: a kill -9 (or a power cut) at any moment
    leaves either the previous checkpoint or the new one, never a torn file. The folder's fsync makes the
    rename itself durable (without it the folder entry may still name the old file after a crash)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def remove_stale_temporaries(path):
    """Delete <path>.tmp.<pid> files left by a write that was killed (a full checkpoint's size each)."""
    folder, name = os.path.split(os.path.abspath(path))
    for stale in Path(folder).glob(f"{name}.tmp.*"):
        stale.unlink(missing_ok=True)


def host_copy(obj):
    """A snapshot of a checkpoint: every tensor in (nested dicts / lists / tuples of) obj copied to host memory."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Checkpoints written in the background, so the GPUs keep training while rank 0 writes (ViT-B: ~1.2 GB of
    weights and AdamW moments, with fsync, often to network storage).

    save(path, obj) first copies every tensor to host memory (a snapshot: the next steps change the weights in
    place), then save_checkpoint writes the copy in a thread: the file still appears atomically, and a kill during
    the write leaves the previous checkpoint. One write at a time (save waits for the previous one). wait()
    returns once the last write is on disk and re-raises its error (e.g. a full disk), if any; `failed` tells
    without waiting, so the loop reports a failed write at its next log interval (Run.flush), on every rank.
    """

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, path, obj):
        self.wait()
        snapshot = host_copy(obj)

        def write():
            try:
                save_checkpoint(path, snapshot)
            except BaseException as err:  # reported by the next wait(), in the training thread
                self.error = err

        self.thread = threading.Thread(target=write, name="checkpoint-writer")
        self.thread.start()

    @property
    def failed(self):
        return self.error is not None

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err


def git_hash():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def resume(ckpt_path, run_config, model, optimizer, scaler, world, device):
    """Auto-resume from <out>/ckpt.pth if it exists: returns (start_epoch, step), the same on every rank.

    Every rank reads the checkpoint itself, then all ranks compare what they found in one all-reduce: a node
    that cannot see rank 0's file would otherwise start from epoch 0 and hang later in an all-reduce. Refusals
    (changed settings) go through the same exchange, so every rank stops together instead of some waiting.
    """
    epoch, step, problem, ckpt = 0, 0, None, None
    if os.path.exists(ckpt_path):
        try:
            ckpt = load_checkpoint(ckpt_path)
        except RuntimeError as err:  # truncated, corrupt, or pickled code: model.load_checkpoint says which
            problem = (f"{err}\n  Move it away to start this run afresh in --out, or restore an earlier copy of "
                       f"it (a backup, or the checkpoint of an earlier epoch if you keep one) as {ckpt_path}.")
    keys = ("config", "model", "optimizer", "scaler", "epoch", "step")
    if ckpt is not None and not (isinstance(ckpt, dict) and all(k in ckpt for k in keys)):
        ckpt, problem = None, (f"{ckpt_path} is not a checkpoint of train.py (it lacks some of {', '.join(keys)}): "
                               "use another --out, or move the file away to start this run afresh there")
    if ckpt is not None:
        same = lambda v: json.loads(json.dumps(v, default=str))  # tuples vs lists, as stored
        # An option added to train.py after the checkpoint was written counts as left at its default (what the
        # run did without it), resolved with the checkpoint's dataset and arch like any default.
        saved = {**vars(get_args(["--dataset", ckpt["config"]["dataset"], "--arch", ckpt["config"]["arch"]])),
                 **ckpt["config"]}
        changed = {k: (saved.get(k), v) for k, v in run_config.items()
                   if k not in RESUME_MAY_CHANGE and same(saved.get(k)) != same(v)}
        if changed:
            problem = (f"{ckpt_path} was trained with other settings {changed} (saved, now): use another --out or the "
                       f"same settings (only {', '.join(RESUME_MAY_CHANGE)} may change between restarts)")
        elif shapes(ckpt["model"]) != shapes(model.state_dict()):
            problem = (f"{ckpt_path} holds weights of another model (parameter names or shapes differ from this "
                       "run's, e.g. written by other code): use another --out, or move the file away")
        else:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"]:  # empty when saved by a bf16 / fp32 run: an fp16 restart starts a fresh scale
                scaler.load_state_dict(ckpt["scaler"])
            epoch, step = ckpt["epoch"], ckpt["step"]
    if world > 1:
        # One MAX all-reduce answers both questions: did any rank refuse, and do all ranks agree (max of the
        # values equals max of their negatives' negation only when every rank holds the same value).
        found = torch.tensor([epoch, step, -epoch, -step, int(problem is not None)], device=device)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        hi_epoch, hi_step, lo_epoch, lo_step, refused = found.tolist()
        if refused and problem is None:
            problem = "another rank refused to resume (see its message above)"
        elif not problem and (hi_epoch, hi_step) != (-lo_epoch, -lo_step):
            raise ranks.RanksDisagree(
                f"rank {dist.get_rank()} would resume from epoch {epoch}, step {step} ({ckpt_path}), but other ranks "
                f"found epochs {-lo_epoch}..{hi_epoch}: every rank must read the same checkpoint. Put --out on a "
                f"file system that every node sees (e.g. the cluster's shared storage, not a node-local disk).")
    if problem:
        raise UsageError(problem)
    return epoch, step


# ============ the run, in the order it happens ============

def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed(resolve_device(args.device))
    try:
        return train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device):
    master = rank == 0
    cfg = check_args(args, world)  # every option, before any weight or video is read
    precision, autocast, scaler = choose_precision(args, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: cuDNN times its convolutions once
    torch.manual_seed(args.seed)  # same initial weights for a given seed, on every rank
    try:
        model = build_model(args.arch, **model_options(args))
    except RuntimeError as err:  # with --target dino the one file read here is --dino_weights: the user's to fix
        if args.target != "dino":
            raise
        raise UsageError(f"--dino_weights {args.dino_weights}: {' '.join(str(err).split())[:300]}; give a DINO "
                         f"ViT-{args.dino_arch[-1].upper()}/16 checkpoint (--dino_arch {args.dino_arch})") from None
    model = model.to(device)
    if args.bench:
        return bench(model, cfg, args, device, autocast, precision, param_groups(model, args.weight_decay))

    # ============ batch arithmetic ============
    # batch_size (clips per optimizer step) = world x micro_batch x accum: 8 GPUs x 40 clips x 2 make the released
    # 640 of 16 GPUs. The lr follows the total batch (linear scaling rule, as released: base lr per 256 clips).
    accum = args.batch_size // (world * args.micro_batch)
    lr, min_lr = args.lr * args.batch_size / 256, args.min_lr * args.batch_size / 256

    # ============ preparing data ============
    paths = {name: os.path.join(args.out, name) for name in ("ckpt.pth", "log.jsonl", "bad_videos.txt")}
    if not args.dry_run:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--out {args.out}: cannot create this folder ({err.strerror}); give a folder you can "
                             "write to, e.g. --out out/run1") from None
        if master:
            remove_stale_temporaries(paths["ckpt.pth"])  # a write killed mid-way left a full-size temporary
    dataset, loader = build_loader(args, cfg, paths)
    # Each rank lists the videos from its own file system (a node-local copy of the dataset): the sampler's
    # indices mean the same clips on every rank, and every rank runs the same number of steps, only if the lists
    # are identical. Compared by content, relative to the dataset folder, so nodes may mount it elsewhere.
    if world > 1:
        ranks.agree("the training videos", f"{len(dataset):,} videos", relative_samples(dataset.samples),
                    fix="Give every node the same dataset (the same files, or the same prepared store).")
    # len(loader) = micro-batches per rank and epoch (the DistributedSampler pads ranks to equal shares).
    steps_per_epoch = len(loader) // accum  # every rank runs the same number (drop_last)
    if steps_per_epoch == 0:
        raise UsageError(f"{len(dataset)} videos give no full step of {args.batch_size} clips on {world} GPUs: "
                         f"lower --batch_size")
    if args.dry_run:
        if master:
            print(plan(args, cfg, model, world, accum, steps_per_epoch, len(dataset), device, autocast, precision))
        return 0

    # ============ optimizer, resume ============
    # fused AdamW on CUDA: one kernel for all parameters. The config (the options and what follows from them) is
    # printed, stored in every checkpoint and compared on a restart (resume()).
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=tuple(args.betas),
                                  fused=device.type == "cuda")
    config = {**vars(args), "world_size": world, "accum": accum, "lr_abs": lr, "min_lr_abs": min_lr,
              "precision": precision, "device": str(device), "steps_per_epoch": steps_per_epoch, "git": git_hash()}
    start_epoch, step = resume(paths["ckpt.pth"], config, model, optimizer, scaler, world, device)
    step_model = wrap_model(model, args, world, device)
    if master:
        print("config:", json.dumps(config, indent=None, default=str))
        print(f"model: {args.arch} target={cfg.target} loss={cfg.loss}, "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable params; {len(dataset)} "
              f"videos; {world} x {args.micro_batch} clips x {accum} accum = {args.batch_size} clips/step; "
              f"{steps_per_epoch} steps/epoch; device {device}, {precision}"
              + (f"; resumed from {paths['ckpt.pth']}: epoch {start_epoch}, step {step}" if step else ""))
        if accum > 1:  # on every device, so that a CPU rehearsal of a GPU recipe takes this branch too
            print(accumulation_note(model, cfg, args, world, autocast, device_memory_gib(device)))

    # ============ training ============
    # Run holds the log and the monitors: an epoch returns stop=True after a NaN loss or a collapse, on every rank
    # at once. Rank 0 writes the checkpoints in the background (CheckpointWriter): no rank waits for the disk.
    writer = CheckpointWriter()
    run = Run(args, cfg, world, device, master, steps_per_epoch, paths, lr, min_lr, accum, writer)
    end_epoch = min(args.epochs, start_epoch + args.max_epochs_this_run) if args.max_epochs_this_run else args.epochs
    for epoch in range(start_epoch, end_epoch):
        mask_gen = seed_everything(args.seed, epoch, rank)
        set_epoch(loader, epoch)
        step_model.train()
        with tf32_in_fp32_regions(device, precision):  # CUDA + bf16/fp16: DINO and prototype scores in TF32
            step, stop = train_one_epoch(run, step_model, model, optimizer, scaler, autocast, loader, mask_gen,
                                         epoch, step)
        if stop:
            writer.wait()  # the last good checkpoint, complete on disk
            return 1
        if master:
            run.end_of_epoch(epoch)
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == end_epoch:
                writer.save(paths["ckpt.pth"], {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": step, "config": config,
                    "model_config": dataclasses.asdict(cfg)})
    # Nobody exits before the last checkpoint is on disk, and a failed write stops every rank with its message
    # (ranks.together: one exchange, which is also the barrier).
    with ranks.together(f"writing the checkpoint {paths['ckpt.pth']}"):
        writer.wait()
    if world > 1:
        check_ranks_agree(model, master)
    if master:
        run.summary(end_epoch)
        # The first look runs in this process only: under torchrun, eval_vos.py reads the val clips itself.
        if args.first_look and args.dataset == "fashion" and end_epoch == args.epochs and run.last and world == 1:
            import eval_vos  # the evaluation is not part of training: imported only here
            eval_vos.first_look(paths["ckpt.pth"], args.arch, args.seed, args.data_root or fashion_dataset(), args.out)
    return 0


def build_loader(args, cfg, paths):
    """The training clips and their DataLoader: (dataset, loader).

    drop_last: every rank must run the same number of forwards, because Sinkhorn all-reduces inside each one --
    a rank with an extra batch would wait forever. With --repeats R each decoded video yields R clips, so the
    loader batches micro_batch / R videos.
    """
    dataset = build_video_dataset(args.dataset, args.data_root, args.split, num_frames=cfg.num_frames,
                                  stride=args.stride, size=cfg.img_size, train=True, repeats=args.repeats,
                                  color_jitter=args.color_jitter)
    # Worker processes cannot report back to the main process: each appends the paths it skips to this file
    # (shared by every worker and rank; the end-of-run summary counts it).
    dataset.bad_list = paths["bad_videos.txt"]
    if args.motion_objects:  # SMILE's synthetic motion, drawn from (seed, epoch, index): resumes exactly
        dataset.overlay = MotionObjects(args.motion_objects, args.motion_objects_dir, seed=args.seed)
    loader = make_loader(dataset, batch_size=args.micro_batch // args.repeats, num_workers=args.workers,
                         shuffle=True, drop_last=True, seed=args.seed, timeout=args.loader_timeout)
    return dataset, loader


def relative_samples(samples):
    """[(path, label)] with the paths relative to the folder they share: what ranks compare (ranks.agree)."""
    paths = [str(p) for p, _ in samples]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return [(os.path.relpath(p, root), y) for p, (_, y) in zip(paths, samples)]


def train_one_epoch(run, step_model, model, optimizer, scaler, autocast, loader, mask_gen, epoch, step):
    """One pass over the loader: steps_per_epoch optimizer steps of accum micro-batches each.
    Returns (step, stop): stop is True when the monitor found a NaN loss or a collapse."""
    args, cfg, device, accum = run.args, run.cfg, run.device, run.accum
    # On CUDA the next batch's copy to the GPU runs on a side stream while this one computes (data.prefetch).
    batches = prefetch((videos for videos, _ in loader), run.device)
    bar = tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True,
               leave=False, disable=None if run.master else True)
    for i in bar:
        for g in optimizer.param_groups:  # per-step cosine (released `utils.py`), same for both param groups
            g["lr"] = lr_at(step, run.total_steps, run.warmup_steps, run.lr, run.min_lr)
        stats = {}  # name -> 0-d device tensor, the mean over this step's micro-batches
        for micro in range(accum):
            # uint8 from the workers (a quarter of float32's bytes to copy), normalised on the device.
            videos = normalize(next_batch(batches, run))  # (B, 3, T, H, W); (B, R, 3, T, H, W) with --repeats R
            videos = videos.flatten(0, 1) if videos.ndim == 6 else videos  # repeated sampling: (B*R, 3, T, H, W)
            # Masks are drawn here, for the whole micro-batch at once (vectorised), not per sample. The count of
            # masked tokens is read on the host, before the copy: the model gathers fixed-size index sets with it
            # (no host sync, one compiled graph), and the mask travels from pinned memory, off the host's path.
            mask = tube_mask(len(videos), cfg.grid, args.mask_ratio, generator=mask_gen)  # (B, N) on the host
            n_masked = int(mask[0].sum())
            mask = to_device(mask, device)
            # Gradients are all-reduced by DDP only on the last micro-batch.
            sync = micro == accum - 1 or run.world == 1
            with (contextlib.nullcontext() if sync else step_model.no_sync()), autocast():
                out = step_model(videos, mask, n_masked=n_masked, views=args.repeats)
            # / accum: the accumulated gradient is the mean over the whole batch_size clips, as one big batch's
            # would be. The scaler multiplies by the fp16 loss scale (a no-op for bf16 / fp32).
            scaler.scale(out["loss"] / accum).backward()
            for k, v in out.items():  # mean over micro-batches; 0-d tensors, no host sync
                stats[k] = stats.get(k, 0) + v.detach().double() / accum
        scaler.unscale_(optimizer)  # true gradients from here on (fp16: divided by the loss scale)
        # The released recipe does not clip gradients; max_norm=inf only measures the norm for the log.
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        # fp16: a step with inf / NaN gradients is skipped and the scale halved; otherwise a plain AdamW step.
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # No .item() here: reading a value would make the host wait for the GPU to finish the step, and the
        # next step could not be queued behind it. The values are read every --log_every steps instead.
        run.record(step, epoch + (i + 1) / run.steps_per_epoch, optimizer.param_groups[0]["lr"], stats)
        # Always at the end of an epoch too: the checkpoint is written only after its steps were checked.
        if (step % args.log_every == 0 or i + 1 == run.steps_per_epoch) and run.flush(bar):
            return step, True
    return step, False


def next_batch(batches, run):
    """The next batch of uint8 clips, on the device. A worker that produces nothing for --loader_timeout seconds (FFmpeg stuck
    on a pathological file) stops this rank with a message; torchrun then ends the other ranks at once instead
    of all of them waiting in Sinkhorn's all-reduce until the NCCL timeout."""
    t0 = time.perf_counter()
    try:
        videos = next(batches)  # (B, 3, T, H, W); (B, R, 3, T, H, W) with --repeats R; uint8, on the device
    except RuntimeError as err:
        if "timed out" not in str(err):
            raise
        raise RuntimeError(
            f"rank {run.rank}: no batch from the DataLoader workers for {run.args.loader_timeout:g} s "
            f"(--loader_timeout). A worker is probably stuck decoding a pathological video; the files skipped so far "
            f"are listed in {run.paths['bad_videos.txt']}. Re-encode or remove the file (try decoding the dataset "
            f"with `python store.py --prepare`, which lists the unreadable ones), or raise --loader_timeout if decoding is "
            f"merely slow.") from None
    waited = time.perf_counter() - t0
    run.data_time += waited
    run.data_total += waited
    return videos


def check_ranks_agree(model, master):
    """DDP keeps replicas identical by construction; verify it (a cheap end-of-run sanity check
    that catches e.g. a parameter updated outside autograd on one rank only)."""
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"model weights differ across ranks: {digests}")
    if master:
        print(f"weights identical on all {len(digests)} ranks (sha256 {digests[0][:12]})")


if __name__ == "__main__":
    sys.exit(run_cli(main, "train.py"))
