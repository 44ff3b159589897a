"""
The laptop-scale study of the README: the paper's Table 7b ablation on moving Fashion-MNIST, on a 2-core CPU.

For each seed, pretrain the tiny preset on the moving Fashion-MNIST videos (synthetic.fashion_dataset) with
  - SIGMA-MLP  (--loss sigma, jointly trained MLP target: the method),
  - VideoMAE   (--loss pixel: regress standardised pixels),
  - Eq. 2      (--loss l2: regress the jointly trained MLP target, which collapses),
then evaluate each, and a randomly initialised encoder (the floor), with eval_linear.py (frozen features: the
Table 9 head and the probes of PROBES) and eval_vos.py (unsupervised segmentation of the set's DAVIS-layout
val clips). The ceiling is the same encoder trained with the labels for the same clips (supervised() below).
Everything else goes through the command lines a user would type, every training setting passed as a flag
(TRAIN), so that the study does not move when a recipe does. Rerun to continue: finished steps are skipped.

    python study.py            # 3 seeds: random / pixel / sigma / l2 (51 min on 2 cores) + the ceiling for seed 0
    python study.py --quick    # seed 0: random / pixel / sigma (12 min)

Writes results.json (--results): {"headline": metric, "chance": %, "rows": [{"method", "seed", metric: %, ...}], ...}.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import model
from synthetic import fashion_dataset

# ============ defaults ============
# Pretraining, identical for every method: the tiny preset (64x64, 8 frames stride 2, 8x8 patches: 256
# tokens), 6 epochs of 2000 clips (3.5-5 min, i.e. 7-10 CPU minutes, per run on 2 cores), batch 32,
# lr 8e-3 x 32/256 with 1 warmup epoch then cosine to 1e-4 x 32/256.
EPOCHS = 6
TRAIN = ["--arch", "tiny", "--batch_size", "32", "--micro_batch", "32", "--warmup_epochs", "1", "--lr", "8e-3",
         "--min_lr", "1e-4", "--weight_decay", "0.05", "--mask_ratio", "0.9", "--stride", "2", "--sk_eps", "0.05",
         "--num_prototypes", "256", "--temperature", "0.1", "--precision", "fp32", "--save_every", "4",
         "--workers", "2"]
METHODS = {  # results.json method -> (table row, train.py flags; None: not pretrained)
    "random": ("random init (floor)", None),
    "pixel": ("VideoMAE (--loss pixel)", ["--loss", "pixel"]),
    "sigma": ("SIGMA-MLP (--loss sigma)", ["--loss", "sigma"]),
    "l2": ("Eq. 2 (--loss l2)", ["--loss", "l2"]),
}
CEILING = ("supervised (ceiling)", None)  # not a results.json row: results.json "ceiling"
PROBES = "linear_converged,knn"  # eval_linear.py --probes (printed beside the Table 9 head)
# The headline, chosen by the issue's criterion (pretrained beats random init by >= 5 seed-to-seed standard errors
# within 10 CPU minutes of pretraining): the category probes do not separate the methods here, the dense read-out
# does (README Results). Its "chance" is the mIoU of calling every pixel background.
HEADLINE = "vos_clustering"
# The VOS read-out the README table was measured with: every clip's consecutive frames, k-means on L2-normalised
# tokens (eval_vos.py's protocol before it adopted TimeT's). Pinned so that the study reproduces its table;
# eval_vos.py's default (TimeT: frames spread over the video, standardise + PCA-50) is the one to use when
# comparing with the paper's Table 4.
VOS = ["--sampling", "consecutive", "--features", "l2"]
COLUMNS = {"vos_clustering": "VOS clustering mIoU", "vos_overclustering": "VOS overclustering mIoU",
           "linear_converged": "converged linear top-1", "knn": "20-NN top-1", "linear": "Table 9 head top-1",
           "supervised_top1": "trained-with-labels top-1"}


def run(cmd, log):
    """Run one of the repository's scripts, its output appended to `log`; stop on failure."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"failed: {' '.join(cmd)} (see {log})")


# ============ the ceiling: the same encoder, trained with the labels ============

def supervised(root, seed, epochs, folder):
    """Tiny encoder + mean pool + LayerNorm + Linear trained end to end with cross-entropy on the same clips and
    optimiser settings as a pretraining run (AdamW, batch 32, warmup then cosine). Writes <folder>/ckpt.pth (the
    encoder, for the same frozen evaluations as the pretrained ones) and <folder>/supervised.json (val top-1 %)."""
    torch.manual_seed(seed)
    cfg = model.build_config("tiny", target="pixel", loss="pixel")
    train = data.build_video_dataset("synthetic", root, "train", num_frames=cfg.num_frames, size=cfg.img_size)
    val = data.build_video_dataset("synthetic", root, "val", num_frames=cfg.num_frames, size=cfg.img_size, train=False)
    encoder = model.Encoder(cfg)
    net = nn.Sequential(encoder, Pool(), nn.LayerNorm(cfg.enc_dim), nn.Linear(cfg.enc_dim, train.num_classes))
    loader = data.make_loader(train, 32, num_workers=2, seed=seed)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    total, warmup = epochs * len(loader), len(loader)
    step = 0
    for epoch in range(epochs):
        data.set_epoch(loader, epoch)
        for clips, labels in loader:  # (32, 3, T, S, S), (32,)
            for group in opt.param_groups:
                group["lr"] = 1e-3 * (step / warmup if step < warmup else
                                      0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))
            loss = F.cross_entropy(net(data.normalize(clips)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    net.eval()
    correct = 0
    with torch.no_grad():
        for clips, labels in data.make_loader(val, 64, num_workers=2, shuffle=False, drop_last=False):
            correct += (net(data.normalize(clips)).argmax(1) == labels).sum().item()
    torch.save({"model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}}, os.path.join(folder, "ckpt.pth"))
    with open(os.path.join(folder, "supervised.json"), "w") as f:
        json.dump(dict(top1=100 * correct / len(val), epochs=epochs, seed=seed), f)


class Pool(nn.Module):
    def forward(self, x):  # (B, N, D) -> (B, D): the linear probe's mean over all tokens
        return x.mean(1)


# ============ the study ============

def evaluate(tag, seed, folder, root, log):
    """Pretrain (unless random) and evaluate one run -> its results.json row (percent)."""
    py = sys.executable
    flags = (METHODS.get(tag) or CEILING)[1]
    linear, vos = os.path.join(folder, "linear.json"), os.path.join(folder, "vos.json")
    if tag == "random":
        ckpt = ["--ckpt", "random", "--arch", "tiny", "--seed", str(seed)]
    elif tag == "supervised":
        ckpt = ["--ckpt", os.path.join(folder, "ckpt.pth"), "--arch", "tiny"]
        if not os.path.exists(os.path.join(folder, "supervised.json")):
            supervised(root, seed, EPOCHS, folder)
    else:
        ckpt = ["--ckpt", os.path.join(folder, "ckpt.pth")]
        if not os.path.exists(os.path.join(folder, "done")):
            run([py, "train.py", "--dataset", "synthetic", "--data_root", str(root), *TRAIN, *flags,
                 "--epochs", str(EPOCHS), "--seed", str(seed), "--out", folder], log)
            open(os.path.join(folder, "done"), "w").close()
    if not os.path.exists(linear):
        run([py, "eval_linear.py", *ckpt, "--dataset", "synthetic", "--data_root", str(root),
             "--probes", PROBES, "--out", linear], log)
    if not os.path.exists(vos):
        run([py, "eval_vos.py", *ckpt, "--dataset", "davis2017", "--data_root", str(root / "davis"), *VOS,
             "--out", vos], log)
    lin, seg = json.load(open(linear)), json.load(open(vos))
    row = dict(method=tag, seed=seed, linear=lin["top1"], linear_train=lin["train_top1"],
               vos_clustering=100 * seg["mean"]["clustering"], vos_overclustering=100 * seg["mean"]["overclustering"])
    for name, probe in lin.get("probes", {}).items():
        row[name] = probe["top1"]
        if "train_top1" in probe:
            row[f"{name}_train"] = probe["train_top1"]
    if tag == "supervised":
        row["supervised_top1"] = json.load(open(os.path.join(folder, "supervised.json")))["top1"]
    elif flags is not None:  # the collapse monitors of the last training step (train.py's log)
        with open(os.path.join(folder, "log.jsonl")) as f:
            last = json.loads(f.readlines()[-1])
        row.update({k: last[k] for k in ("target_std", "protos_used") if k in last})
    return row


def vos_chance(root, num_vos):
    """mIoU (%) of the trivial segmentation "all background" on the VOS clips: (background share + 0) / 2."""
    shares = [(np.load(next((root / "val").rglob(f"val_{i:05d}.mask.npy"))) == 0).mean() for i in range(num_vos)]
    return 100 * float(np.mean(shares)) / 2


def margins(rows):
    """Per metric: (best pretrained mean - random mean) / standard error of that difference over seeds."""
    out = {}
    for key in COLUMNS:
        by = {m: [r[key] for r in rows if r["method"] == m and key in r] for m in METHODS}
        candidates = [m for m in by if m != "random" and len(by[m]) > 1]
        if len(by["random"]) < 2 or not candidates:
            continue  # one seed: no spread to measure
        best = max(candidates, key=lambda m: statistics.mean(by[m]))
        se = math.sqrt(statistics.variance(by[best]) / len(by[best]) + statistics.variance(by["random"]) / len(by["random"]))
        out[key] = dict(best=best, diff=statistics.mean(by[best]) - statistics.mean(by["random"]), se=se,
                        in_se=(statistics.mean(by[best]) - statistics.mean(by["random"])) / max(se, 1e-9))
    return out


def table(rows, ceiling, note):
    def cell(rows, method, key):
        values = [r[key] for r in rows if r["method"] == method and key in r]
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    lines = [note, "", "| method | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for tag in dict.fromkeys(r["method"] for r in rows):
        lines.append(f"| {METHODS[tag][0]} | " + " | ".join(cell(rows, tag, k) for k in COLUMNS) + " |")
    if ceiling:
        lines.append(f"| {CEILING[0]} | " + " | ".join(cell(ceiling, "supervised", k) for k in COLUMNS) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seed 0, random / pixel / sigma only, no ceiling")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), help="default: all (--quick: "
                   "random pixel sigma)")
    p.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=None,
                   help="train the supervised ceiling for the first seed (default: on, off with --quick)")
    p.add_argument("--out", default="out/study", help="per-run folders and study.log")
    p.add_argument("--results", default="results.json", help="where the table's numbers go")
    args = p.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    methods = args.methods or (["random", "pixel", "sigma"] if args.quick else list(METHODS))
    with_ceiling = not args.quick if args.ceiling is None else args.ceiling
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "study.log")
    t0 = time.time()
    root = fashion_dataset()  # generated once (~1 min), cached in $SIGMA_CACHE
    print(f"[{(time.time() - t0) / 60:5.1f} min] moving Fashion-MNIST at {root}", flush=True)
    rows, ceiling = [], []
    for seed in seeds:
        for tag in methods:
            folder = os.path.join(args.out, f"{tag}_seed{seed}")
            os.makedirs(folder, exist_ok=True)
            rows.append(evaluate(tag, seed, folder, root, log))
            print(f"[{(time.time() - t0) / 60:5.1f} min] {METHODS[tag][0]:26s} seed {seed}: " +
                  ", ".join(f"{COLUMNS[k]} {rows[-1][k]:.1f}" for k in COLUMNS if k in rows[-1]), flush=True)
        folder = os.path.join(args.out, f"supervised_seed{seed}")
        # The ceiling trains the encoder on all 256 tokens (pretraining sees 10%): > 9 min a run, so by default the
        # full study makes it for its first seed only; one already made is always tabulated.
        if (with_ceiling and seed == seeds[0]) or os.path.exists(os.path.join(folder, "vos.json")):
            os.makedirs(folder, exist_ok=True)
            ceiling.append(evaluate("supervised", seed, folder, root, log))
            print(f"[{(time.time() - t0) / 60:5.1f} min] {CEILING[0]:26s} seed {seed}: end-to-end top-1 "
                  f"{ceiling[-1]['supervised_top1']:.1f}, " +
                  ", ".join(f"{COLUMNS[k]} {ceiling[-1][k]:.1f}" for k in COLUMNS if k in ceiling[-1]), flush=True)
    meta = json.load(open(root / "meta.json"))
    note = (f"tiny preset, moving Fashion-MNIST ({meta['num_train']} train / {meta['num_val']} val clips, "
            f"{len(meta['dense_classes']) - 1} classes), {EPOCHS} pretraining epochs, seeds {seeds} (mean ± std, %)")
    text = table(rows, ceiling, note)
    gaps = margins(rows)
    text += "".join(f"\n{COLUMNS[k]}: best pretrained ({g['best']}) - random = {g['diff']:+.1f} = {g['in_se']:+.1f} SE"
                    for k, g in gaps.items())
    print("\n" + text + f"\n\ntotal {(time.time() - t0) / 60:.1f} min; per-run outputs and logs in {args.out}/")
    results = dict(headline=HEADLINE, chance=vos_chance(root, meta["num_vos"]), rows=rows,
                   class_chance=100 / (len(meta["dense_classes"]) - 1), margins=gaps,
                   ceiling=ceiling, epochs=EPOCHS, dataset=meta, table=text)
    with open(args.results, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
