"""
The laptop study: the paper's ablations (Table 7b, Table 6), its semantic claim and two switches of its successors,
on moving Fashion-MNIST on a 2-core CPU, with paired comparisons precise enough to tell arms apart.

An *arm* is a set of train.py flags added to one recipe (TRAIN: the tiny preset, 6 epochs of 2000 clips), trained
once per seed and read out frozen:
  headline  vos_clustering   unsupervised segmentation of 200 val clips (eval_vos.py: k-means on the tokens)
  semantic  semantic         20-NN top-1 over the 4 garment categories at the read-out a fixed rule chose
                             (semantic.py: SEMANTIC_READOUT, which block, final norm or not, standardised or not)
  also      vos_overclustering; with --linear eval_linear.py's probes; with --finetune_epochs a fine-tuned top-1;
            with --object_pooled the semantic read-out pooled over the garment's tokens and the background's
"random" is the untrained encoder every arm starts from; the supervised reference ("ceiling") is that encoder
trained with the labels, read out the same way. Arms are *paired*: a seed gives every arm the same initial
encoder, clip order, augmentation and masks, so A - B is taken seed by seed; its SE is the spread of the per-seed
differences, its p-value Student's t, Holm-corrected over the family the README calls (COMPARISONS; the
DIAGNOSTIC pairs get their uncorrected p).

    python study.py                          # every arm (5 or 3 seeds, SEEDS), and the supervised reference
    python study.py --quick                  # random / pixel / sigma, seed 0
    python study.py --arm deep="--loss sigma --proj_hidden 1024 1024 1024" --arms random sigma deep
    python study.py --compare sigma deep     # paired difference +- SE on every metric (any cached arm)
    python study.py --list                   # the cached arms, their seeds and flags
    python study.py --budget                 # the budget curve: VideoMAE, SIGMA, clip-level term at 6 / 12 / 24 epochs

Runs go --jobs at a time, one core each, cached per arm and seed under a key of the arm's resolved train.py
settings, the dataset and the code's syntax trees (TRAIN_CODE, EVAL_CODE; comments and docstrings do not count).
--reuse_same_behaviour also reuses runs and read-outs of other code whose behavioural fingerprint matches
(docs/study.md, "The cache"). Writes results.json (--results).
"""
import argparse
import functools
import hashlib
import inspect
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import data
import eval_vos
import model
import semantic
import train
from semantic import SEMANTIC_READOUT, code_digest, digest, read_source, source_digest
from synthetic import fashion_dataset, synthetic_dataset, vos_chance

HERE = Path(__file__).resolve().parent

# ============ defaults ============
HEADLINE, SEMANTIC = "vos_clustering", "semantic"
# Pretraining, identical for every arm: the tiny preset (64x64, 8 frames stride 2, 8x8 patches: 256 tokens),
# 6 epochs of 2000 clips, batch 32, lr 8e-3 x 32/256 with 1 warmup epoch then cosine to 1e-4 x 32/256.
# train.py's built-in "fashion" recipe is the same (python train.py runs the sigma arm of seed 0).
EPOCHS = 6
EPOCHS_CEILING = 40  # the supervised reference: semantic.CEILING's recipe from random init
TRAIN = ["--dataset", "fashion", "--arch", "tiny", "--batch_size", "32", "--micro_batch", "32",
         "--warmup_epochs", "1", "--lr", "8e-3", "--min_lr", "1e-4", "--weight_decay", "0.05", "--mask_ratio", "0.9",
         "--stride", "2", "--sk_eps", "0.05", "--num_prototypes", "256", "--temperature", "0.1",
         "--precision", "fp32", "--save_every", "3", "--workers", "2", "--epochs", str(EPOCHS), "--no-first_look"]
ARMS = {  # name -> train.py flags added to TRAIN (None: not trained, the shared initialisation)
    "random": None,
    "pixel": "--loss pixel",                         # VideoMAE (Table 7b)
    "sigma": "--loss sigma",                         # SIGMA-MLP, K = 256 (Table 7b, Table 6)
    "l2": "--loss l2",                               # Eq. 2: regress the jointly trained target (collapses)
    "k64": "--loss sigma --num_prototypes 64",       # Table 6 at this scale
    "k1024": "--loss sigma --num_prototypes 1024",   # Table 6 at this scale
    # The two switches of docs/forking.md. sigma_r2 is the baseline of the clip-level term: two views of each video
    # per step (--repeats 2) for half the epochs, so the same number of steps and clips as every other arm.
    "vidrop": "--loss sigma --decoder_depth 0",      # no decoder: mask tokens in the encoder (ViDROP)
    "sigma_r2": "--loss sigma --repeats 2 --epochs 3",
    "clip": "--loss sigma --repeats 2 --epochs 3 --clip_loss 1",  # + the clip-level swapped prediction
    "clip_jitter": "--loss sigma --repeats 2 --epochs 3 --clip_loss 1 --color_jitter 0.4",  # views differ in colour
    "sigma_r2_jitter": "--loss sigma --repeats 2 --epochs 3 --color_jitter 0.4",  # clip_jitter's baseline
}
FULL, QUICK = list(ARMS), ["random", "pixel", "sigma"]
# Seeds, fixed in advance: 5 for the arms the claims rest on, 3 for the rest (SEEDS_FEW).
SEEDS, SEEDS_FEW = [0, 1, 2, 3, 4], [0, 1, 2]
FEW_SEEDS_ARMS = ["l2", "k64", "clip_jitter", "sigma_r2_jitter"]
# The family of comparisons the README calls, on the headline and the semantic metric: Holm-corrected together.
COMPARISONS = [("sigma", "random"), ("pixel", "random"), ("sigma", "pixel"), ("sigma", "l2"), ("pixel", "l2"),
               ("k1024", "sigma"), ("sigma", "k64"), ("k1024", "k64"), ("vidrop", "sigma"), ("clip", "sigma_r2"),
               ("sigma_r2", "sigma"), ("clip_jitter", "clip")]
# Reported with their uncorrected p, outside the family: added after the jittered arm's first seed was seen, they
# separate the jitter's own effect on SIGMA from the clip-level term's.
DIAGNOSTIC = [("sigma_r2_jitter", "sigma_r2"), ("clip_jitter", "sigma_r2_jitter")]
CALLED_METRICS = (HEADLINE, SEMANTIC)
ALPHA = 0.05
# The VOS read-out: consecutive frames, k-means on L2-normalised tokens, 200 clips (eval_vos.py --help).
VOS = ["--sampling", "consecutive", "--features", "l2"]
LINEAR = ["--probes", "linear_converged,knn"]
COLUMNS = {"vos_clustering": "VOS clustering mIoU", "semantic": "semantic 20-NN top-1",
           "vos_overclustering": "VOS overclustering mIoU", "knn": "20-NN top-1 (last block)", "finetune": "fine-tuned top-1",
           "linear_converged": "converged linear top-1", "linear": "Table 9 head top-1",
           "object": "object-pooled 20-NN", "background": "background-pooled 20-NN", "whole": "whole-clip 20-NN"}
# The code each step runs (imported modules included): its syntax trees are part of the cache key.
TRAIN_CODE = ["train.py", "cli.py", "monitor.py", "bench.py", "model.py", "precision.py", "sinkhorn.py", "data.py",
              "store.py", "synthetic.py", "ranks.py"]
# The supervised reference's training (semantic.fine_tune and what it imports; its functions are in its key).
CEILING_CODE = ["model.py", "precision.py", "data.py", "store.py", "synthetic.py", "sinkhorn.py"]
EVAL_CODE = ["eval_vos.py", "eval_linear.py", "cli.py", "probes.py", "model.py", "precision.py", "data.py", "store.py",
             "synthetic.py", "ranks.py"]
# The behavioural fingerprint (--reuse_same_behaviour): train.py on 12 fixed synthetic videos, 3 steps of 4 clips
# in one process at one thread; the data pipeline's clips of 3 of those videos; the arm's lr schedule at 8 steps
# of its epochs (at a nominal 100 steps an epoch).
FINGERPRINT_VIDEOS = dict(num_train=12, num_val=1, num_frames=16, size=64, num_vos=0)
FINGERPRINT_RUN = ["--dataset", "synthetic", "--batch_size", "4", "--micro_batch", "4", "--epochs", "1",
                   "--warmup_epochs", "0", "--workers", "0", "--seed", "0", "--save_every", "1", "--log_every", "1",
                   "--no-first_look"]
FINGERPRINT_CLIPS = (0, 5, 11)
FINGERPRINT_LR_STEPS = 8


# ============ cache keys ============


def settings(flags):
    """An arm's train.py options as train.py resolves them (TRAIN + flags + the recipe's defaults), without where
    its files go and its seed (the folder below the key) -> dict, or None for the untrained arm."""
    if flags is None:
        return None
    resolved = vars(train.get_args([*TRAIN, *shlex.split(flags)]))
    return json.loads(json.dumps({k: v for k, v in resolved.items() if k not in ("out", "data_root", "seed")}))


def run_key(flags, dataset_params):
    """Everything a pretrained checkpoint depends on (the seed is the folder below it)."""
    return digest(settings(flags), dataset_params, code_digest(TRAIN_CODE))


def eval_key():
    return digest(VOS, LINEAR, code_digest(EVAL_CODE))


def arm_folder(arm, flags, params, out, reuse=False, evaluated=None):
    """The folder of an arm's runs (one seed<s> folder each) -> Path. Its arm.json holds the arm's name, flags,
    settings, dataset and code digest, and the fingerprint of the code that trained it (computed when the folder
    is first used; for the untrained arm, eval_behaviour's checksum of the initial encoder's tokens). By
    default the folder is the one keyed by run_key. reuse (--reuse_same_behaviour): when that one does not exist
    yet, an existing folder of this arm whose fingerprint, dataset and settings match."""
    record = dict(arm=arm, flags=flags, settings=settings(flags), dataset=params, code=code_digest(TRAIN_CODE))
    folder = Path(out) / f"{arm}-{run_key(flags, params)}"
    if (folder / "arm.json").exists():
        return folder
    record["fingerprint"] = behaviour(flags, out) if flags is not None else evaluated and evaluated()["behaviour"]
    if record["fingerprint"] is not None:
        for other, stored in reversed(cached_arms(out) if reuse else []):  # the newest first
            if stored["arm"] == arm and same_behaviour(stored, record):
                print(f"{arm}: reusing {other} (same behaviour, other code)", flush=True)
                return other
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arm.json").write_text(json.dumps(record, indent=1))
    return folder


def same_behaviour(stored, record):
    """--reuse_same_behaviour: a cached arm trains like this one if its fingerprint and dataset are the same, and so
    is every train.py setting both know (an option added or removed since is no difference by itself: what it
    changes shows in the fingerprint)."""
    if stored.get("fingerprint") != record["fingerprint"] or stored["dataset"] != record["dataset"]:
        return False
    if stored["settings"] is None or record["settings"] is None:  # the untrained arm
        return stored["settings"] == record["settings"]
    both = stored["settings"].keys() & record["settings"].keys()
    return all(stored["settings"][k] == record["settings"][k] for k in both)


def cached_arms(out):
    """Every arm folder under `out` -> [(folder, its arm.json)], the oldest first."""
    files = sorted(Path(out).glob("*/arm.json"), key=lambda f: f.stat().st_mtime)
    return [(f.parent, json.loads(f.read_text())) for f in files]


def list_cache(out):
    """--list: one line per cached arm folder: name, the seeds with results, flags, folder, and whether it was
    trained by the current code."""
    code, lines = code_digest(TRAIN_CODE), []
    for folder, arm in cached_arms(out):
        done = "done" if arm["flags"] is not None else "vos-*.json"  # trained, or (random) read out
        seeds = sorted(int(s.name.removeprefix("seed")) for s in folder.glob("seed*") if any(s.glob(done)))
        lines.append(f"{arm['arm']:10s} seeds {' '.join(map(str, seeds)) or '-':8s} {arm['flags'] or '(not trained)'}"
                     f"   [{folder.name}{'' if arm['code'] == code else ', other code'}]")
    return "\n".join(lines) or f"no arms cached in {out}"


# ============ behavioural fingerprint ============

def fingerprint(flags, work):
    """What the code does for an arm with these flags, in a few seconds, in folder `work` -> dict: the logged losses
    and a checksum of the weights after FINGERPRINT_RUN (3 steps of train.py on 12 fixed synthetic videos), a
    checksum of the clips the data pipeline makes of 3 of them, and the arm's lr schedule at a few steps. At one
    thread, so that the same code gives the same bits on one machine."""
    work = Path(work)
    videos = synthetic_dataset(work / "videos", seed=0, **FINGERPRINT_VIDEOS)
    argv = [*TRAIN, *shlex.split(flags), *FINGERPRINT_RUN, "--data_root", str(videos), "--out", str(work / "run")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if train.main(argv):
            raise RuntimeError(f"the fingerprint run stopped early (NaN loss or collapse): see {work / 'run'}")
        args = train.get_args(argv)
        dataset, _ = train.build_loader(args, train.check_args(args, 1), {"bad_videos.txt": work / "bad_videos.txt"})
        clips = [(str(i), dataset[i][0]) for i in FINGERPRINT_CLIPS]  # uint8 (3, T, S, S) each
    finally:
        torch.set_num_threads(threads)
    weights = model.load_checkpoint(work / "run" / "ckpt.pth")["model"]
    log = (work / "run" / "log.jsonl").read_text().splitlines()
    arm = train.get_args([*TRAIN, *shlex.split(flags)])
    total, warmup = 100 * arm.epochs, 100 * arm.warmup_epochs
    return dict(losses=[{k: v for k, v in json.loads(line).items() if k.startswith("loss")} for line in log],
                weights=tensor_digest(sorted(weights.items())), data=tensor_digest(clips),
                lr=[train.lr_at(s, total, warmup, arm.lr, arm.min_lr)
                    for s in range(0, total, total // FINGERPRINT_LR_STEPS)])


def tensor_digest(named):
    """sha256 (16 hex digits) of [(name, tensor)]: names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def behaviour(flags, out):
    """fingerprint() in a process of its own at one thread, importing the code in HERE as a run does -> dict.
    Its output is appended to <out>/fingerprint.log."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as work:
        code = ("import json, sys, study; a = sys.argv[1:]; "
                "open(a[1] + '/fingerprint.json', 'w').write(json.dumps(study.fingerprint(a[0], a[1])))")
        run([sys.executable, "-c", code, flags, work], out / "fingerprint.log", threads=1)
        return json.loads((Path(work) / "fingerprint.json").read_text())


def eval_behaviour(root, out):
    """What the read-outs' code does, for --reuse_same_behaviour: the syntax trees of the evaluation-only code
    (eval_vos.py, eval_linear.py, probes.py and semantic.py's read-out functions) and, for the modules they share
    with training, a checksum of the initial tiny encoder's tokens (seed 0) on the first two val clips and on the
    first VOS clip as the read-outs load them, with that clip's masks. In a process of its own at one thread."""
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(dir=out) as work:
        code = ("import json, sys, study; a = sys.argv[1:]; "
                "open(a[1] + '/eval.json', 'w').write(json.dumps(study.eval_fingerprint(a[0])))")
        run([sys.executable, "-c", code, str(root), work], out / "fingerprint.log", threads=1)
        return json.loads((Path(work) / "eval.json").read_text())


def eval_fingerprint(root):
    root = Path(root)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    encoder, cfg = model.load_encoder("random", "tiny")
    encoder.eval()
    clips = data.build_video_dataset("synthetic", root, "val", num_frames=cfg.num_frames, size=cfg.img_size,
                                     stride=2, train=False)
    vos = eval_vos.VOSDataset(root / "davis", "davis2017", clip_len=16, size=cfg.img_size, sampling="consecutive")[0]
    x = torch.stack([clips[0][0], clips[1][0], vos["frames"][:, :cfg.num_frames]])  # (3, 3, T, S, S) uint8
    with torch.no_grad():
        tokens = encoder(data.normalize(x))
    code = lambda *files: {f: source_digest(read_source(f)) for f in files}
    return dict(vos=digest(code("eval_vos.py", "cli.py"), VOS), linear=digest(code("eval_linear.py", "cli.py",
                "probes.py"), LINEAR), semantic=digest(code("probes.py"), semantic_functions()),
                object=digest(code("probes.py"), object_functions()),
                behaviour=tensor_digest([("clips", x), ("masks", vos["masks"]), ("tokens", tokens)]))


def readout_fingerprint(evaluated, kind):
    """The part of eval_behaviour's fingerprint that a read-out of `kind` (vos, linear, semantic, object) depends
    on: the code of that read-out and the shared modules' behaviour."""
    fp = evaluated()
    return {"code": fp[kind], "behaviour": fp["behaviour"]}


def readout_path(folder, kind, key, evaluated=None, reuse=False):
    """Where the read-out `kind` (vos, linear, semantic, object) of a run goes: <folder>/<kind>-<key>.json.
    reuse: when that does not exist, an existing read-out of this kind whose recorded eval fingerprint equals
    `evaluated()` (made by other code that reads out the same way), if there is one. Fingerprints are recorded in
    <folder>/readouts.json."""
    path = folder / f"{kind}-{key}.json"
    if path.exists() or not reuse:
        return path
    known = json.loads((folder / "readouts.json").read_text()) if (folder / "readouts.json").exists() else {}
    same = [name for name, fp in known.items() if name.startswith(kind + "-") and (folder / name).exists()
            and fp == readout_fingerprint(evaluated, kind)]
    return folder / same[-1] if same else path


def remember_readout(path, evaluated):
    """Record the eval fingerprint of the code that wrote the read-out at `path` (readout_path reads it); evaluated:
    a function that returns it (computed once per command), or None."""
    if evaluated is None:
        return
    index = path.parent / "readouts.json"
    known = json.loads(index.read_text()) if index.exists() else {}
    kind = path.name.split("-")[0]
    index.write_text(json.dumps({**known, path.name: readout_fingerprint(evaluated, kind)}, indent=1))


# ============ one arm, one seed ============

def run(cmd, log, threads=None):
    """Run one of the repository's scripts, its output appended to `log`; stop on failure. Returns the CPU
    minutes of that process and its children (its data workers), read from its own resource usage, so runs
    going on at the same time do not count against each other. threads: torch's intra-op threads (OMP)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"failed: {shlex.join(cmd)} (see {log})")
    return (usage.ru_utime + usage.ru_stime) / 60


def measure(arm, flags, seed, root, arm_dir, threads=None, finetune_epochs=0, train_only=False, linear_probes=False,
            evaluated=None, reuse=False, object_pooled=False):
    """Pretrain (unless flags is None) and read out one arm at one seed in <arm_dir>/seed<seed> (arm_folder) -> its
    results.json row (percent), with the per-clip VOS scores under "clips" (for clip-level pairing);
    finetune_epochs > 0: also fine-tune its encoder with the labels (semantic.fine_tune). train_only: pretrain,
    then return None. linear_probes: also eval_linear.py's read-outs (LINEAR); object_pooled: also
    semantic.object_readout. evaluated: eval_behaviour of this code, recorded with each read-out; reuse: take a
    read-out made by other code with the same one (readout_path). The scripts' output goes to the run folder's
    run.log."""
    py = sys.executable
    folder = Path(arm_dir) / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "run.log"
    cpu = json.loads((folder / "cpu.json").read_text()) if (folder / "cpu.json").exists() else {}
    if flags is None:
        ckpt = ["--ckpt", "random", "--arch", "tiny", "--seed", str(seed)]
    else:
        ckpt = ["--ckpt", str(folder / "ckpt.pth")]
        if not (folder / "done").exists():
            # An arm may pretrain on another set (e.g. --dataset noise, SMILE's no-natural-video clips): then that
            # set's own default root; it is still read out on moving Fashion-MNIST like every arm.
            data_root = [] if "--dataset" in shlex.split(flags) else ["--data_root", str(root)]
            cpu["train"] = run([py, "train.py", *TRAIN, *data_root, *shlex.split(flags),
                                "--seed", str(seed), "--out", str(folder)], log, threads)
            (folder / "done").touch()
            (folder / "cpu.json").write_text(json.dumps(cpu))
    if train_only:
        return None
    row = read_outs(arm, seed, ckpt, folder, root, cpu, threads, linear_probes, object_pooled, evaluated, reuse)
    tuned = folder / f"finetune-{fine_tune_key(finetune_epochs)}.json"
    if finetune_epochs and not tuned.exists():
        cpu["finetune"] = run_fine_tune(ckpt[1], root, seed, finetune_epochs, tuned, log, threads)
        (folder / "cpu.json").write_text(json.dumps(cpu))
    return {**row, "finetune": json.loads(tuned.read_text())["top1"]} if finetune_epochs else row


def read_outs(arm, seed, ckpt, folder, root, cpu, threads=None, linear_probes=False, object_pooled=False,
              evaluated=None, reuse=False):
    """Every read-out of one encoder (ckpt: the read-out scripts' --ckpt ... options) that is not in `folder` yet:
    VOS, the semantic candidates, and on request eval_linear.py's probes and the object-pooled diagnostic. Adds
    their CPU minutes to `cpu` (saved as <folder>/cpu.json) -> the run's results.json row (make_row)."""
    py, log = sys.executable, folder / "run.log"
    ekey = eval_key()
    vos, linear, semantic, objects = (readout_path(folder, kind, key, evaluated, reuse) for kind, key in
                                      (("vos", ekey), ("linear", ekey), ("semantic", semantic_key()),
                                       ("object", object_key())))
    if not vos.exists():
        cpu["vos"] = run([py, "eval_vos.py", *ckpt, "--dataset", "davis2017", "--data_root", str(root / "davis"),
                          *VOS, "--out", str(vos)], log, threads)
        remember_readout(vos, evaluated)
    if linear_probes and not linear.exists():
        cpu["linear"] = run([py, "eval_linear.py", *ckpt, "--dataset", "synthetic", "--data_root", str(root),
                             *LINEAR, "--out", str(linear)], log, threads)
        remember_readout(linear, evaluated)
    if not semantic.exists():
        cpu["semantic"] = run_readout("semantic_readout", ckpt[1], root, seed, semantic, log, threads)
        remember_readout(semantic, evaluated)
    if object_pooled and not objects.exists():
        cpu["object"] = run_readout("object_readout", ckpt[1], root, seed, objects, log, threads)
        remember_readout(objects, evaluated)
    (folder / "cpu.json").write_text(json.dumps(cpu))
    row = make_row(arm, seed, json.loads(vos.read_text()), json.loads(linear.read_text()) if linear_probes else None,
                   folder, cpu, json.loads(semantic.read_text()))
    return {**row, **json.loads(objects.read_text())["val"]} if object_pooled else row


def make_row(arm, seed, seg, lin, folder, cpu, sem):
    lin = lin or {}
    row = dict(method=arm, seed=seed, vos_clustering=100 * seg["mean"]["clustering"],
               vos_overclustering=100 * seg["mean"]["overclustering"],
               **({"linear": lin["top1"]} if lin else {}),
               **{name: probe["top1"] for name, probe in lin.get("probes", {}).items()},
               clips={k: [100 * c[k] for c in seg["clips"]] for k in ("clustering", "overclustering")},
               cpu_min={k: round(v, 2) for k, v in cpu.items()}, readouts=sem)
    if SEMANTIC_READOUT:  # the rule's read-out, and what the tokens have become at its layer
        layer = SEMANTIC_READOUT.split("/")[0]
        row.update(semantic=sem["val"][SEMANTIC_READOUT], **{k: sem[k][layer] for k in
                   ("within_clip_similarity", "max_channel_ratio", "effective_rank")})
    log = folder / "log.jsonl"
    if log.exists():  # the collapse monitors of the last training step
        last = json.loads(log.read_text().splitlines()[-1])
        row.update({k: last[k] for k in ("target_std", "protos_used") if k in last})
    return row


def run_readout(name, ckpt, root, seed, out, log, threads):
    """semantic.<name>(ckpt, root, seed, out) -- semantic_readout or object_readout -- in its own process -> its
    CPU minutes."""
    code = f"import sys, semantic; a = sys.argv[1:]; semantic.{name}(a[0], a[1], int(a[2]), a[3])"
    return run([sys.executable, "-c", code, str(ckpt), str(root), str(seed), str(out)], log, threads)


def trees(*functions):
    """The syntax trees (docstrings removed) of functions, for a cache key."""
    return [source_digest(textwrap.dedent(inspect.getsource(f))) for f in functions]


def semantic_key():
    """What a semantic read-out depends on besides the encoder: its functions and the code they call."""
    return digest(code_digest(["model.py", "data.py", "probes.py", "synthetic.py"]), semantic_functions())


def semantic_functions():
    """The semantic read-out's own code: semantic.READOUT_BANK and the syntax trees of its functions."""
    return digest(semantic.READOUT_BANK, trees(semantic.semantic_readout, semantic.readout_names, semantic.decoded))


def object_key():
    """What an object-pooled read-out depends on besides the encoder: its functions and the code they call."""
    return digest(code_digest(["model.py", "data.py", "probes.py", "synthetic.py"]), object_functions())


def object_functions():
    """The object-pooled read-out's own code: the read-out it pools and the syntax trees of its functions."""
    return digest(SEMANTIC_READOUT, semantic.OBJECT_POOLS, trees(semantic.object_readout, semantic.object_shares,
                                                                 semantic.pooled_where, semantic.decoded))


def readout_rule(args, root, params):
    """--choose_readout: the supervised reference and random init at the first seed, read out on the held-out
    train clips; prints every candidate's gap, best first -> (choice, gaps)."""
    seed, reuse = args.seeds[0], args.reuse_same_behaviour
    evaluated = functools.cache(lambda: eval_behaviour(root, args.out))
    reference = ceiling(root, params, seed, args.ceiling_epochs, args.out, None, args.linear, evaluated, reuse)
    random_init = measure("random", None, seed, root, arm_folder("random", None, params, args.out, reuse, evaluated),
                          None, evaluated=evaluated, reuse=reuse)
    choice, gaps = semantic.choose_readout(reference["readouts"], random_init["readouts"])
    print("\n".join(f"{name:12s} reference - random init, held-out train 20-NN: {gap:+5.1f}  (reference "
                    f"{reference['readouts']['holdout'][name]:.1f}, random init {random_init['readouts']['holdout'][name]:.1f})"
                    for gap, name in gaps) + f"\nthe rule's read-out: {choice}")
    return choice, gaps


def run_fine_tune(ckpt, root, seed, epochs, out, log, threads, save_encoder=False):
    """fine_tune in its own process, like the arms' scripts (its CPU minutes are its own) -> CPU minutes."""
    code = ("import sys, semantic; a = sys.argv[1:]; "
            "semantic.fine_tune(a[0], a[1], int(a[2]), int(a[3]), a[4], save_encoder=a[5] == 'save')")
    return run([sys.executable, "-c", code, str(ckpt), str(root), str(seed), str(epochs), str(out),
                "save" if save_encoder else "-"], log, threads)


def fine_tune_key(epochs):
    """What a fine-tuning result depends on besides the encoder: the recipe and its code."""
    return digest(epochs, semantic.CEILING, trees(semantic.fine_tune, semantic.train_classifier, semantic.decoded,
                                                  semantic.augment))


def reference_record(epochs, params, evaluated):
    """What --reuse_same_behaviour compares to reuse a supervised reference trained by other code: its recipe and
    functions (fine_tune_key), the dataset, and eval_behaviour's checksum of the initial encoder on decoded clips."""
    return dict(recipe=fine_tune_key(epochs), dataset=params, behaviour=evaluated()["behaviour"])


def ceiling(root, params, seed, epochs, out, threads=None, linear_probes=False, evaluated=None, reuse=False,
            object_pooled=False):
    """The supervised reference (semantic.fine_tune from the seed's initial encoder for `epochs`): its frozen
    read-outs and its own top-1 -> {metric: value}. evaluated, reuse: as for measure() (also for the reference
    itself)."""
    key = digest(fine_tune_key(epochs), params, code_digest(CEILING_CODE))
    folder = Path(out) / f"supervised-{key}" / f"seed{seed}"
    if reuse and not (folder / "supervised.json").exists():  # the same recipe, trained by code that behaves alike
        same = [f for f in Path(out).glob(f"supervised-*/seed{seed}/supervised.json") if
                json.loads((f.parent / "reference.json").read_text()) == reference_record(epochs, params, evaluated)]
        folder = same[-1].parent if same else folder
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "run.log"
    cpu = json.loads((folder / "cpu.json").read_text()) if (folder / "cpu.json").exists() else {}
    if not (folder / "supervised.json").exists():
        cpu["train"] = run_fine_tune("random", root, seed, epochs, folder / "supervised.json", log, threads,
                                     save_encoder=True)
        if evaluated is not None:
            (folder / "reference.json").write_text(json.dumps(reference_record(epochs, params, evaluated)))
    row = read_outs("supervised", seed, ["--ckpt", str(folder / "supervised.pth"), "--arch", "tiny"], folder, root,
                    cpu, threads, linear_probes, object_pooled, evaluated, reuse)
    return {k: row[k] for k in COLUMNS if k in row} | {
        "supervised_top1": json.loads((folder / "supervised.json").read_text())["top1"], "readouts": row["readouts"]}


# ============ the budget curve ============
# How the gaps grow with pretraining. One longer run per arm and seed (BUDGET_MULTIPLES x the arm's epochs, its
# cosine schedule stretched over the longest), stopped and read out at every multiple, so a fork can tell whether
# its budget can show a semantic effect at all. The checkpoint at 1x is not the 6-epoch arm's (its lr has not
# decayed yet). A description at 2 seeds: no comparison in it is tested (Holm) or called.
BUDGET_ARMS, BUDGET_SEEDS, BUDGET_MULTIPLES = ["pixel", "sigma", "clip"], [0, 1], (1, 2, 4)


def longer(flags):
    """An arm's flags for the budget curve's longest run."""
    epochs = train.get_args([*TRAIN, *shlex.split(flags)]).epochs  # the arm's own (3 with --repeats 2)
    return f"{flags} --epochs {epochs * max(BUDGET_MULTIPLES)}"


def measure_budget(arm, flags, seed, root, arm_dir, threads=None, evaluated=None, reuse=False):
    """Pretrain one arm at one seed with longer(flags) in stages, keeping the checkpoint at every multiple of its
    epochs (<arm_dir>/seed<seed>/x<m>/ckpt.pth), and read each out -> one results row per multiple, with "budget":
    the epochs that the study's 6-epoch arms run for the same number of steps (EPOCHS x m). A stage's cpu.json
    "train" is the CPU minutes of its own epochs: the run's cost up to a stage is the sum over the stages so far."""
    epochs = train.get_args([*TRAIN, *shlex.split(flags)]).epochs // max(BUDGET_MULTIPLES)
    folder = Path(arm_dir) / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in BUDGET_MULTIPLES:
        stage = folder / f"x{m}"
        stage.mkdir(exist_ok=True)
        cpu = json.loads((stage / "cpu.json").read_text()) if (stage / "cpu.json").exists() else {}
        if not (stage / "ckpt.pth").exists():
            # train.py resumes from <folder>/ckpt.pth: its epoch says how far an interrupted stage got.
            done = model.load_checkpoint(folder / "ckpt.pth")["epoch"] if (folder / "ckpt.pth").exists() else 0
            if done > epochs * m:
                sys.exit(f"{stage}: its checkpoint (epoch {epochs * m}) is missing and the run in {folder} is at "
                         f"epoch {done}; delete {folder} to run it again")
            if done < epochs * m:
                data_root = [] if "--dataset" in shlex.split(flags) else ["--data_root", str(root)]  # as in measure
                cpu["train"] = run([sys.executable, "train.py", *TRAIN, *data_root, *shlex.split(flags),
                                    "--max_epochs_this_run", str(epochs * m - done), "--seed", str(seed),
                                    "--out", str(folder)], folder / "run.log", threads)
                (stage / "cpu.json").write_text(json.dumps(cpu))  # before the read-outs: a later command keeps it
            partial = stage / f"ckpt.pth.tmp{os.getpid()}"
            shutil.copyfile(folder / "ckpt.pth", partial)
            os.replace(partial, stage / "ckpt.pth")
        if not (stage / "log.jsonl").exists():  # the run's log up to this stage: make_row's collapse monitors
            lines = (folder / "log.jsonl").read_text().splitlines()
            (stage / "log.jsonl").write_text("".join(line + "\n" for line in lines
                                                     if json.loads(line)["epoch"] <= epochs * m + 1e-6))
        rows.append({**read_outs(arm, seed, ["--ckpt", str(stage / "ckpt.pth")], stage, root, cpu, threads,
                                 evaluated=evaluated, reuse=reuse), "budget": EPOCHS * m})
    return rows


def budget_study(args, root, params):
    """--budget: every arm's longer run at every seed (random init: the study's own, at budget 0; --cached: only
    the runs that reached their last stage), the table of the semantic and VOS read-outs over the budget and each
    arm - random init at each -> results dict."""
    evaluated = functools.cache(lambda: eval_behaviour(root, args.out))
    reuse, threads = args.reuse_same_behaviour, 1 if args.jobs > 1 else None
    start = arm_folder("random", None, params, args.out, reuse, evaluated)
    flags = {arm: longer(args.arm_flags[arm]) for arm in args.arms if arm != "random"}
    folders = {arm: arm_folder(arm, f, params, Path(args.out) / "budget", reuse, evaluated) for arm, f in flags.items()}
    with ThreadPoolExecutor(args.jobs) as pool:
        starts = [pool.submit(measure, "random", None, s, root, start, threads, evaluated=evaluated, reuse=reuse)
                  for s in args.seeds]
        runs = [pool.submit(measure_budget, arm, f, s, root, folders[arm], threads, evaluated, reuse)
                for s in args.seeds for arm, f in flags.items() if not args.cached or
                (folders[arm] / f"seed{s}" / f"x{max(BUDGET_MULTIPLES)}" / "ckpt.pth").exists()]
        rows = [{**f.result(), "budget": 0} for f in starts] + [row for f in runs for row in f.result()]
    budgets = sorted({r["budget"] for r in rows})
    lines = [f"budget curve: {', '.join(flags)} pretrained for up to {EPOCHS * max(BUDGET_MULTIPLES)} epochs' steps, "
             f"read out at {', '.join(str(b) for b in budgets[1:])}; seeds {args.seeds} (mean over seeds, %)", "",
             "| metric | arm | " + " | ".join(f"{b} epochs" for b in budgets) + " |", "|---" * (len(budgets) + 2) + "|"]
    for metric in CALLED_METRICS:
        for arm in ["random", *flags]:
            cells = [statistics.mean(v) if (v := [r[metric] for r in rows if r["method"] == arm and r["budget"] == b])
                     else None for b in budgets]
            seeds = sorted({r["seed"] for r in rows if r["method"] == arm})
            lines.append(f"| {COLUMNS[metric]} | {arm} (seeds {' '.join(map(str, seeds))}) | " +
                         " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    pairs = []
    for b in budgets[1:]:
        at = [r for r in rows if r["budget"] in (0, b)]
        pairs += [{**p, "budget": b} for a, c in [*((arm, "random") for arm in flags), ("sigma", "pixel")]
                  for m in CALLED_METRICS if a in flags and c in ["random", *flags] and (p := paired(at, a, c, m))]
    text = "\n".join(lines) + "\n\npaired differences (± standard error over seeds):\n" + \
        "\n".join(f"at {p['budget']:2d} epochs: {pair_line(p)}" for p in pairs)
    print("\n" + text)
    results = dict(budget_multiples=BUDGET_MULTIPLES, epochs=EPOCHS, rows=[{k: v for k, v in r.items() if k != "clips"}
                   for r in rows], pairs=pairs, table=text, flags=flags)
    with open(args.results, "w") as f:
        json.dump(results, f, indent=1)
    return results


# ============ paired comparisons ============

def paired(rows, a, b, metric):
    """A - B on `metric`, paired by seed. With two or more seeds the SE is the spread of the per-seed
    differences / sqrt(seeds); with one seed (VOS metrics only) it is the clip-level SE of that seed's
    per-clip differences, which measures the evaluation's noise but not the training seed's."""
    by = {(r["method"], r["seed"]): r for r in rows}
    seeds = sorted(s for (m, s) in by if m == a and (b, s) in by and metric in by[(a, s)] and metric in by[(b, s)])
    if not seeds:
        return None
    diffs = [by[(a, s)][metric] - by[(b, s)][metric] for s in seeds]
    out = dict(a=a, b=b, metric=metric, diff=statistics.mean(diffs), seeds=seeds, se=None, se_from="seeds")
    if len(seeds) > 1:
        # Top-1 on 500 clips moves in steps of 0.2, so two seeds can differ by exactly the same amount; their
        # spread is then float32 rounding (~1e-6), not a tiny SE: it is 0, and such a pair gets no t-test.
        spread = statistics.stdev(diffs)
        out["se"] = spread / math.sqrt(len(seeds)) if spread > 1e-4 else 0.0
    clip_key = metric.removeprefix("vos_")
    if clip_key in by[(a, seeds[0])].get("clips", {}):
        # The evaluation's share: per seed, the SE of the mean of the per-clip differences; averaged in quadrature
        # over seeds and divided by sqrt(seeds), it is what the SE would be if training were deterministic.
        ses = [np.std(np.subtract(by[(a, s)]["clips"][clip_key], by[(b, s)]["clips"][clip_key]), ddof=1) /
               math.sqrt(len(by[(a, s)]["clips"][clip_key])) for s in seeds]
        out["se_clips"] = float(math.sqrt(np.mean(np.square(ses)) / len(seeds)))
        if len(seeds) == 1:
            out["se"], out["se_from"] = out["se_clips"], "clips"
    return out


def holm(pairs, family):
    """Two-sided paired t-test p-values (n - 1 degrees of freedom) for every pair of 2+ seeds, Holm-corrected over
    the pairs in `family` (p_holm, and called = p_holm < ALPHA, on those only), in place."""
    from scipy.stats import t as student_t
    tested = [p for p in pairs if p["se"] and len(p["seeds"]) > 1]
    for p in tested:
        p["p"] = float(2 * student_t.sf(abs(p["diff"] / p["se"]), len(p["seeds"]) - 1))
    tested = [p for p in tested if any(p is q for q in family)]
    running = 0.0
    for i, p in enumerate(sorted(tested, key=lambda p: p["p"])):  # Holm: k-th smallest x (m - k + 1), monotone
        running = max(running, min(1.0, (len(tested) - i) * p["p"]))
        p["p_holm"], p["called"] = running, running < ALPHA
    return pairs


def pair_line(p):
    se = "n/a" if p["se"] is None else f"{p['se']:.1f}"
    z = "" if not p["se"] else f" = {p['diff'] / p['se']:+.1f} SE"
    extra = f", of which evaluation {p['se_clips']:.1f}" if "se_clips" in p and p["se_from"] == "seeds" else ""
    test = ""
    if "p_holm" in p:  # in the family the README calls
        test = f"; p = {p['p']:.3f}, Holm {p['p_holm']:.3f}: {'called' if p['called'] else 'not called'}"
    elif "p" in p:  # a DIAGNOSTIC pair
        test = f"; p = {p['p']:.3f}, outside the corrected family"
    elif p["se"] == 0:  # see paired()
        test = "; the same difference at every seed: no t-test"
    return (f"{p['a']} - {p['b']} {COLUMNS[p['metric']]}: {p['diff']:+.1f} ± {se}{z} "
            f"(seeds {p['seeds']}, SE from {p['se_from']}{extra}{test})")


def table(rows, note):
    def cell(arm, key):
        values = [r[key] for r in rows if r["method"] == arm and key in r]
        if not values:
            return "-"
        return f"{values[0]:.1f}" if len(values) == 1 else f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    keys = [k for k in COLUMNS if any(k in r for r in rows)]
    lines = [note, "", "| arm | flags | " + " | ".join(COLUMNS[k] for k in keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for arm in dict.fromkeys(r["method"] for r in rows):
        flags = next(r["flags"] for r in rows if r["method"] == arm)
        lines.append(f"| {arm} | {flags or '(not trained)'} | " + " | ".join(cell(arm, k) for k in keys) + " |")
    return "\n".join(lines)


# ============ command line ============

def parse_arm(text):
    name, sep, flags = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"--arm {text!r}: write NAME=\"train.py flags\", e.g. "
                                         f"deep=\"--loss sigma --proj_hidden 1024 1024 1024\"")
    return name, flags.strip()


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"arms {' '.join(QUICK)}, seed 0")
    p.add_argument("--arm", type=parse_arm, action="append", default=[], metavar='NAME="FLAGS"',
                   help="define (or redefine) an arm as train.py flags added to the recipe; repeatable")
    p.add_argument("--arms", nargs="+", default=None, help=f"arms to run (default: {' '.join(FULL)}; --quick: "
                   f"{' '.join(QUICK)}; with --arm: random, sigma and the new arms)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default: {' '.join(map(str, SEEDS))}, and "
                   f"{' '.join(map(str, SEEDS_FEW))} for {', '.join(FEW_SEEDS_ARMS)} (--quick: 0)")
    p.add_argument("--linear", action="store_true", help="also run eval_linear.py's read-outs (converged linear, "
                   "20-NN of the last block, Table 9's head: ~1.1 CPU-minutes a run)")
    p.add_argument("--budget", action="store_true", help=f"the budget curve: arms {' '.join(BUDGET_ARMS)} (or "
                   f"--arms), seeds {' '.join(map(str, BUDGET_SEEDS))} (or --seeds), pretrained "
                   f"{max(BUDGET_MULTIPLES)}x longer and read out at {', '.join(f'{m}x' for m in BUDGET_MULTIPLES)} "
                   "the arm's epochs, against random init")
    p.add_argument("--object_pooled", action="store_true", help="also the object-pooled diagnostic: the semantic "
                   "read-out pooled over the garment's tokens, the background's and all (~1.3 CPU-minutes a run)")
    p.add_argument("--choose_readout", action="store_true", help="apply the semantic read-out rule (the supervised "
                   "reference and random init at the first seed, held-out train clips), print its ranking and exit")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                   help="run (or read from the cache) arms A and B only, then print A - B on every metric; an arm "
                   "run before in --out needs no --arm (its flags are in its arm.json)")
    p.add_argument("--train_only", action="store_true", help="pretrain the arms' runs that are not cached, read "
                   "out nothing (to fill the cache first; the read-outs follow in a later command)")
    p.add_argument("--cached", action="store_true", help="report only the arms' seeds whose pretraining is cached "
                   "(read-outs are still computed); train nothing")
    p.add_argument("--list", action="store_true", help="list the arms cached in --out (seeds, flags) and exit")
    p.add_argument("--reuse_same_behaviour", action="store_true", help="reuse a cached arm trained by other code "
                   "when its behavioural fingerprint and settings match (a few seconds per arm; docs/study.md: what "
                   "it cannot see); default: only runs of code with the same syntax tree are reused")
    p.add_argument("--ceiling_epochs", type=int, default=None, help="train the supervised reference for this "
                   "many epochs on the first seed and report its read-outs as results.json's ceiling (default: "
                   f"{EPOCHS_CEILING} in the full default study, none with --quick, --arms, --compare or --arm)")
    p.add_argument("--finetune_epochs", type=int, default=0, help="also fine-tune every arm's encoder with the "
                   "labels for this many epochs (the supervised reference's recipe, semantic.CEILING) and report "
                   "its top-1")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs at once, one CPU thread each (default: 2, or 1 on a 1-core machine)")
    p.add_argument("--out", default="out/study", help="per-arm, per-seed folders, each with its run.log")
    p.add_argument("--results", default="results.json", help="where the table's numbers go")
    args = p.parse_args(argv)
    # Arms run before in --out (the newest definition of a name), then the built-in ones, then --arm.
    args.arm_flags = {**{a["arm"]: a["flags"] for _, a in cached_arms(args.out)}, **ARMS, **dict(args.arm)}
    if args.ceiling_epochs is None:  # the supervised reference only with the full default study (and the rule)
        args.ceiling_epochs = 0 if (args.quick or args.compare or args.arm or args.arms or args.budget) \
            and not args.choose_readout \
            else EPOCHS_CEILING
    if args.budget:
        args.arms, args.seeds = args.arms or BUDGET_ARMS, args.seeds or BUDGET_SEEDS
        other = [o for o, on in (("--train_only", args.train_only), ("--linear", args.linear),
                                 ("--compare", args.compare), ("--object_pooled", args.object_pooled),
                                 ("--finetune_epochs", args.finetune_epochs), ("--choose_readout", args.choose_readout),
                                 ("--quick", args.quick)) if on]
        if other:
            p.error(f"--budget reads out VOS and the semantic metric only: drop {' '.join(other)}")
    if args.arms is None:
        args.arms = (list(args.compare) if args.compare else QUICK if args.quick else
                     ["random", "sigma", *dict(args.arm)] if args.arm else FULL)
    if args.ceiling_epochs < 0:
        p.error(f"--ceiling_epochs: 0 (no ceiling) or more, e.g. --ceiling_epochs {EPOCHS_CEILING}")
    args.arm_seeds = {arm: args.seeds or ([0] if args.quick else SEEDS_FEW if arm in FEW_SEEDS_ARMS else SEEDS)
                      for arm in args.arms}
    args.seeds = args.seeds or ([0] if args.quick else SEEDS)
    for arm in args.arms + list(args.compare or []):
        if arm not in args.arm_flags:
            p.error(f"unknown arm {arm!r}: choose from {', '.join(args.arm_flags)} (built in or cached in "
                    f"{args.out}) or define it with --arm {arm}=\"--loss sigma ...\"")
    if args.compare and set(args.compare) - set(args.arms):
        p.error("--compare A B: both arms must be among --arms")
    if args.finetune_epochs < 0:
        p.error("--finetune_epochs: 0 (none) or more, e.g. --finetune_epochs 6")
    if args.jobs < 1:
        p.error("--jobs: 1 or more, e.g. --jobs 2")
    if any(s < 0 for s in args.seeds):
        p.error("--seeds: seeds are integers >= 0, e.g. --seeds 0 1 2")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.list:
        print(list_cache(args.out))
        return None
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    root = fashion_dataset()  # generated once (~30 s), cached in $SIGMA_CACHE
    params = json.loads((root / "meta.json").read_text())
    print(f"[{(time.time() - t0) / 60:5.1f} min] moving Fashion-MNIST at {root}", flush=True)
    if args.choose_readout:
        return readout_rule(args, root, params)
    if args.budget:
        return budget_study(args, root, params)
    # Each arm's folder first (a few seconds of fingerprint for an arm new to the cache). Then every (arm, seed)
    # is independent: up to --jobs of them run at once, one core each (threads=1), and the supervised reference
    # beside them. Rows come back in a fixed order whatever finishes first.
    evaluated = functools.cache(lambda: eval_behaviour(root, args.out))  # a few seconds, when a read-out needs it
    folders = {arm: arm_folder(arm, args.arm_flags[arm], params, args.out, args.reuse_same_behaviour, evaluated)
               for arm in args.arms}
    threads = 1 if args.jobs > 1 else None
    tasks = [(arm, seed) for seed in args.seeds for arm in args.arms if seed in args.arm_seeds[arm] and not
             (args.cached and args.arm_flags[arm] is not None and not (folders[arm] / f"seed{seed}" / "done").exists())]
    with ThreadPoolExecutor(args.jobs) as pool:
        top = pool.submit(ceiling, root, params, args.seeds[0], args.ceiling_epochs, args.out, threads, args.linear,
                          evaluated, args.reuse_same_behaviour, args.object_pooled) \
            if args.ceiling_epochs and not args.train_only else None  # the longest job: first
        futures = [pool.submit(measure, arm, args.arm_flags[arm], seed, root, folders[arm], threads,
                               args.finetune_epochs, args.train_only, args.linear, evaluated,
                               args.reuse_same_behaviour, args.object_pooled) for arm, seed in tasks]
        rows = []
        for (arm, seed), future in zip(tasks, futures):
            row = future.result()
            if args.train_only:
                print(f"[{(time.time() - t0) / 60:5.1f} min] {arm:8s} seed {seed}: pretrained", flush=True)
                continue
            rows.append({**row, "flags": args.arm_flags[arm]})
            print(f"[{(time.time() - t0) / 60:5.1f} min] {arm:8s} seed {seed}: " +
                  ", ".join(f"{COLUMNS[k]} {row[k]:.1f}" for k in COLUMNS if k in row), flush=True)
        top = top.result() if top else {}
    if args.train_only:
        return None
    if top:
        print(f"[{(time.time() - t0) / 60:5.1f} min] supervised ceiling: " + ", ".join(f"{k} {v:.1f}" for k, v in top.items()))
    comparisons = [tuple(args.compare)] if args.compare else \
        [(a, b) for a, b in COMPARISONS + DIAGNOSTIC if a in args.arms and b in args.arms] + \
        [(a, "sigma") for a in args.arms if a not in ARMS]
    pairs = [p for a, b in comparisons for m in COLUMNS if (p := paired(rows, a, b, m))]
    holm(pairs, [p for p in pairs if p["metric"] in CALLED_METRICS and (p["a"], p["b"]) in COMPARISONS])
    note = (f"tiny preset, moving Fashion-MNIST ({params['num_train']} train / {params['num_val']} val clips, "
            f"{params['num_vos']} VOS clips, {len(params['dense_classes']) - 1} classes), {EPOCHS} pretraining "
            f"epochs, seeds {args.seeds} (mean ± SD over seeds, %; semantic read-out: {SEMANTIC_READOUT})")
    text = table(rows, note) + "\n\npaired differences (± standard error):\n" + "\n".join(map(pair_line, pairs))
    print("\n" + text + f"\n\ntotal {(time.time() - t0) / 60:.1f} min; per-run outputs and logs in {args.out}/")
    results = dict(headline=HEADLINE, semantic=SEMANTIC, chance=vos_chance(root),
                   class_chance=100 / (len(params["dense_classes"]) - 1), ceiling=top,
                   rows=[{k: v for k, v in r.items() if k != "clips"} for r in rows], pairs=pairs,
                   epochs=EPOCHS, dataset=params, train_flags=TRAIN, table=text)
    with open(args.results, "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
