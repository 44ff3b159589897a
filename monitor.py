"""
What a training loop reports while it runs, and when it stops itself. train.py hands every step's values to a Run:

  the log          one JSON line per step in <out>/log.jsonl, without a host sync per step: the values stay on
                   the GPU until every --log_every steps, then travel in one transfer after one all-reduce
  the NaN stop     a non-finite loss stops the run at once, keeping the last checkpoint
  the collapse     --loss sigma: phi assigning every token to one prototype for --collapse_patience steps
                   stops the run (docs/common_issues.md); --loss l2's expected collapse (Eq. 2) is noted once
  data-bound       one line when the loop waits for the DataLoader a large share of the time, with the remedies
  the summary      the end-of-epoch line, the end-of-run summary and the evaluation commands that come next

eval_finetune.py's loop hands its loss and gradient norm to a StepLog: the same log, read the same way, and the
NaN stop. Every rank reads the same averaged values, so every rank stops at the same step.
"""
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from bench import peak_memory_gb
from synthetic import fashion_dataset

# Collapse alarm (--loss sigma): a step counts as collapsed when phi sends every token of the global batch
# to one prototype, or when its mean soft assignment puts >~99% of the mass on one prototype (entropy below
# 0.1 nats; healthy runs sit at several nats, the maximum is ln K). See docs/common_issues.md.
COLLAPSE_ENTROPY = 0.1
# --loss l2 with a jointly trained phi collapses by design (Eq. 2): phi's spread across tokens below this.
L2_COLLAPSED_STD = 1e-3
# Data-bound check: over these steps of a run (counted from its start or restart), the share of the time the
# loop waits for the DataLoader; above DATA_BOUND_SHARE on any rank, one line says so, with the remedies.
DATA_BOUND_STEPS = (20, 100)
DATA_BOUND_SHARE = 0.2


class Run:
    """What the loop reports. Per step it only keeps the logged values as device tensors; every --log_every
    steps (and at the end of each epoch) it reads them from the GPU in one transfer -- after one all-reduce
    over ranks -- writes one JSON line per step, and checks them: a non-finite loss or a sustained collapse
    stops the run (every rank reads the same averaged values, so every rank stops together)."""

    def __init__(self, args, cfg, world, device, master, steps_per_epoch, paths, lr, min_lr, accum, writer):
        self.args, self.cfg, self.world, self.device, self.master = args, cfg, world, device, master
        self.rank = dist.get_rank() if world > 1 else 0
        self.steps_per_epoch, self.paths, self.lr, self.min_lr, self.accum = steps_per_epoch, paths, lr, min_lr, accum
        self.total_steps, self.warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
        self.pending, self.first_losses, self.last = [], [], {}
        self.collapsed_steps, self.l2_collapse_noted = 0, False
        self.data_time, self.t0 = 0.0, time.perf_counter()
        self.log = open(paths["log.jsonl"], "a") if master else None
        self.writer = writer  # train.CheckpointWriter: rank 0 writes in the background; a failure stops every rank
        self.steps_here, self.data_total, self.window_start = 0, 0.0, None  # the data-bound check

    def record(self, step, epoch, lr, stats):
        self.pending.append((step, epoch, lr, stats))
        self.steps_here += 1
        first, last = DATA_BOUND_STEPS
        if self.steps_here == first:
            self.window_start = (time.perf_counter(), self.data_total)
        elif self.steps_here == last and self.window_start:
            self.check_data_bound()

    def check_data_bound(self):
        """One line when the loop waited for the DataLoader more than DATA_BOUND_SHARE of the time over
        DATA_BOUND_STEPS, on the slowest rank. Every rank takes part in the reduction (at the same step)."""
        t0, data0 = self.window_start
        share = torch.tensor([(self.data_total - data0) / (time.perf_counter() - t0), self.rank], dtype=torch.float64,
                             device=self.device)  # (2,) [waiting share, rank]; on the device: NCCL gathers those
        if self.world > 1:
            everyone = [torch.zeros_like(share) for _ in range(self.world)]
            dist.all_gather(everyone, share)
            share = max(everyone, key=lambda s: s[0].item())
        worst, rank = share.tolist()
        if worst > DATA_BOUND_SHARE:
            first, last = DATA_BOUND_STEPS
            self.say(f"data-bound: over steps {first}-{last} of this run the loop waited for the DataLoader "
                     f"{worst:.0%} of the time (rank {rank:.0f}, the slowest); the {self.device.type.upper()}s sit "
                     f"idle that long. Faster input: decode the dataset once into a clip store (python store.py "
                     f"--prepare --dataset {self.args.dataset} --data_root <videos> --out <store>, then --data_root "
                     f"<store>; docs/store.md), several clips per decoded video (--repeats 2, now "
                     f"{self.args.repeats}), or more DataLoader workers per rank (--workers, now {self.args.workers}).")

    def flush(self, bar):
        """Read, log and check the pending steps; returns True when the run must stop."""
        keys = list(self.pending[0][3])  # loss, its terms, monitors, grad_norm
        values = torch.stack([torch.stack([s[k].double() for k in keys]) for *_, s in self.pending])  # (steps, keys)
        # One more value travels with them: did rank 0's background checkpoint write fail? Every rank then stops
        # here, at the next log interval, instead of at the next save (rank 0) or in an all-reduce (the others).
        write_failed = values.new_full((1, len(keys)), float(self.writer.failed))
        values = torch.cat([values, write_failed])  # (steps + 1, keys)
        if self.world > 1:  # loss terms are per rank: average them (the monitors are already global)
            dist.all_reduce(values)
            values /= self.world
        *rows, failed = values.tolist()  # the one host sync of the interval
        if failed[0] > 0:
            return self.stop_on_failed_write()
        # Throughput over the interval: per-step host times mean little while the GPU runs behind the host.
        dt = time.perf_counter() - self.t0
        timing = {"clips_per_s": len(rows) * self.args.batch_size / dt, "data_wait": self.data_time / dt,
                  "peak_mem_gb": peak_memory_gb(self.device)}
        for (step, epoch, lr, _), row in zip(self.pending, rows):
            self.last = {"step": step, "epoch": epoch, "lr": lr, **{k: round(v, 5) for k, v in zip(keys, row)}, **timing}
            if "protos_used" in self.last:
                self.last["protos_used"] = round(self.last["protos_used"])
            if self.master:
                self.log.write(json.dumps(self.last) + "\n")
                if len(self.first_losses) < 10:
                    self.first_losses.append(self.last["loss"])
            if self.alarm():
                if self.master:
                    self.log.flush()
                return True
        self.pending, self.data_time, self.t0 = [], 0.0, time.perf_counter()
        if self.master:
            self.log.flush()
            bar.set_postfix(loss=f"{self.last['loss']:.3f}", protos=self.last.get("protos_used", "-"),
                            lr=f"{self.last['lr']:.1e}", clips_s=f"{timing['clips_per_s']:.0f}",
                            data=f"{timing['data_wait']:.0%}")
        return False

    def stop_on_failed_write(self):
        ckpt = self.paths["ckpt.pth"]
        try:
            self.writer.wait()  # rank 0 re-raises the write's error here
        except Exception as err:  # noqa: BLE001 -- reported, then the run stops on every rank
            self.say(f"could not write the checkpoint {ckpt} ({type(err).__name__}: {err}); stopping. The previous "
                     f"checkpoint, if any, is intact: free space or fix --out, then re-run the same command.")
        return True

    def alarm(self):
        """Checks one logged step. A NaN stops at once; a collapse stops after --collapse_patience steps."""
        last, ckpt = self.last, self.paths["ckpt.pth"]
        good = ckpt if os.path.exists(ckpt) else "none (no epoch finished)"
        if not math.isfinite(last["loss"]):
            self.say(f"loss is {last['loss']} at step {last['step']}; stopping. The last good checkpoint is {good}. "
                     "Try a lower --lr, more --warmup_epochs, or --precision fp32 / bf16.")
            return True
        if self.cfg.loss == "l2" and last["target_std"] < L2_COLLAPSED_STD and not self.l2_collapse_noted:
            self.l2_collapse_noted = True  # the Eq. 2 ablation: expected, so it runs to the end
            self.say(f"phi's output collapsed to a constant at step {last['step']} (target_std {last['target_std']:.1e}), "
                     "as expected for --loss l2 with a jointly trained phi (paper Eq. 2); not stopping.")
        if self.cfg.loss != "sigma" or not self.args.collapse_patience:
            return False
        collapsed = last["protos_used"] <= 1 or last["assign_entropy"] < COLLAPSE_ENTROPY
        self.collapsed_steps = self.collapsed_steps + 1 if collapsed else 0
        if self.collapsed_steps < self.args.collapse_patience:
            return False
        self.say(f"collapse: for {self.collapsed_steps} steps up to step {last['step']}, phi assigned the tokens to "
                 f"{last['protos_used']} of {self.cfg.num_prototypes} prototypes (assignment entropy "
                 f"{last['assign_entropy']:.3f} nats, max {math.log(self.cfg.num_prototypes):.2f}): its features no "
                 f"longer tell tokens apart and the loss teaches nothing. Stopping; the last checkpoint is {good} (if "
                 "the collapse began before it, go back further). Try a lower --lr or more --warmup_epochs, a "
                 "larger --micro_batch (Sinkhorn balances over micro_batch x GPUs clips), check that the videos "
                 "are not blank or identical, or --collapse_patience 0 to keep going.")
        return True

    def say(self, message):
        if self.master:
            print("\n" + message, file=sys.stderr)

    def end_of_epoch(self, epoch):
        last, K = self.last, self.cfg.num_prototypes
        print(f"epoch {epoch + 1}/{self.args.epochs}: loss {last['loss']:.4f}"
              + (f", prototypes used {last['protos_used']}/{K}, entropy {last['assign_entropy']:.2f}/{math.log(K):.2f}"
                 if "protos_used" in last else "")
              + f", target spread {last['target_std']:.3f}, {last['clips_per_s']:.1f} clips/s, "
              f"data wait {last['data_wait']:.0%}")

    def summary(self, end_epoch):
        args, last, ckpt = self.args, self.last, self.paths["ckpt.pth"]
        self.log.close()
        if not last:
            print(f"nothing to do: {ckpt} already holds epoch {end_epoch}/{args.epochs}")
            return
        lines = [f"done: epoch {end_epoch}/{args.epochs}, step {last['step']}.",
                 f"  loss {sum(self.first_losses) / len(self.first_losses):.3f} (first steps) -> "
                 f"{last['loss']:.3f} (last step)"]
        if "protos_used" in last:
            lines.append(f"  prototypes in use {last['protos_used']}/{self.cfg.num_prototypes}, assignment entropy "
                         f"{last['assign_entropy']:.2f} nats (max {math.log(self.cfg.num_prototypes):.2f}; near 0 = collapse)")
        bad = self.paths["bad_videos.txt"]
        n_bad = len(set(open(bad).read().split("\n")) - {""}) if os.path.exists(bad) else 0
        lines += [f"  checkpoint {ckpt}", f"  log        {self.paths['log.jsonl']}  (one JSON line per step)",
                  f"  unreadable videos skipped: {n_bad}" + (f", listed in {bad}" if n_bad else "")]
        if end_epoch < args.epochs:
            lines.append("  re-run the same command to continue.")
        else:
            lines += ["next:"] + next_steps(args, ckpt)
        print("\n".join(lines))


def next_steps(args, ckpt):
    """The evaluation commands for this run's checkpoint (eval_linear.py reads the built-in sets as 'synthetic')."""
    if args.dataset == "fashion":
        root = args.data_root or fashion_dataset()
        return [f"  python eval_linear.py --ckpt {ckpt} --dataset synthetic --data_root {root} --probes knn",
                f"  python eval_vos.py --ckpt {ckpt} --dataset davis2017 --data_root {root}/davis "
                "--sampling consecutive --features l2 --vis 4"]
    data = f"--dataset {args.dataset}" + (f" --data_root {args.data_root}" if args.data_root else "")
    return [f"  python eval_linear.py --ckpt {ckpt} {data}",
            f"  python eval_vos.py --ckpt {ckpt} --dataset "
            + ("synthetic" if args.dataset == "synthetic" else "davis2017 --data_root /path/to/DAVIS")]


# ============ fine-tuning (eval_finetune.py): the log line and the NaN stop ============

class StepLog:
    """log.jsonl, one line per step, without a host sync per step: record() keeps each step's loss and gradient
    norm as device tensors; flush() averages the pending ones over ranks (one all-reduce), reads them in one
    transfer and writes their lines. Every rank reads the same averages, so every rank finds a non-finite loss
    at the same step. clips_per_s and data_wait are over the interval since the last flush (per-step host times
    mean little while the GPU runs behind the host)."""

    def __init__(self, file, world, total_batch):
        self.file, self.world, self.total_batch = file, world, total_batch
        self.pending, self.last, self.data_time, self.t0 = [], {}, 0.0, time.perf_counter()

    def record(self, step, epoch, lr, loss, grad_norm, data_time):
        self.pending.append((step, epoch, lr, torch.stack([loss.double(), grad_norm.double()])))  # (2,)
        self.data_time += data_time

    def flush(self):
        """Write the pending steps -> False if a loss was not finite (self.last is then that step, logged last)."""
        if not self.pending:
            return True
        values = torch.stack([v for *_, v in self.pending])  # (steps, 2): loss, grad_norm
        if self.world > 1:
            dist.all_reduce(values)  # the mean loss over ranks (the gradient norm is the same on every rank)
            values /= self.world
        rows = values.tolist()  # the one host sync of the interval
        dt = time.perf_counter() - self.t0
        timing = dict(clips_per_s=len(rows) * self.total_batch / dt, data_wait=self.data_time / dt)
        for (step, epoch, lr, _), (loss, grad_norm) in zip(self.pending, rows):
            self.last = dict(step=step, epoch=epoch, lr=lr, loss=round(loss, 5), grad_norm=grad_norm, **timing)
            self.file.write(json.dumps(self.last) + "\n")
            if not math.isfinite(loss):
                break
        self.file.flush()
        self.pending, self.data_time, self.t0 = [], 0.0, time.perf_counter()
        return math.isfinite(self.last["loss"])
