"""
Precision: which low-precision dtype a device computes in, and TF32 for the matmuls kept in fp32.

One rule shared by every script: train.py resolves `--precision auto` with autocast_dtype, the evaluation scripts
run under inference_autocast, and train.py enters tf32_in_fp32_regions around its loop. A file of its own because
it depends on the device, not on the model: model.py only marks the regions that stay fp32 (the frozen DINO target
and the prototype scores) and re-exports these three names, so `from model import autocast_dtype` works too.

    python precision.py      # what `--precision auto` picks on this machine
"""
import contextlib

import torch


def autocast_dtype(device):
    """The autocast dtype of `--precision auto` on `device` (train.py and every evaluation script): bf16 on GPUs with
    native bf16 (compute capability 8.0 and up: A100, H100, L4, RTX 30xx+), fp16 on older GPUs (V100, T4: the
    release trained on V100s in fp16 with a GradScaler), None = fp32 on CPU.
    Plain version: bf16 where torch.cuda.is_bf16_supported(); not used: below 8.0 it answers True and emulates
    bf16 at a fraction of the fp16 rate."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def inference_autocast(device):
    """The evaluation scripts' precision context: autocast_dtype(device), or nothing (fp32) on CPU."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def tf32_in_fp32_regions(device, precision):
    """On CUDA under bf16 / fp16 autocast, let fp32 matmuls use TF32 tensor cores: inputs keep 10 mantissa bits,
    accumulation and outputs stay fp32. --precision fp32 and CPUs: no effect.

    Plain version: leave these matmuls at full fp32; not used: TF32 runs them at ~8x the fp32 rate of an A100 / H100.
    Under autocast every other matmul already runs in bf16 / fp16, so the only fp32 matmuls left are the regions
    that switch autocast off on purpose: the frozen DINO target (SIGMA.phi) and the prototype scores
    (SIGMA.prototype_scores, forward and backward). At K = 3000, 10 mantissa bits flip no more argmax codes than
    the released fp16 path (tests/test_model.py). train.py enters this around its loop, outside the model: a
    flag flipped inside a torch.compile graph would break the graph.
    """
    if device.type != "cuda" or precision == "fp32":
        yield
        return
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # cuDNN convolutions use TF32 by default already
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


if __name__ == "__main__":
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(device)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: --precision auto is {precision}"
          + ("" if precision == "fp32" else "; the fp32 matmuls (DINO target, prototype scores) run in TF32"))
