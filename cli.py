"""
What a user meets at every command line of this repository (train.py, eval_linear.py, eval_finetune.py,
eval_vos.py), written once so that the scripts behave alike:

  help that shows real defaults   an option whose default is its value prints '(default: X)'; one left at None
                                  takes its value from a recipe, a preset or the checkpoint, and its help lists
                                  those values (grouped_values) instead of 'None'
  a user's mistake                a bad option, a checkpoint that does not fit, a missing dataset folder: the
                                  message alone on stderr as '<script>: error: <message>', exit status 2, no
                                  traceback (UsageError, run_cli)
  the device                      --device cpu | cuda | cuda:N, checked at start; under torchrun every rank takes
                                  its own GPU and the process group's backend follows the device

Layering: the scripts import this file, never the other way round; it imports only library modules
(model.py for the presets and load_encoder, ranks.py for the process group).
"""
import argparse
import os
import re
import sys

import torch
import torch.distributed as dist

import ranks
from model import PRESETS, build_config, load_encoder


class UsageError(ValueError):
    """A user's mistake found after parsing (a checkpoint that does not fit, a run that cannot resume as asked, a
    dataset folder that does not hold its layout): the command line prints the message alone and exits 2."""


# What run_cli turns into a message and exit status 2: UsageError, a path that is not there (data.py names the
# layout it expected) and ranks that read different inputs (ranks.agree names them).
USER_ERRORS = (UsageError, FileNotFoundError, ranks.RanksDisagree)


def run_cli(main, prog):
    """`python <prog>`: main() -> its exit status; a user error stops with 'prog: error: <message>' and status 2,
    no traceback. main() itself raises, so that code calling it (train.py's first look, study.py, the tests) can
    catch. A main() that returns something other than an int (a results dict) exits 0."""
    try:
        result = main()
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def below_minimum(args, minimums):
    """A message for every option below its minimum: minimums [(option, lowest valid value, a valid example)]. An
    option left at None is not checked (it takes its value from elsewhere later)."""
    return [f"--{name} {getattr(args, name)}: must be >= {low}, e.g. {example}" for name, low, example in minimums
            if getattr(args, name) is not None and getattr(args, name) < low]


def invalid_options(problems):
    """One message for every problem found with the options (each names the option and a valid value)."""
    return problems[0] if len(problems) == 1 else "\n  - ".join(["invalid options:", *problems])


# ============ help ============

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's '(default: X)' after each help, except for required options, options left at None (or ""),
    whose value comes from a recipe, a preset, the dataset or the checkpoint and whose help says which, and
    helps that state their default themselves ('default: ...')."""

    def _get_help_string(self, action):
        says_it = action.required or action.default in (None, "") or "default:" in (action.help or "").lower()
        return action.help if says_it else super()._get_help_string(action)


def show(value):
    """A value as the help prints it: 0.00015, 512 512, 4 7 0.5, vit_b."""
    if isinstance(value, float):
        return f"{value:g}"
    return " ".join(map(show, value)) if isinstance(value, (tuple, list)) else str(value)


def grouped_values(by_name):
    """{name: value} -> 'value (names), ...' with the values as show() prints them, or just the value where
    every name has the same one."""
    groups = {}
    for name, value in by_name.items():
        groups.setdefault(show(value), []).append(name)
    if len(groups) == 1:
        return next(iter(groups))
    return ", ".join(f"{value} ({', '.join(names)})" for value, names in groups.items())


def preset_values(field):
    """'8 (tiny), 16 (vit_s, vit_b)': a model Config field's value in each --arch preset, for the help."""
    return grouped_values({arch: getattr(build_config(arch), field) for arch in PRESETS})


# ============ the device and the process group ============

def add_device_option(p, note):
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if a GPU is present, else "
                   f"cpu; under torchrun each rank takes cuda:LOCAL_RANK); {note}")


def resolve_device(name):
    """--device (None = the default) -> torch.device, or UsageError naming the option and a valid value. Under
    torchrun (LOCAL_RANK set) 'cuda' is the rank's own GPU, cuda:LOCAL_RANK."""
    local_rank = os.environ.get("LOCAL_RANK")
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UsageError(f"--device {name!r}: choose cpu, cuda or cuda:N (GPU N), e.g. --device cpu")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device here; use --device cpu")
    if device.index is not None and local_rank is not None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UsageError(f"--device {name}: under torchrun every rank takes its own GPU (cuda:LOCAL_RANK); "
                         "use --device cuda")
    if device.index is None and local_rank is not None:
        device = torch.device("cuda", int(local_rank))
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), e.g. --device cuda:0")
    return device


def setup_distributed(device):
    """DDP like nanoGPT: torchrun sets RANK, a plain `python <script>` is a world of one. device: resolve_device's
    (or its name). Under torchrun the process group starts here, its backend following the device: nccl on GPUs,
    gloo on the CPU (--device cpu, even on a machine with GPUs). A process that has a group already (train.py's
    first look under torchrun) uses that one. -> (rank, world size, torch.device)."""
    device = torch.device(device)
    if device.index is not None:
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    if "RANK" not in os.environ:
        return 0, 1, device
    cuda = device.type == "cuda"
    ranks.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)  # restart-safe (ranks.py)
    return dist.get_rank(), dist.get_world_size(), device


# ============ the checkpoint to evaluate ============

def open_encoder(ckpt, arch=None, **overrides):
    """model.load_encoder, with a user's mistake raised as UsageError naming the options: a file torch cannot read,
    a checkpoint that is not an encoder or does not fit --arch, a --num_frames / --img_size the model refuses
    (Config.validate). -> (encoder, cfg)."""
    given = " ".join([f"--ckpt {ckpt}"] + [f"--{k} {v}" for k, v in (("arch", arch), *overrides.items()) if v])
    try:
        return load_encoder(ckpt, arch, **overrides)
    except ValueError as err:
        raise UsageError(f"{given}: {err}") from None
    except RuntimeError as err:  # model.load_checkpoint names the file and says why it cannot be read
        if str(ckpt) not in str(err):
            raise
        raise UsageError(f"--ckpt: {err}") from None
