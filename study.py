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

METHODS = {  # row name -> train.py flags (None: not pretrained)
    "random init": None,
    "VideoMAE (pixel)": ["--loss", "pixel"],
    "SIGMA-MLP (sigma)": ["--loss", "sigma"],
    "Eq. 2 (l2)": ["--loss", "l2"],
}


def run(cmd, log):
    """Run one of the repository's scripts, its output appended to `log`; stop on failure."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        env = {**os.environ, "TQDM_DISABLE": "1"}
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode:
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
    results = {name: [] for name in METHODS}
    for seed in args.seeds:
        for name, flags in METHODS.items():
            tag = f"{name.split()[0].lower().replace('-', '_')}_seed{seed}"
            folder = os.path.join(args.out, tag)
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
            results[name].append(dict(top1=lin["top1"], **{k: 100 * seg["mean"][k] for k in ("clustering", "overclustering")}))
            r = results[name][-1]
            print(f"[{(time.time() - t0) / 60:5.1f} min] {name:20s} seed {seed}: linear top-1 {r['top1']:5.1f}, "
                  f"VOS mIoU {r['clustering']:5.1f} / {r['overclustering']:5.1f}", flush=True)

    def cell(values):
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    lines = [f"tiny preset, synthetic videos, {args.epochs} pretraining epochs, seeds {args.seeds} (mean ± std)", "",
             "| method | linear top-1 (%, chance 25) | VOS clustering mIoU | VOS overclustering mIoU |",
             "|---|---|---|---|"]
    for name, rows in results.items():
        lines.append(f"| {name} | " + " | ".join(cell([r[k] for r in rows]) for k in ("top1", "clustering", "overclustering")) + " |")
    table = "\n".join(lines)
    print("\n" + table + f"\n\ntotal {(time.time() - t0) / 60:.1f} min; per-run outputs and logs in {args.out}/")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(seeds=args.seeds, epochs=args.epochs, results=results, table=table), f, indent=1)


if __name__ == "__main__":
    main()
