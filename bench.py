"""
What a training step costs on this machine -- time, FLOP/s and memory -- measured and estimated without training.

    python train.py --bench --arch vit_s   # step time, clips/s, FLOP/s vs. this machine's matmul ceiling, memory
    python train.py --dry_run --dataset k400 --data_root /data/k400   # the plan of a run: batch, steps, memory
    python eval_finetune.py --bench --arch vit_b --dataset k400     # a fine-tuning step: FLOPs, memory, augmentation

These tools are not part of a training run, so they live here and train.py and eval_finetune.py read as the run
alone. The layering is one way: the scripts import this file, never the reverse; what a tool needs from the run
(the model, the optimizer's parameter groups, the autocast context, the device, the augmentation) comes in as
arguments.
"""
import copy
import json
import os
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import sinkhorn
from data import normalize, to_device, tube_mask
from model import tf32_in_fp32_regions, train_step_flops


def bench(model, cfg, args, device, autocast, precision, groups):
    """What a node delivers on one training step, timed as the loop runs it: uint8 clips and the mask copied from
    pinned host memory, normalised on the device, forward + backward + AdamW over the parameter `groups`. Prints
    the median step time (wall and process CPU time), the achieved FLOP/s as a share of this device's matmul
    ceiling at the autocast dtype (and, on CUDA, of the TF32 ceiling that the fp32 regions run at), the bytes
    copied host-to-device per step, and the measured peak memory against the estimate (estimate_memory_gb)."""
    batch = args.bench_batch or (args.micro_batch if device.type == "cuda" else min(2 * args.repeats, args.micro_batch))
    amp_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    ceiling = matmul_flops_per_second(device, amp_dtype)
    with tf32_in_fp32_regions(device, "bf16"):  # CUDA: fp32 matmuls in TF32; CPU: plain fp32
        tf32_ceiling = matmul_flops_per_second(device, torch.float32) if device.type == "cuda" else None
    flops = train_step_flops(model, batch)  # forward + backward, counted by torch on a real step (model.py)
    optimizer = torch.optim.AdamW(groups, lr=1e-5, fused=device.type == "cuda")
    step_model = torch.compile(model, backend=args.compile) if args.compile else model
    clips = torch.randint(0, 256, (batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size), dtype=torch.uint8)
    clips = clips.pin_memory() if device.type == "cuda" else clips  # (B, 3, T, H, W), as the DataLoader pins it
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, cpu_times, copied = [], [], 0
    for i in range(args.bench_steps + 2):  # two warm-up steps
        if i == 2 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        mask = tube_mask(batch, cfg.grid, args.mask_ratio)  # (B, N) on the host
        n_masked = int(mask[0].sum())
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        videos, mask = normalize(to_device(clips, device)), to_device(mask, device)  # what the loop copies
        with tf32_in_fp32_regions(device, precision):
            with autocast():
                loss = step_model(videos, mask, n_masked=n_masked, views=args.repeats)["loss"]
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        copied = clips.nbytes + mask.nbytes
    median = lambda xs: sorted(xs[2:])[len(xs[2:]) // 2]  # noqa: E731
    t, cpu = median(times), median(cpu_times)
    share = f"{flops / t / ceiling:.0%} of this device's {ceiling / 1e9:.0f} GFLOP/s {precision} matmul ceiling"
    if tf32_ceiling:
        share += f" (TF32, the fp32 regions' rate: {tf32_ceiling / 1e9:.0f} GFLOP/s)"
    print(f"{args.arch} {cfg.num_frames}x{cfg.img_size}x{cfg.img_size}, target {cfg.target}, loss {cfg.loss}, "
          f"batch {batch}, {device} {precision}, {torch.get_num_threads()} threads:\n"
          f"  step {t * 1e3:.1f} ms (median of {args.bench_steps}; process CPU time {cpu * 1e3:.1f} ms), "
          f"{t / batch * 1e3:.1f} ms/clip, {batch / t:.1f} clips/s\n"
          f"  {flops / batch / 1e9:.1f} GFLOP per clip (fwd+bwd), achieved {flops / t / 1e9:.1f} GFLOP/s = {share}\n"
          f"  host-to-device per step: {copied / 2 ** 20:.1f} MiB (uint8 clips + mask; float32 clips would be "
          f"{(4 * clips.nbytes + mask.nbytes) / 2 ** 20:.1f} MiB)")
    if device.type == "cuda":
        est = sum(estimate_memory_gb(model, cfg, batch, autocast, args.mask_ratio))
        print(f"  peak memory {peak_memory_gb(device):.2f} GiB measured vs {est:.2f} GiB estimated for {batch} clips")
    static, acts, sk = estimate_memory_gb(model, cfg, args.micro_batch, autocast, args.mask_ratio)
    print(f"  estimated memory per GPU for {args.micro_batch} clips/forward (--micro_batch): {static + acts + sk:.1f} GiB "
          f"= {static:.1f} weights+grads+AdamW + {acts:.1f} saved for backward + {sk:.1f} score/Sinkhorn temporaries "
          f"(+10-20% allocator slack)")
    return 0


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


# ============ the memory estimate: what --dry_run, --bench and the accumulation note print ============

def saved_for_backward_bytes(model, cfg, batch, autocast, mask_ratio):
    """Bytes of the tensors autograd saves for backward in one forward of `batch` clips (distinct storages;
    the parameters themselves are left out: they are counted with the weights)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[(ptr, t.dtype)] = t.untyped_storage().nbytes()
        return t

    device = model.mask_token.device
    videos = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=device)  # (B, 3, T, H, W)
    mask = tube_mask(batch, cfg.grid, mask_ratio).to(device)  # (B, N)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        model(videos, mask, views=2 if cfg.clip_loss else 1)
    return sum(saved.values()), int(mask[0].sum())


def estimate_memory_gb(model, cfg, batch, autocast, mask_ratio):
    """Per-GPU memory of a training step on `batch` clips, estimated without a GPU; (static, saved, scores) GiB.

    static: fp32 weights, grads and the two AdamW moments (16 bytes per trainable parameter; 4 per frozen one).
    saved: the tensors autograd keeps for backward, counted under the run's autocast on 1 and on 2 clips and
      extrapolated linearly, a + b * batch. The constant a holds what does not grow with the batch -- the bf16
      copies of the weights that autocast saves for the backward matmuls -- which a plain "one clip x batch"
      would multiply by the batch (overcounting ViT-B by ~40 x 0.2 GB under bf16).
    scores: the (N, K) fp32 matrices of the loss that are alive at the forward's peak but not saved: s_phi and
      s_psi, the two Sinkhorn plans (the returned codes), and one s / tau temporary -- 5 N K x 4 bytes, with
      N = batch x masked tokens per clip. The two log-probability matrices the cross-entropy saves are already
      in `saved`; the backward's (N, K) gradients (at most 2 at a time: of the log-probabilities and of the
      logits) are freed before the encoder's, so the forward peak is the larger one.
    Allocator slack and kernel workspaces are not included (add ~10-20%).

    Safe on one rank alone (train.py prints it from rank 0 only): the forwards run on a copy of the model (the
    real one's prototypes would be renormalised in place) with Sinkhorn's all-reduces switched off, so it issues
    no collective and leaves every parameter of `model` bit-identical.
    """
    model = copy.deepcopy(model)
    with sinkhorn.local_only():
        unit = 2 if cfg.clip_loss else 1  # the clip-level term needs two views of each video
        one, n_masked = saved_for_backward_bytes(model, cfg, unit, autocast, mask_ratio)
        two, _ = saved_for_backward_bytes(model, cfg, 2 * unit, autocast, mask_ratio)
    per_clip = (two - one) / unit
    fixed = one - unit * per_clip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    static = 16 * trainable + 4 * frozen
    predicted = n_masked if cfg.dec_depth else max(1, round(cfg.predict_share * n_masked))  # tokens scored per clip
    scores = 5 * 4 * batch * predicted * cfg.num_prototypes if cfg.loss == "sigma" else 0
    return static / 2 ** 30, (fixed + batch * per_clip) / 2 ** 30, scores / 2 ** 30


def device_memory_gib(device):
    """Memory of the device a rank trains on: the GPU's, or on CPU the host's RAM (the value the start-up note
    compares the memory estimate with)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30


def peak_memory_gb(device):
    """The process's peak memory so far (logged at every step as peak_mem_gb)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30  # a host-side counter: no sync
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB -> GiB (process RSS)


# ============ what a run will do: --dry_run's plan and the start-up note of a run that accumulates ============

def plan(args, cfg, model, world, accum, steps_per_epoch, num_videos, device, autocast, precision):
    """What --dry_run prints: the resolved run, without training it."""
    lr, min_lr = args.lr * args.batch_size / 256, args.min_lr * args.batch_size / 256
    static, saved, scores = estimate_memory_gb(model, cfg, args.micro_batch, autocast, args.mask_ratio)
    lines = [f"config: {json.dumps({**vars(args), 'world_size': world, 'accum': accum}, default=str)}",
             f"model: {args.arch} target={cfg.target} loss={cfg.loss}, "
             f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters; {device}, "
             f"{precision}",
             f"batch: {world} ranks x {args.micro_batch} clips x {accum} accumulation = {args.batch_size} clips per "
             f"step; Sinkhorn balances {world * args.micro_batch} clips at a time",
             f"data: {num_videos:,} videos -> {steps_per_epoch:,} steps per epoch, {steps_per_epoch * args.epochs:,} "
             f"steps in {args.epochs} epochs ({args.warmup_epochs} of warmup); lr {lr:.3g} -> {min_lr:.3g} "
             f"(--lr {args.lr:g} x {args.batch_size} / 256)",
             f"memory per rank for {args.micro_batch} clips per forward: ~{static + saved + scores:.1f} GiB = "
             f"{static:.1f} weights+grads+AdamW + {saved:.1f} saved for backward + {scores:.1f} score/Sinkhorn "
             f"temporaries (+10-20% allocator slack), of this device's {device_memory_gib(device):.0f} GiB"]
    if accum > 1:
        lines.append(accumulation_note(model, cfg, args, world, autocast, device_memory_gib(device)))
    return "\n".join(lines)


def accumulation_note(model, cfg, args, world, autocast, memory_gib):
    """The start-up note of a run that accumulates gradients: Sinkhorn's equipartition then covers each forward's
    world x micro_batch clips, not the whole step's batch_size as in the released run (K400: 16 GPUs x 40 = 640
    clips at once; 8 GPUs x 40 x 2 accumulation steps balance 320 at a time). Says whether batch_size / world
    clips per forward fit this device by the memory estimate (+20% allocator slack), and the option that uses them.
    The micro-batch is not changed automatically: it is part of the recipe (a restart on another GPU model must
    not change the result), so the choice stays on the command line."""
    full, accum = args.batch_size // world, args.batch_size // (world * args.micro_batch)
    need = sum(estimate_memory_gb(model, cfg, full, autocast, args.mask_ratio))
    fits = 1.2 * need <= memory_gib
    return (f"note: {accum} accumulation steps, so Sinkhorn balances {world * args.micro_batch} clips at a time; the "
            f"released run balanced all {args.batch_size} at once. {full} clips per GPU need ~{need:.0f} GiB "
            f"(estimate) of this device's {memory_gib:.0f} GiB: "
            + (f"they fit -- add --micro_batch {full} to balance the released batch." if fits else
               f"they do not fit; {args.batch_size // args.micro_batch} GPUs would balance it at --micro_batch "
               f"{args.micro_batch}."))


# ============ fine-tuning (eval_finetune.py --bench): FLOPs, memory and the augmentation's CPU time ============

def finetune_bench(model, cfg, transform, arch, micro_batch, randaug, num_classes):
    """A fine-tuning step of the classifier `model` (train mode), without data or a GPU: FLOPs per clip of forward
    + backward (torch.utils.flop_counter) and per-GPU memory: fp32 weights, grads and AdamW moments (16 bytes per
    parameter) + the tensors autograd saves for backward, counted on one clip under bf16 autocast and scaled to
    `micro_batch` clips (an estimate: allocator slack and workspaces not included); then the CPU time per clip of
    the training augmentation `transform` (uint8 frames (T, H, W, 3) -> clip), measured. arch, randaug and
    num_classes name what was measured in the printout."""
    videos = torch.randn(1, 3, cfg.num_frames, cfg.img_size, cfg.img_size)  # (1, 3, T, S, S)
    with FlopCounterMode(display=False) as counter:
        model(videos).sum().backward()
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(videos)
    params = sum(p.numel() for p in model.parameters())
    static, acts = 16 * params / 2 ** 30, micro_batch * sum(saved.values()) / 2 ** 30
    # The training augmentation's CPU cost per clip (one thread), on frames of K400's usual 340 x 256.
    frames = torch.randint(0, 256, (cfg.num_frames, 256, 340, 3), dtype=torch.uint8)  # (T, H, W, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.process_time()
    for _ in range(5):
        transform(frames)
    aug_ms = (time.process_time() - t0) / 5 * 1000
    torch.set_num_threads(threads)
    print(f"{arch} {cfg.num_frames}x{cfg.img_size}x{cfg.img_size}, {cfg.num_tokens} tokens, "
          f"{params:,} parameters ({num_classes} classes):\n"
          f"  {counter.get_total_flops() / 1e9:.1f} GFLOP per training clip (forward + backward)\n"
          f"  estimated memory per GPU at --micro_batch {micro_batch}: {static + acts:.1f} GiB = {static:.1f} "
          f"weights+grads+AdamW + {acts:.1f} saved activations (bf16 autocast; +10-20% allocator slack)\n"
          f"  training augmentation (--randaug {' '.join(f'{v:g}' for v in randaug)}, crop, flip): "
          f"{aug_ms:.0f} ms CPU per {cfg.num_frames}x256x340 clip on one thread, decoding not included")
    return 0
