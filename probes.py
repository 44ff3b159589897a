"""
The probes beside the Table 9 head (eval_linear.py runs them on its cached features): what frozen features
hold, measured without an optimisation budget to argue about.

  linear_converged  multinomial logistic regression solved to optimum (full-batch L-BFGS, standardised
                    inputs, L2 picked on a held-out part of the train split)
  knn               DINO's weighted k-NN (cosine, k = 20, votes exp(sim / 0.07))
  dense             a converged linear classifier per output token against per-token labels
  attentive         V-JEPA's attentive probe: one learned query cross-attends over the frozen tokens

  (study.py's semantic read-out: layer_features, effective_rank, knn_top1 with optional standardisation)

Tensor code: no datasets or files (those are eval_linear.py's and study.py's). Tests: tests/test_eval_linear.py,
tests/test_study.py.
"""
import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import normalize

# ============ defaults ============
# L2 strengths tried (objective: mean CE + lam/2 |W|^2 on standardised inputs). Below 1e-4 the problem on a few
# hundred clips is (nearly) separable and L-BFGS needs thousands of iterations for no change in accuracy.
LAMBDAS = tuple(10.0 ** e for e in range(-4, 2))
HOLDOUT = 0.2  # fraction of the train split (clips, seeded) that picks lambda; then refit on the whole split
KNN_K, KNN_TEMPERATURE = 20, 0.07  # DINO's eval_knn.py defaults (its k = 20 row)


# ============ shared: one CPU thread for small matrices, top-k accuracy ============

@contextlib.contextmanager
def one_cpu_thread(device):
    """The head's matrices are small: on CPU one thread avoids OpenMP's synchronisation, which costs
    more than it saves on matrices this size (and far more when the cores are busy). GPU: no change."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def topk_accuracy(scores, labels, ks=(1, 5)):
    """scores (N, C), labels (N,) -> {'top1': %, 'top5': %}; k is capped at the number of classes."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, k)
    hit = top == labels[:, None]  # (N, k)
    return {f"top{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


# ============ the converged linear probe ============


def logistic_objective(x, y, W, b, lam):
    """Mean cross-entropy of softmax(x W + b) + lam/2 |W|^2 (the bias is not penalised). x (N, D), W (D, C)."""
    return F.cross_entropy(x @ W + b, y) + 0.5 * lam * W.pow(2).sum()


def fit_logistic(x, y, num_classes, lam, init=None, max_iter=1000):
    """The optimum of logistic_objective: full-batch L-BFGS with a strong-Wolfe line search (convex, so
    any start reaches it; `init` (W, b) warm-starts from a nearby lambda). Returns W (D, C), b (C,)."""
    W = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = logistic_objective(x, y, W, b, lam)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)  # one step = up to max_iter L-BFGS iterations, until the gradient vanishes
    return W.detach(), b.detach()


def holdout_split(groups, fraction, seed):
    """Boolean (N,) True = held out: a seeded `fraction` of the distinct groups (clips), so tokens of one clip
    never sit on both sides of the split."""
    ids = groups.unique()
    perm = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    held = perm[:max(1, round(fraction * len(ids)))]
    return torch.isin(groups, held)


def converged_logistic(x, y, num_classes, groups=None, lambdas=LAMBDAS, holdout=HOLDOUT, seed=0, dtype=None):
    """Standardise (train mean / std), pick lambda on a held-out part, refit on all of x.

    x (N, D) any float dtype, y (N,), groups (N,) clip ids (default: one per row). lambda is picked by held-out
    top-1, ties broken by held-out cross-entropy (so on separable data it does not drift to the largest lambda
    that still scores 100%). Computed in float64 on CPU (float32 on GPU) unless dtype says.
    Returns dict(W, b, mean, std, lam, holdout_top1 {lam: %}).
    """
    dtype = dtype or (torch.float64 if x.device.type == "cpu" else torch.float32)
    x = x.to(dtype)
    groups = torch.arange(len(x)) if groups is None else groups
    held = holdout_split(groups.cpu(), holdout, seed).to(x.device)
    scores, fits, init = {}, {}, None
    mean, std = x[~held].mean(0), x[~held].std(0).clamp_min(1e-6)  # the held-out part is not looked at
    xs = (x - mean) / std  # (N, D)
    with one_cpu_thread(x.device):  # small matrices: see one_cpu_thread
        for lam in sorted(lambdas, reverse=True):  # strong to weak: each fit warm-starts the next
            init = fits[lam] = fit_logistic(xs[~held], y[~held], num_classes, lam, init)
            logits = xs[held] @ init[0] + init[1]  # (N_held, C)
            scores[lam] = ((logits.argmax(1) == y[held]).double().mean().item(),
                           -F.cross_entropy(logits, y[held]).item())
        lam = max(scores, key=scores.get)  # highest (top-1, -CE); ties: the strongest lambda
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        xs = (x - mean) / std  # (N, D)
        W, b = fit_logistic(xs, y, num_classes, lam, init=fits[lam])
    W.requires_grad_(True), b.requires_grad_(True)
    with torch.enable_grad():  # how close to the optimum: the largest gradient entry there (0 at the optimum)
        grads = torch.autograd.grad(logistic_objective(xs, y, W, b, lam), (W, b))
    return dict(W=W.detach(), b=b.detach(), mean=mean, std=std, lam=lam, grad_max=max(g.abs().max().item() for g in grads),
                holdout_top1={lam: 100 * s[0] for lam, s in scores.items()})


def logistic_logits(model, x):
    """Logits of a converged_logistic model: x (..., D) -> (..., C)."""
    return ((x.to(model["W"].dtype) - model["mean"]) / model["std"]) @ model["W"] + model["b"]


def linear_converged_probe(train_x, train_y, test_x, test_y, num_classes, seed=0):
    """train_x (N, D), test_x (M, V, D): V test views, softmax scores averaged -> results dict (percent)."""
    model = converged_logistic(train_x, train_y, num_classes, seed=seed)
    train_top1 = topk_accuracy(logistic_logits(model, train_x).cpu(), train_y.cpu())["top1"]
    scores = logistic_logits(model, test_x).softmax(-1).mean(1)  # (M, C)
    acc = topk_accuracy(scores.float().cpu(), test_y.cpu())
    return dict(top1=acc["top1"], top5=acc["top5"], train_top1=train_top1, weight_decay=model["lam"],
                grad_max=model["grad_max"],
                holdout_top1={f"{k:g}": v for k, v in model["holdout_top1"].items()})

# ============ k-NN ============


@torch.no_grad()
def knn_votes(train_x, train_y, test_x, num_classes, k=KNN_K, temperature=KNN_TEMPERATURE, chunk=1024):
    """DINO's weighted k-NN vote: cosine similarity of L2-normalised features, the k most similar training
    clips vote for their class with weight exp(sim / T). train_x (N, D), test_x (M, D) -> votes (M, C)."""
    bank = F.normalize(train_x.float(), dim=1)  # (N, D)
    k = min(k, len(bank))
    votes = []
    for q in test_x.split(chunk):  # chunks bound the (chunk, N) similarity matrix
        sims, idx = (F.normalize(q.float(), dim=1) @ bank.T).topk(k, dim=1)  # (m, k) each
        weights = (sims / temperature).exp()  # (m, k)
        votes.append(torch.zeros(len(q), num_classes, device=q.device).scatter_add_(1, train_y[idx], weights))
    return torch.cat(votes)  # (M, C)


def knn_probe(train_x, train_y, test_x, test_y, num_classes):
    """train_x (N, D), test_x (M, V, D): votes summed over the V test views -> results dict (percent)."""
    M, V, D = test_x.shape
    votes = knn_votes(train_x, train_y, test_x.reshape(M * V, D), num_classes).view(M, V, -1).sum(1)  # (M, C)
    return dict(top1=topk_accuracy(votes.cpu(), test_y.cpu())["top1"], k=min(KNN_K, len(train_x)),
                temperature=KNN_TEMPERATURE)


def token_labels(mask, positions, cfg, num_classes):
    """mask uint8 (T_video, H, W), frame positions (T,) -> (t*h*w,) int64 label per token, (t, h, w) row-major.

    Plurality vote over the tubelet x patch x patch pixels of each token, ties to the higher class (an object
    over background). Why plurality and not "object if >= half its pixels": with several object classes it is
    the one rule that is defined, and it is the label that maximises pixel accuracy when a token's prediction
    is painted over its pixels -- so a perfect token classifier is also the best pixel classifier at this grid.
    """
    t, h, w = cfg.grid
    tub, p = cfg.tubelet_size, cfg.patch_size
    m = torch.as_tensor(np.asarray(mask))[positions].long()  # (T, H, W)
    counts = F.one_hot(m, num_classes).view(t, tub, h, p, w, p, num_classes).sum((1, 3, 5))  # (t, h, w, C)
    return (num_classes - 1 - counts.flip(-1).argmax(-1)).flatten()  # argmax takes the first max: flip -> highest


# ============ the dense probe ============


def segmentation_scores(pred, target, num_classes):
    """Per-token accuracy and IoU per class (incl. background) over all tokens of the split, in percent.
    pred, target (M,) int64. A class absent from both has no IoU (NaN) and is left out of the mean."""
    conf = torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    tp = conf.diag().double()  # conf[true, predicted]
    iou = 100 * tp / (conf.sum(0) + conf.sum(1) - conf.diag()).double()  # (C,) NaN where the class never occurs
    return dict(token_accuracy=100 * tp.sum().item() / len(target), miou=iou.nanmean().item(),
                iou=[None if v != v else v for v in iou.tolist()])  # JSON has no NaN


def dense_probe(train_tokens, train_labels, test_tokens, test_labels, class_names, seed=0, device="cpu"):
    """A linear classifier per token: converged logistic regression (as linear_converged; lambda picked on
    held-out clips, not tokens) on fp16 token features. Not class-balanced: plain cross-entropy over tokens,
    so the background's share weighs in as it does in the mIoU's background class.
    train_tokens (N, n, D), train_labels (N, n); test likewise. -> results dict (percent)."""
    C = len(class_names)
    N, n, D = train_tokens.shape
    x = train_tokens.to(device).flatten(0, 1)  # (N*n, D) fp16; converged_logistic casts to fp32
    y = train_labels.to(device).flatten()
    model = converged_logistic(x, y, C, groups=torch.arange(N).repeat_interleave(n), seed=seed, dtype=torch.float32)
    predict_tokens = lambda t: torch.cat([logistic_logits(model, c.to(device)).argmax(-1).cpu()  # noqa: E731
                                          for c in t.flatten(0, 1).split(65536)])
    train = segmentation_scores(predict_tokens(train_tokens), train_labels.flatten(), C)
    test = segmentation_scores(predict_tokens(test_tokens), test_labels.flatten(), C)
    majority = torch.bincount(train_labels.flatten(), minlength=C).argmax().expand(test_labels.numel())
    chance = segmentation_scores(majority, test_labels.flatten(), C)  # every token -> the commonest class
    return dict(miou=test["miou"], token_accuracy=test["token_accuracy"],
                iou=dict(zip(class_names, test["iou"])), train_miou=train["miou"],
                train_token_accuracy=train["token_accuracy"], weight_decay=model["lam"], grad_max=model["grad_max"],
                chance_miou=chance["miou"], chance_token_accuracy=chance["token_accuracy"], classes=list(class_names))

# ============ the attentive probe ============
# V-JEPA's protocol: the frozen tokens are pooled by one learned query through a cross-attention block
# (pre-LayerNorm on the tokens, multi-head attention, residual, then a pre-norm MLP, as its AttentivePooler),
# then a Linear head. Unlike mean pooling it can read a feature that only some tokens carry. AdamW, cosine.
# Before the probe every channel is standardised with the train tokens' mean and SD (as the converged linear
# probe standardises its inputs, and MAE's linear probe puts a BatchNorm before its head): a pretrained
# encoder's last block without its final norm emits tokens ~10x the norm of random init's, with channels of
# very different scales, and per-token LayerNorm alone leaves a first-order probe badly conditioned.
ATTENTIVE = dict(epochs=50, lr=1e-3, weight_decay=0.05, batch_size=64)  # ours: V-JEPA's K400 run is 20 epochs


class AttentiveProbe(nn.Module):
    """(B, N, D) frozen tokens -> (B, C) logits through one learned query."""

    def __init__(self, dim, num_classes, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.norm_tokens = nn.LayerNorm(dim, eps=1e-6)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        B, N, D = tokens.shape
        H = self.heads
        q = self.q(self.query).view(1, H, 1, D // H).expand(B, -1, -1, -1)  # (B, H, 1, D/H)
        k, v = self.kv(self.norm_tokens(tokens)).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, N, D/H)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)  # (B, 1, D)
        x = self.query + self.proj(pooled)  # (B, 1, D) residual on the query
        x = x + self.mlp(self.norm_mlp(x))
        return self.head(x[:, 0])  # (B, C)


def attentive_probe(train_tokens, train_labels, test_tokens, test_labels, num_classes, heads, seed=0,
                    device="cpu", epochs=ATTENTIVE["epochs"], lr=ATTENTIVE["lr"],
                    weight_decay=ATTENTIVE["weight_decay"], batch_size=ATTENTIVE["batch_size"]):
    """Train an AttentiveProbe on cached tokens (N, n, D) fp16 -> results dict (percent), with the tokens'
    variance shares (token_variance_shares of the train tokens)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the query's init
    N, n, D = train_tokens.shape
    mean, std = channel_stats(train_tokens)  # (D,), (D,)
    standard = lambda t: ((t.to(device).float() - mean.to(device)) / std.to(device))  # noqa: E731
    probe = AttentiveProbe(D, num_classes, heads).to(device)
    decay = [p for p in probe.parameters() if p.ndim > 1]  # matrices and the query; not biases or norms
    rest = [p for p in probe.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)],
                            lr=lr)
    bs = min(batch_size, N)
    steps = epochs * (N // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(N, generator=g)
        for i in range(N // bs):  # the last partial batch is dropped, as in train_head
            idx = order[i * bs:(i + 1) * bs]
            loss = F.cross_entropy(probe(standard(train_tokens[idx])), train_labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    probe.eval()
    with torch.no_grad():
        top1 = lambda t, y: topk_accuracy(torch.cat([probe(standard(c)).cpu()  # noqa: E731
                                                     for c in t.split(256)]), y)["top1"]
        return dict(top1=top1(test_tokens, test_labels), train_top1=top1(train_tokens, train_labels),
                    epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=bs, heads=heads,
                    token_variance=token_variance_shares(train_tokens))


def channel_stats(tokens, chunk=256):
    """Per-channel mean and SD over every clip and position of tokens (N, n, D), in fp32 chunks -> (D,), (D,)."""
    total = sum(c.float().sum((0, 1), dtype=torch.float64) for c in tokens.split(chunk))  # (D,)
    count = tokens.shape[0] * tokens.shape[1]
    mean = total / count
    var = sum((c.double() - mean).pow(2).sum((0, 1)) for c in tokens.split(chunk)) / count
    return mean.float(), var.sqrt().clamp_min(1e-6).float()


def token_variance_shares(tokens, chunk=256):
    """How much of the tokens' variance (about their mean over all clips and positions) is shared by every token
    of a clip (the clip's mean token) and by every clip at one position (the position's mean token): (N, n, D)
    -> {'clip': share, 'position': share}. A clip share near 1 means a clip's tokens are nearly one vector,
    which leaves an attentive probe little to choose between."""
    mean, _ = channel_stats(tokens, chunk)
    mean = mean.double()
    total = sum((c.double() - mean).pow(2).sum().item() for c in tokens.split(chunk))
    clip = sum((c.double().mean(1) - mean).pow(2).sum().item() * tokens.shape[1] for c in tokens.split(chunk))
    position_mean = sum(c.double().sum(0) for c in tokens.split(chunk)) / tokens.shape[0]  # (n, D)
    position = (position_mean - mean).pow(2).sum().item() * tokens.shape[0]
    return dict(clip=clip / total, position=position / total)


# ============ the laptop study's semantic read-out (study.py) ============

def layer_features(encoder, clips):
    """Every block's tokens of uint8 clips (N, 3, T, S, S), mean-pooled -> (N, L, D) with L = depth + 1 (the last
    entry after the final LayerNorm), and per layer: the mean cosine similarity of two tokens of one clip (1 = one
    vector per clip) and the largest channel's RMS over the median channel's (L,) each."""
    pooled, similarity, channel_ms = [], 0, 0
    with torch.no_grad():
        for batch in clips.split(100):
            t = encoder.patch_embed(normalize(batch)) + encoder.pos_embed  # (b, N, D)
            layers = []
            for block in encoder.blocks:
                t = block(t)
                layers.append(t)
            layers = torch.stack([*layers, encoder.norm(t)], dim=1)  # (b, L, N, D)
            pooled.append(layers.mean(2))
            unit = F.normalize(layers, dim=-1).sum(2)  # (b, L, D): sum of unit tokens
            n = layers.shape[2]
            similarity = similarity + ((unit.square().sum(-1) - n) / (n * (n - 1))).sum(0)  # (L,)
            channel_ms = channel_ms + layers.square().mean(2).sum(0)  # (L, D)
    rms = (channel_ms / len(clips)).sqrt()  # (L, D)
    return torch.cat(pooled), similarity / len(clips), rms.amax(1) / rms.median(1).values


def effective_rank(x):
    """exp(entropy) of the normalised singular values of centred features (N, D): 1 = one direction, D = all."""
    s = torch.linalg.svdvals((x - x.mean(0)).double())
    p = s / s.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum()))


def knn_top1(bank, bank_y, queries, query_y, standardise):
    """20-NN top-1 (%) of queries against a bank; standardise: every channel to the bank's mean and SD first."""
    if standardise:
        mean, sd = bank.mean(0), bank.std(0) + 1e-6
        bank, queries = (bank - mean) / sd, (queries - mean) / sd
    return knn_probe(bank, bank_y, queries[:, None], query_y, int(bank_y.max()) + 1)["top1"]
