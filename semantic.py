"""
The laptop study's semantic instrument: what a frozen encoder knows about the garment category of a clip, and the
supervised reference that shows how much there is to know. study.py runs these functions, each in a process of its
own per run, and caches what they write; nothing here pretrains an arm or compares arms.

  decoded             every clip of a split, decoded once and kept beside the videos
  semantic_readout    the candidate read-outs (each block's pooled tokens, standardised or not) -> 20-NN top-1
  choose_readout      the rule that picked SEMANTIC_READOUT, blind to every pretrained arm
  object_readout      the object-pooled diagnostic: the garment's tokens against the background's
  fine_tune           the supervised reference: the initial encoder trained end to end with the labels

The syntax-tree digests (digest, code_digest) key decoded()'s disk cache here and every cache key of study.py: a
comment or a docstring changes no key, any other edit does.
"""
import ast
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import model
from probes import effective_rank, knn_top1, layer_features

HERE = Path(__file__).resolve().parent

# ============ defaults ============
# The semantic read-out. Candidates: the mean-pooled tokens of each encoder block ("block1" .. "block6", before
# the final LayerNorm) and of the last block after it ("norm"), each as they are or with every channel
# standardised by the bank's statistics ("/std") before DINO's 20-NN (probes.knn_votes). The rule, fixed before
# any arm is compared: the candidate on which the supervised reference beats random init by the most, measured at
# the first seed on the *train* clips alone (bank: a fixed random READOUT_BANK of them, queries: the rest). No val
# clip and no pretrained arm takes part. choose_readout() applies it (python study.py --choose_readout); its
# outcome is SEMANTIC_READOUT, then applied unchanged to every arm on the val clips (bank: all train clips).
READOUT_BANK = 1500
# The rule's outcome (`python study.py --choose_readout`; its ranking is in docs/study.md, "The semantic read-out"):
# the last block after the final LayerNorm, every channel standardised.
SEMANTIC_READOUT = "norm/std"

# The object-pooled diagnostic, never a choice: the rule's read-out layer pooled over the ground-truth garment's
# tokens only (each token weighted by the share of its tube the garment covers, from the <video>.mask.npy
# sidecars), and over the background's. If the object-pooled 20-NN is far above the whole-clip one, the tokens
# know the category but the background dilutes it; if both are low, the tokens do not hold it.
OBJECT_POOLS = ("object", "background", "whole")  # results.json columns (COLUMNS: their names)

# The supervised reference. A ViT trained from scratch on 2000 clips is slow to leave chance: at lr 1e-3 with
# every token it does not leave it in 4 epochs. Training on a random quarter of each clip's tokens (FLIP's token
# dropping; the test sees them all) makes a step ~4x cheaper, and at lr 2e-4 the same CPU time buys enough steps
# to learn the categories (docs/study.md: the learning curves).
CEILING = dict(lr=2e-4, warmup_epochs=2, keep=0.25, shift=6, batch_size=32)


# ============ syntax-tree digests ============

def digest(*parts):
    """A short stable hash of JSON-able parts."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:12]


def source_digest(text):
    """sha256 of Python source as its syntax tree without docstrings: comments, docstrings and formatting leave it
    unchanged, any other edit changes it."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]  # the docstring
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def read_source(name):
    return (HERE / name).read_text()


def code_digest(files):
    return digest({f: source_digest(read_source(f)) for f in files})


# ============ decoded clips ============

def decoded(root, split, cfg):
    """Every clip of a split: (N, 3, T, S, S) uint8 (the whole 64 px frame), labels (N,). Decoded once per code
    version and kept beside the videos (decoded-<split>-<key>.pt, ~200 MB for the train split): every read-out of
    every run reads the same tensors in seconds instead of decoding 2500 videos."""
    key = digest(split, cfg.num_frames, cfg.img_size, code_digest(["data.py", "store.py"]))
    cache = Path(root) / f"decoded-{split}-{key}.pt"
    if cache.exists():
        stored = torch.load(cache, weights_only=True)
        return stored["clips"], stored["labels"]
    ds = data.build_video_dataset("synthetic", root, split, num_frames=cfg.num_frames, size=cfg.img_size,
                                  stride=2, train=False)
    clips, labels = zip(*data.make_loader(ds, 100, shuffle=False, drop_last=False))
    clips, labels = torch.cat(clips), torch.cat(labels)
    partial = cache.with_suffix(f".tmp{os.getpid()}")  # written whole, then renamed: runs may start together
    torch.save({"clips": clips, "labels": labels}, partial)
    os.replace(partial, cache)
    return clips, labels


# ============ the candidate read-outs and the rule ============

def readout_names(layers):
    return [f"block{i + 1}" for i in range(layers - 1)] + ["norm"]


def semantic_readout(ckpt, root, seed, out):
    """Every candidate read-out of an encoder (our checkpoint, or 'random': the seed's initial encoder) -> <out>
    json: "val" {candidate: val 20-NN top-1}, "holdout" {candidate: held-out train 20-NN top-1}, and per layer
    "within_clip_similarity", "max_channel_ratio", "effective_rank" (of the val clips' pooled features)."""
    torch.manual_seed(seed)
    encoder, cfg = model.load_encoder(ckpt, "tiny")
    encoder.eval()
    (x, y), (vx, vy) = decoded(root, "train", cfg), decoded(root, "val", cfg)
    train, _, _ = layer_features(encoder, x)
    val, similarity, channels = layer_features(encoder, vx)
    names = readout_names(train.shape[1])
    result = dict(val={}, holdout={}, within_clip_similarity=dict(zip(names, similarity.tolist())),
                  max_channel_ratio=dict(zip(names, channels.tolist())),
                  effective_rank={n: effective_rank(val[:, i]) for i, n in enumerate(names)})
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # the same split for every encoder
    bank, queries = order[:READOUT_BANK], order[READOUT_BANK:]
    for i, name in enumerate(names):
        for std in (False, True):
            key = name + ("/std" if std else "")
            result["val"][key] = knn_top1(train[:, i], y, val[:, i], vy, std)
            result["holdout"][key] = knn_top1(train[bank, i], y[bank], train[queries, i], y[queries], std)
    Path(out).write_text(json.dumps(result, indent=1))


def choose_readout(reference, random_init):
    """The rule: the candidate with the largest held-out-train 20-NN gap between the supervised reference and
    random init (their semantic_readout results) -> (name, [(gap, name)] best first)."""
    gaps = sorted(((reference["holdout"][k] - random_init["holdout"][k], k) for k in reference["holdout"]),
                  reverse=True)
    return gaps[0][1], gaps


# ============ the object-pooled diagnostic ============

def object_shares(root, split, cfg):
    """Per clip of a split, in decoded()'s order, the share of each token's tube that the garment covers ->
    (N, num_tokens) float: the sidecar masks at the frames the clip was read from, cut into tubes like the video."""
    ds = data.build_video_dataset("synthetic", root, split, num_frames=cfg.num_frames, size=cfg.img_size,
                                  stride=2, train=False)
    shares = []
    for path, _ in ds.samples:
        masks = np.load(Path(path).with_suffix(".mask.npy"))  # (T_video, S, S) uint8, 0 = background
        if masks.shape[1:] != (cfg.img_size, cfg.img_size):
            raise ValueError(f"{path}: masks of {masks.shape[1:]} px, the read-out expects {cfg.img_size} px frames")
        # The frames VideoClips._load reads for this clip (it clamps positions past the end the same way).
        frames = ds._positions(len(masks))[0].clamp(max=len(masks) - 1)  # (T,)
        garment = torch.from_numpy(masks[frames.numpy()] > 0).float()[None, None]  # (1, 1, T, S, S)
        shares.append(model.patchify(garment, cfg.tubelet_size, cfg.patch_size).flatten(2).mean(-1)[0])  # (N,)
    return torch.stack(shares)  # (clips, N)


def pooled_where(encoder, clips, shares, layer):
    """The tokens of read-out `layer` ("blockK" or "norm") of uint8 clips (N, 3, T, S, S), averaged per clip with
    weights: the garment's shares, the background's (1 - share), and every token alike -> (N, 3, D)."""
    module = encoder.norm if layer == "norm" else encoder.blocks[int(layer.removeprefix("block")) - 1]
    captured = []
    hook = module.register_forward_hook(lambda m, inputs, output: captured.append(output))
    pooled = []
    try:
        with torch.no_grad():
            for batch, w in zip(clips.split(100), shares.split(100)):
                encoder(data.normalize(batch))
                tokens = captured.pop()  # (b, N, D)
                weights = torch.stack([w, 1 - w, torch.ones_like(w)], 1)  # (b, 3, N)
                weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
                pooled.append(weights @ tokens)  # (b, 3, D)
    finally:
        hook.remove()
    return torch.cat(pooled)


def object_readout(ckpt, root, seed, out):
    """The rule's read-out (SEMANTIC_READOUT) of an encoder pooled over the garment, the background and the whole
    clip -> <out> json: "val" {object, background, whole: val 20-NN top-1}, "garment_share" (the mean share of a
    val clip's tokens the garment covers). "whole" is the semantic metric again, computed the same way."""
    layer, standardise = SEMANTIC_READOUT.split("/")[0], SEMANTIC_READOUT.endswith("/std")
    torch.manual_seed(seed)
    encoder, cfg = model.load_encoder(ckpt, "tiny")
    encoder.eval()
    (x, y), (vx, vy) = decoded(root, "train", cfg), decoded(root, "val", cfg)
    val_shares = object_shares(root, "val", cfg)
    bank = pooled_where(encoder, x, object_shares(root, "train", cfg), layer)
    queries = pooled_where(encoder, vx, val_shares, layer)
    result = dict(readout=SEMANTIC_READOUT, garment_share=float(val_shares.mean()),
                  val={name: knn_top1(bank[:, i], y, queries[:, i], vy, standardise)
                       for i, name in enumerate(OBJECT_POOLS)})
    Path(out).write_text(json.dumps(result, indent=1))


# ============ the supervised reference ============

def augment(clips, g, shift):
    """A random horizontal flip per clip and one random circular shift of up to `shift` px for the batch."""
    flip = torch.rand(len(clips), generator=g) < 0.5  # (B,)
    clips = torch.where(flip[:, None, None, None, None], clips.flip(-1), clips)
    dy, dx = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
    return clips.roll((dy, dx), (-2, -1))


def train_classifier(encoder, root, seed, epochs):
    """Train `encoder` + mean pool + LayerNorm + Linear end to end with cross-entropy on the arms' 2000 train
    clips (CEILING: AdamW, a random quarter of the tokens per clip, warmup then cosine); test on the 500 val
    clips with every token -> (val top-1 %, {epoch: val top-1} every 5 epochs)."""
    c = CEILING
    g = torch.Generator().manual_seed(seed)
    cfg = encoder.cfg
    (x, y), (val_x, val_y) = decoded(root, "train", cfg), decoded(root, "val", cfg)
    head = nn.Sequential(MeanPool(), nn.LayerNorm(cfg.enc_dim), nn.Linear(cfg.enc_dim, int(y.max()) + 1))
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=c["lr"], betas=(0.9, 0.95),
                            weight_decay=0.05)
    B, N = c["batch_size"], cfg.num_tokens
    per_epoch, n_masked = len(x) // B, N - round(c["keep"] * N)
    total, warmup = epochs * per_epoch, c["warmup_epochs"] * per_epoch

    def top1():
        encoder.eval()
        with torch.no_grad():
            hits = sum((head(encoder(data.normalize(v))).argmax(1) == t).sum().item()
                       for v, t in zip(val_x.split(100), val_y.split(100)))
        encoder.train()
        return 100 * hits / len(val_x)

    encoder.train()
    curve = {}
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=g)
        idx = order[step % per_epoch * B:(step % per_epoch + 1) * B]
        for group in opt.param_groups:
            group["lr"] = c["lr"] * (step / warmup if step < warmup else
                                     0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))
        mask = torch.zeros(B, N, dtype=torch.bool).scatter_(  # True = dropped: a random n_masked per clip
            1, torch.rand(B, N, generator=g).argsort(1)[:, :n_masked], True)
        tokens = encoder(data.normalize(augment(x[idx], g, c["shift"])), mask, n_masked)  # (B, N / 4, D)
        loss = F.cross_entropy(head(tokens), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % (5 * per_epoch) == 0:
            curve[(step + 1) // per_epoch] = top1()
    return top1(), curve


def fine_tune(ckpt, root, seed, epochs, out, save_encoder=False):
    """train_classifier from an encoder (one of our checkpoints, or 'random': the seed's initial encoder, which
    every arm of that seed started from) -> <out> json (top-1, curve, recipe); save_encoder: the fine-tuned
    encoder too, as <out>.pth (the supervised reference's frozen read-outs use it)."""
    torch.manual_seed(seed)  # 'random': the same initial weights as train.py builds at this seed
    encoder, _ = model.load_encoder(ckpt, "tiny")
    top1, curve = train_classifier(encoder, root, seed, epochs)
    out = Path(out)
    if save_encoder:
        torch.save({"model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}}, out.with_suffix(".pth"))
    out.write_text(json.dumps({**CEILING, "epochs": epochs, "top1": top1, "seed": seed, "curve": curve}))


class MeanPool(nn.Module):
    def forward(self, x):  # (B, N, D) -> (B, D): the linear probe's mean over all tokens
        return x.mean(1)
