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
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import build_video_dataset, make_loader, set_epoch, tube_mask
from model import build_model, load_checkpoint, train_step_flops

# ============ defaults: the released recipes (scripts_pretrain/*.sh of the SIGMA release) ============
# Keyed by dataset, or dataset_arch where the release has a second recipe. Every value can be
# overridden on the command line. batch_size is the total over all GPUs and accumulation steps;
# micro_batch is clips per GPU per forward (the released per-GPU batch); the difference is made
# up with gradient accumulation, so 8 GPUs reach the released 640 of 16 GPUs.
RECIPES = {
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


def get_args(argv=None):
    p = argparse.ArgumentParser(description="SIGMA pretraining", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Options left at None take their value from the recipe chosen by --dataset (and --arch).
    a = p.add_argument
    a("--dataset", default="synthetic", help="synthetic | k400 | ssv2 | ucf101 | hmdb51 | list (data.py layouts)")
    a("--data_root", default=None, help="dataset folder (or list file for 'list'); synthetic: cache folder")
    a("--split", default="train")
    a("--out", default=None, help="output folder for ckpt.pth and log.jsonl (default out/<dataset>_<arch>_<target>_<loss>)")
    # model
    a("--arch", default=None, help="tiny | vit_s | vit_b")
    a("--target", default=None, help="projection phi: mlp (SIGMA-MLP) | dino (SIGMA-DINO) | pixel; default mlp, pixel for --loss pixel")
    a("--loss", default="sigma", help="sigma | l2 (Eq. 2; collapses with mlp) | pixel (VideoMAE)")
    a("--dino_weights", default="", help="local DINO ViT-*/16 checkpoint for --target dino")
    a("--dino_arch", default="vit_b", help="vit_b (D=768) | vit_s (D=384)")
    a("--num_prototypes", type=int, default=None, help="K; paper ablation peaks at 4000")
    a("--sk_eps", type=float, default=None, help="Sinkhorn entropy; lower = sharper codes (SSv2 ViT-B: 0.03)")
    a("--sk_iters", type=int, default=10)
    a("--temperature", type=float, default=0.1, help="tau of the swapped-prediction cross-entropy")
    a("--soft_codes", action="store_true", help="paper's soft codes instead of the released hard argmax")
    a("--proj_hidden", type=int, nargs="+", default=None, help="hidden widths of the mlp phi (released: 1024 1024 512; "
      "the paper describes a shallower MLP, e.g. 1024 1024)")
    # data
    a("--num_frames", type=int, default=None, help="frames per clip (16; tiny: 8)")
    a("--img_size", type=int, default=None, help="crop size (224; tiny: 64)")
    a("--stride", type=int, default=None, help="temporal stride between frames (K400 4, SSv2 2)")
    a("--mask_ratio", type=float, default=0.9, help="share of spatial positions masked in every tube slice")
    a("--repeats", type=int, default=1, help="clips sampled per decoded video (repeated sampling amortises decoding)")
    a("--workers", type=int, default=None, help="DataLoader workers per GPU")
    # optimisation (SPEC §6)
    a("--batch_size", type=int, default=None, help="total clips per optimizer step, over all GPUs")
    a("--micro_batch", type=int, default=None, help="clips per GPU per forward; accumulation fills the rest")
    a("--epochs", type=int, default=None)
    a("--warmup_epochs", type=int, default=None, help="linear warmup from 0, then per-step cosine")
    a("--lr", type=float, default=None, help="base lr per 256 clips: lr = base * batch_size / 256")
    a("--min_lr", type=float, default=None, help="final lr per 256 clips")
    a("--weight_decay", type=float, default=0.05, help="not applied to biases, norms, 1-D params, mask token")
    a("--betas", type=float, nargs=2, default=(0.9, 0.95))
    a("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (+GradScaler) | fp32")
    a("--compile", action="store_true", help="torch.compile the model (GPU; first steps are slow)")
    # bookkeeping
    a("--seed", type=int, default=0)
    a("--save_every", type=int, default=None, help="epochs between checkpoints (always one at the end)")
    a("--max_epochs_this_run", type=int, default=0, help="stop after this many epochs (with a checkpoint); "
      "re-run the same command to continue -- for time-limited cluster jobs")
    a("--bench", action="store_true", help="time --bench_steps steps on random input and exit")
    a("--bench_steps", type=int, default=10)
    a("--bench_batch", type=int, default=None, help="clips per timed step (default: --micro_batch on GPU, 2 on "
      "CPU); the memory estimate is always for --micro_batch")
    args = p.parse_args(argv)

    # The most specific recipe that exists: dataset_arch, then dataset, then the K400 one.
    args.recipe = next((n for n in (f"{args.dataset}_{args.arch}", args.dataset) if n in RECIPES), "k400")
    for k, v in RECIPES[args.recipe].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.target is None:
        args.target = "pixel" if args.loss == "pixel" else "mlp"
    if args.out is None:
        args.out = os.path.join("out", f"{args.dataset}_{args.arch}_{args.target}_{args.loss}")
    return args


# ============ distributed set-up: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK ============

def setup_distributed():
    """Returns (rank, world_size, device). Plain `python train.py` is a world of one."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed, epoch, rank):
    """Every epoch starts from a seed derived from (seed, epoch, rank): resuming from an
    end-of-epoch checkpoint replays exactly what the uninterrupted run would have done."""
    s = (seed * 1_000_003 + epoch * 1009 + rank) % 2 ** 31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s + 1)  # the tube-mask generator


# ============ optimisation: parameter groups and the lr schedule (SPEC §6) ============

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


# ============ checkpoints: atomic, unwrapped, released key layout ============

# Settings that define the run: resuming with different ones would silently mix two runs.
RESUME_MUST_MATCH = ("dataset", "arch", "target", "loss", "num_prototypes", "batch_size", "epochs",
                     "num_frames", "img_size", "seed")


def save_checkpoint(path, obj):
    """Write to a temporary file, fsync, then rename: a kill -9 at any moment leaves either the
    previous checkpoint or the new one, never a torn file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def git_hash():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def matmul_flops_per_second(device, dtype, n=2048, seconds=2.0):
    """Throughput of one large matmul on this device: the practical ceiling of a training step."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB -> GiB (process RSS)


def main(argv=None):
    args = get_args(argv)
    rank, world, device = setup_distributed()
    master = rank == 0
    try:
        return train(args, rank, world, device, master)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device, master):
    # ============ precision ============
    # One precision context for the whole step (SPEC §6): bf16 autocast on GPUs that have it (no loss
    # scaling needed), fp32 on CPU, fp16 + GradScaler only on request (the released code's choice on
    # V100s). Sinkhorn always runs in fp32 regardless (sinkhorn.py).
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision {precision!r}: choose auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a GPU; on CPU use fp32 (or bf16)")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ============ building the model (fails here on a bad configuration) ============
    torch.manual_seed(args.seed)  # same initial weights for a given seed, on every rank
    model_overrides = {k: getattr(args, k) for k in ("num_frames", "img_size") if getattr(args, k) is not None}
    if args.proj_hidden:
        model_overrides["proj_hidden"] = tuple(args.proj_hidden)
    model = build_model(args.arch, target=args.target, loss=args.loss, num_prototypes=args.num_prototypes,
                        sk_eps=args.sk_eps, sk_iters=args.sk_iters, temperature=args.temperature,
                        soft_codes=args.soft_codes, dino_weights=args.dino_weights, dino_arch=args.dino_arch,
                        **model_overrides).to(device)
    cfg = model.cfg
    if args.bench:
        return bench(model, cfg, args, device, autocast, amp_dtype)

    # ============ batch arithmetic ============
    # batch_size (total clips per optimizer step) = world x micro_batch x accum. The released K400 run used
    # 16 GPUs x 40 clips; on 8 GPUs the same 640 clips come from 2 accumulated micro-batches. The lr
    # follows the total batch (linear scaling rule, as released: base lr per 256 clips).
    if args.batch_size % (world * args.micro_batch):
        fits = [m for m in range(args.micro_batch, 0, -1) if args.batch_size % (world * m) == 0]
        raise ValueError(f"--batch_size {args.batch_size} is not a multiple of {world} GPUs x --micro_batch "
                         f"{args.micro_batch}; use --micro_batch {fits[0] if fits else 1} or change --batch_size")
    if args.micro_batch % args.repeats:
        raise ValueError(f"--micro_batch {args.micro_batch} must be a multiple of --repeats {args.repeats}")
    accum = args.batch_size // (world * args.micro_batch)
    lr = args.lr * args.batch_size / 256
    min_lr = args.min_lr * args.batch_size / 256

    # ============ preparing data ============
    # drop_last: every rank must run the same number of forwards, because Sinkhorn all-reduces inside
    # each one -- a rank with an extra batch would wait forever. With --repeats R each decoded video
    # yields R clips, so the loader batches micro_batch / R videos.
    dataset = build_video_dataset(args.dataset, args.data_root, args.split, num_frames=cfg.num_frames,
                                  stride=args.stride, size=cfg.img_size, train=True, repeats=args.repeats)
    loader = make_loader(dataset, batch_size=args.micro_batch // args.repeats, num_workers=args.workers,
                         shuffle=True, drop_last=True, seed=args.seed)
    steps_per_epoch = len(loader) // accum  # every rank runs the same number (drop_last)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} videos give no full step of {args.batch_size} clips on {world} GPUs: "
                         f"lower --batch_size")
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch

    # ============ optimizer, resume ============
    # Auto-resume: the same command restarts from <out>/ckpt.pth. Settings that define the run must match;
    # the rest (workers, precision, ...) may change between restarts.
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=tuple(args.betas),
                                  fused=device.type == "cuda")
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pth"), os.path.join(args.out, "log.jsonl")
    start_epoch, step = 0, 0
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        changed = {k: (ckpt["config"].get(k), v) for k, v in vars(args).items()
                   if k in RESUME_MUST_MATCH and ckpt["config"].get(k) != v}
        if changed:
            raise ValueError(f"{ckpt_path} was trained with other settings {changed} (saved, now): "
                             f"use another --out or the same settings")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        if master:
            print(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}")
    raw_model = model  # unwrapped: what we save (no `module.` / `_orig_mod.` prefixes: released layout)
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    config = {**vars(args), "world_size": world, "accum": accum, "lr_abs": lr, "min_lr_abs": min_lr,
              "precision": precision, "steps_per_epoch": steps_per_epoch, "git": git_hash()}
    if master:
        print("config:", json.dumps(config, indent=None, default=str))
        print(f"model: {args.arch} target={cfg.target} loss={cfg.loss}, {sum(p.numel() for p in raw_model.parameters() if p.requires_grad):,} "
              f"trainable params; {len(dataset)} videos; {world} x {args.micro_batch} clips x {accum} accum = "
              f"{args.batch_size} clips/step; {steps_per_epoch} steps/epoch; device {device}, {precision}")

    # ============ training ============
    log = open(log_path, "a") if master else None
    first_losses, last = [], {}
    end_epoch = args.epochs if not args.max_epochs_this_run else min(args.epochs, start_epoch + args.max_epochs_this_run)
    for epoch in range(start_epoch, end_epoch):
        # This epoch's randomness (augmentation, shuffle, masks) depends on (seed, epoch, rank) only,
        # so a run resumed from an end-of-epoch checkpoint continues exactly like an uninterrupted one.
        mask_gen = seed_everything(args.seed, epoch, rank)
        set_epoch(loader, epoch)
        model.train()
        batches = iter(loader)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=None if master else True,
                   dynamic_ncols=True, leave=False)
        for _ in bar:
            t0 = time.perf_counter()
            for g in optimizer.param_groups:  # per-step schedule (SPEC §6), same for both param groups
                g["lr"] = lr_at(step, total_steps, warmup_steps, lr, min_lr)
            data_time, stats = 0.0, {}
            for micro in range(accum):
                t_data = time.perf_counter()
                videos = next(batches)[0].to(device, non_blocking=True)  # (B, 3, T, H, W); (B, R, ...) with --repeats R
                data_time += time.perf_counter() - t_data
                videos = videos.flatten(0, 1) if videos.ndim == 6 else videos  # repeated sampling
                # Masks are drawn here, for the whole micro-batch at once (vectorised), not per sample.
                mask = tube_mask(len(videos), cfg.grid, args.mask_ratio, generator=mask_gen).to(device)
                # Gradients are all-reduced by DDP only on the last micro-batch.
                sync = micro == accum - 1 or world == 1
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
                    out = model(videos, mask)
                scaler.scale(out["loss"] / accum).backward()
                for k, v in out.items():  # mean over micro-batches
                    stats[k] = stats.get(k, 0.0) + (v.item() if torch.is_tensor(v) else v) / accum
            scaler.unscale_(optimizer)
            # The released recipe does not clip gradients; max_norm=inf only measures the norm for the log.
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), float("inf")).item()
            # Average the logged loss over ranks. Every rank sees the same average, so a non-finite loss on
            # any rank stops all of them together (one rank stopping alone would hang the others).
            loss_mean = torch.tensor([stats["loss"]], device=device, dtype=torch.float64)
            if world > 1:
                dist.all_reduce(loss_mean)
                loss_mean /= world
            stats["loss"] = loss_mean.item()
            if not math.isfinite(stats["loss"]):
                if master:
                    print(f"\nloss is {stats['loss']} at step {step} (epoch {epoch}); stopping. The last good "
                          f"checkpoint is {ckpt_path if os.path.exists(ckpt_path) else 'none (no epoch finished)'}. "
                          "Try a lower --lr, more --warmup_epochs, or --precision fp32 / bf16.", file=sys.stderr)
                return 1
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            dt = time.perf_counter() - t0
            last = {"step": step, "epoch": epoch + (bar.n + 1) / steps_per_epoch, "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm, **{k: round(v, 5) for k, v in stats.items()},
                    "clips_per_s": args.batch_size / dt, "data_wait": data_time / dt,
                    "peak_mem_gb": peak_memory_gb(device)}
            if master:
                if len(first_losses) < 10:
                    first_losses.append(stats["loss"])
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{stats['loss']:.3f}", protos=stats.get("protos_used", "-"),
                                lr=f"{last['lr']:.1e}", clips_s=f"{last['clips_per_s']:.0f}",
                                data=f"{last['data_wait']:.0%}")

        if master:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {last['loss']:.4f}"
                  + (f", prototypes used {int(last['protos_used'])}/{cfg.num_prototypes}, entropy "
                     f"{last['assign_entropy']:.2f}/{math.log(cfg.num_prototypes):.2f}" if "protos_used" in last else "")
                  + f", target spread {last['target_std']:.3f}, {last['clips_per_s']:.1f} clips/s, "
                  f"data wait {last['data_wait']:.0%}")
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == end_epoch:
                save_checkpoint(ckpt_path, {
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": step, "config": config,
                    "model_config": dataclasses.asdict(cfg)})
        if world > 1:
            dist.barrier()  # nobody starts the next epoch (or exits) before the checkpoint exists

    if world > 1:
        check_ranks_agree(raw_model, master)
    if master:
        log.close()
        summary(args, cfg, first_losses, last, ckpt_path, log_path, end_epoch)
    return 0


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


def summary(args, cfg, first_losses, last, ckpt_path, log_path, end_epoch):
    if not last:
        print(f"nothing to do: {ckpt_path} already holds epoch {end_epoch}/{args.epochs}")
        return
    lines = [f"done: epoch {end_epoch}/{args.epochs}, step {last['step']}.",
             f"  loss {sum(first_losses) / len(first_losses):.3f} (first steps) -> {last['loss']:.3f} (last step)"]
    if "protos_used" in last:
        lines.append(f"  prototypes in use {int(last['protos_used'])}/{cfg.num_prototypes}, assignment entropy "
                     f"{last['assign_entropy']:.2f} nats (max {math.log(cfg.num_prototypes):.2f}; near 0 = collapse)")
    lines += [f"  checkpoint {ckpt_path}", f"  log        {log_path}  (one JSON line per step)"]
    if end_epoch < args.epochs:
        lines.append("  re-run the same command to continue.")
    else:
        data = f"--dataset {args.dataset}" + (f" --data_root {args.data_root}" if args.data_root else "")
        lines += ["next:", f"  python eval_linear.py --ckpt {ckpt_path} {data}",
                  f"  python eval_vos.py --ckpt {ckpt_path} --dataset "
                  + ("synthetic" if args.dataset == "synthetic" else "davis2017 --data_root /path/to/DAVIS")]
    print("\n".join(lines))


# ============ --bench: the training step on random input ============

def estimate_memory_gb(model, cfg, batch, autocast, mask_ratio):
    """Per-GPU memory of a training step, estimated without a GPU: fp32 weights, grads and AdamW
    moments (16 bytes per trainable parameter) + the tensors autograd saves for backward,
    counted on one clip under the run's autocast and scaled to `batch` clips + the two
    (tokens x K) fp32 Sinkhorn matrices alive at the end of the forward. Allocator slack and
    workspace are not included (add ~10-20%)."""
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    videos = torch.randn(1, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=model.mask_token.device)
    mask = tube_mask(1, cfg.grid, mask_ratio).to(videos.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        model(videos, mask)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    static = 16 * trainable + 4 * frozen
    n_masked = int(mask.sum())
    sinkhorn = 2 * 4 * batch * n_masked * cfg.num_prototypes if cfg.loss == "sigma" else 0
    activations = batch * sum(saved.values())
    return static / 2 ** 30, activations / 2 ** 30, sinkhorn / 2 ** 30


def bench(model, cfg, args, device, autocast, amp_dtype):
    """Median step time, clips/s and achieved FLOP/s against this device's matmul throughput."""
    batch = args.bench_batch or (args.micro_batch if device.type == "cuda" else min(2, args.micro_batch))
    ceiling = matmul_flops_per_second(device, amp_dtype or torch.float32)
    flops = train_step_flops(model, batch)  # forward + backward, counted by torch on a real step
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=1e-5, fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    videos = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(args.bench_steps + 2):  # two warm-up steps
        mask = tube_mask(batch, cfg.grid, args.mask_ratio).to(device)
        sync()
        t0 = time.perf_counter()
        with autocast():
            loss = step_model(videos, mask)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    t = sorted(times[2:])[len(times[2:]) // 2]
    print(f"{args.arch} {cfg.num_frames}x{cfg.img_size}x{cfg.img_size}, target {cfg.target}, loss {cfg.loss}, "
          f"batch {batch}, {device} {amp_dtype or torch.float32}, {torch.get_num_threads()} threads:\n"
          f"  step {t * 1e3:.1f} ms (median of {args.bench_steps}), {t / batch * 1e3:.1f} ms/clip, {batch / t:.1f} clips/s\n"
          f"  {flops / batch / 1e9:.1f} GFLOP per clip (fwd+bwd), achieved {flops / t / 1e9:.1f} GFLOP/s = "
          f"{flops / t / ceiling:.0%} of this device's {ceiling / 1e9:.0f} GFLOP/s matmul throughput"
          + (f"\n  measured peak memory {peak_memory_gb(device):.2f} GiB" if device.type == "cuda" else ""))
    static, acts, sk = estimate_memory_gb(model, cfg, args.micro_batch, autocast, args.mask_ratio)
    print(f"  estimated memory per GPU for {args.micro_batch} clips/forward (--micro_batch): {static + acts + sk:.1f} GiB = {static:.1f} "
          f"weights+grads+AdamW + {acts:.1f} saved activations + {sk:.1f} Sinkhorn (+10-20% allocator slack)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
