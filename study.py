"""
The laptop-scale study of the README: can a 2-core CPU show what the paper's Table 7b says?

For each seed, pretrain the tiny preset on the built-in synthetic videos with
  - SIGMA-MLP  (--loss sigma, jointly trained MLP target: the method),
  - VideoMAE   (--loss pixel: regress standardised pixels),
  - Eq. 2      (--loss l2: regress the jointly trained MLP target, which collapses),
then evaluate each, and a randomly initialised encoder, with eval_linear.py (frozen linear probe)
and eval_vos.py (unsupervised object segmentation on the synthetic DAVIS-layout masks).
Everything goes through the same command lines a user would type; this file only loops, skips
what is already done (rerun it to continue) and tabulates mean +- std over seeds.

    python study.py                          # 3 seeds x 3 methods + random: ~25 min on 2 CPU cores
    python study.py --seeds 0 --epochs 2     # a smoke run
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = {  # folder tag -> (table row, train.py flags; None: not pretrained)
    "random": ("random init", None),
    "videomae": ("VideoMAE (--loss pixel)", ["--loss", "pixel"]),
    "sigma": ("SIGMA-MLP (--loss sigma)", ["--loss", "sigma"]),
    "eq2": ("Eq. 2 (--loss l2)", ["--loss", "l2"]),
}
COLUMNS = {"top1": "linear top-1 (%, chance 25)", "clustering": "VOS clustering mIoU",
           "overclustering": "VOS overclustering mIoU", "target_std": "phi spread, last step",
           "protos_used": "prototypes assigned (of 256)"}


def run(cmd, log):
    """Run one of the repository's scripts, its output appended to `log`; stop on failure."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"failed: {' '.join(cmd)} (see {log})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15, help="pretraining epochs per run (train.py's default is 20)")
    p.add_argument("--out", default="out/study")
    args = p.parse_args()
    py = sys.executable
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "study.log")
    t0 = time.time()
    results = {tag: [] for tag in METHODS}
    for seed in args.seeds:
        for tag, (name, flags) in METHODS.items():
            folder = os.path.join(args.out, f"{tag}_seed{seed}")
            os.makedirs(folder, exist_ok=True)
            linear, vos = os.path.join(folder, "linear.json"), os.path.join(folder, "vos.json")
            if flags is None:
                ckpt = ["--ckpt", "random", "--arch", "tiny", "--seed", str(seed)]
            else:
                ckpt = ["--ckpt", os.path.join(folder, "ckpt.pth")]
                if not os.path.exists(linear):
                    run([py, "train.py", *flags, "--seed", str(seed), "--epochs", str(args.epochs),
                         "--out", folder], log)
            if not os.path.exists(linear):
                run([py, "eval_linear.py", *ckpt, "--dataset", "synthetic", "--out", linear], log)
            if not os.path.exists(vos):
                run([py, "eval_vos.py", *ckpt, "--dataset", "synthetic", "--out", vos], log)
            lin, seg = json.load(open(linear)), json.load(open(vos))
            r = dict(top1=lin["top1"], **{k: 100 * seg["mean"][k] for k in ("clustering", "overclustering")})
            if flags is not None:  # the collapse monitors of the last training step (train.py's log)
                with open(os.path.join(folder, "log.jsonl")) as f:
                    last = json.loads(f.readlines()[-1])
                r.update({k: last[k] for k in ("target_std", "protos_used") if k in last})
            results[tag].append(r)
            print(f"[{(time.time() - t0) / 60:5.1f} min] {name:20s} seed {seed}: linear top-1 {r['top1']:5.1f}, "
                  f"VOS mIoU {r['clustering']:5.1f} / {r['overclustering']:5.1f}", flush=True)

    def cell(rows, key):
        values = [r[key] for r in rows if key in r]
        if not values:
            return "-"
        digits = 3 if key == "target_std" else 0 if key == "protos_used" else 1
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    lines = [f"tiny preset, synthetic videos, {args.epochs} pretraining epochs, seeds {args.seeds} (mean ± std)", "",
             "| method | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for tag, rows in results.items():
        lines.append(f"| {METHODS[tag][0]} | " + " | ".join(cell(rows, k) for k in COLUMNS) + " |")
    table = "\n".join(lines)
    print("\n" + table + f"\n\ntotal {(time.time() - t0) / 60:.1f} min; per-run outputs and logs in {args.out}/")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(seeds=args.seeds, epochs=args.epochs, results=results, table=table), f, indent=1)


if __name__ == "__main__":
    main()
