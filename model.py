"""
SIGMA: Sinkhorn-Guided Masked Video Modeling (Salehi et al., ECCV 2024) -- the model and its loss.

SIGMA is VideoMAE with a learned target space. A ViT encoder sees the ~10% of space-time tubes left visible by
tube masking; a light decoder predicts a feature for every masked tube. VideoMAE regresses the tubes' pixels.
SIGMA instead embeds the masked tubes with a projection network phi (an MLP trained jointly, or a frozen DINO
image ViT), scores both phi's features and the decoder's predictions against K learnable prototypes, balances each
side's assignments with Sinkhorn-Knopp (sinkhorn.py) and makes each side predict the other's cluster.

Read top to bottom, after Config (the fields every part reads): 1-6 are the method, 7-8 helpers.
  1. tubes: patchify videos into tube pixels, the tube embedding, the token order of a mask, sinusoid positions
  2. the transformer block (VideoMAE attention: q and v biases, no k bias)
  3. encoder (visible tokens only) and decoder (mask tokens)
  4. the projection networks phi: pixels, MLP, frozen DINO
  5. SIGMA: prototypes, the swapped-prediction loss and the two ablation losses
  6. presets and build_model
  7. checkpoints: reading them without unpickling code, fitting them to a model
  8. parameter and FLOP counts
Which dtype each device computes in, and TF32 for the matmuls kept fp32, is precision.py's. Where the GPU shapes
the code, a "Plain version:" note says what the textbook form would be and why it is not used.

    python model.py      # parameter counts and forward+backward FLOPs per clip for each preset

Conventions: videos are (B, 3, T, H, W), ImageNet-normalised. Tokens are ordered (t, h, w), row-major. A mask is
(B, N) bool with True = masked (hidden from the encoder, predicted by the decoder), as in the released code; every
clip of a batch masks the same number of tokens.
"""
import argparse
import math
import os
import pickle
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from data import IMAGENET_MEAN, IMAGENET_STD, tube_mask
from precision import autocast_dtype, inference_autocast, tf32_in_fp32_regions  # noqa: F401 (`from model import`)
from sinkhorn import sinkhorn, swapped_prediction_loss


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclass(frozen=True)
class Config:
    # input: num_frames frames of img_size x img_size, cut into tubes of tubelet_size frames x patch_size x
    # patch_size pixels (released VideoMAE / SIGMA: 16x224x224, tubes 2x16x16)
    img_size: int = 224
    num_frames: int = 16
    patch_size: int = 16
    tubelet_size: int = 2
    # video model Psi: encoder and decoder widths / depths / heads (released `modeling_pretrain.py`; ViT-B)
    enc_dim: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_dim: int = 384
    dec_depth: int = 4
    dec_heads: int = 6
    mlp_ratio: float = 4.0
    # projection network phi of the paper: 'mlp' (trained jointly), 'dino' (frozen), 'pixel'
    target: str = "mlp"
    # hidden widths of the mlp phi: released 4 Linear layers. The paper's method section describes a shallower MLP
    # whose widths we could not check; e.g. (1024, 1024) keeps 3 Linear layers.
    proj_hidden: tuple = (1024, 1024, 512)
    proj_dim: int = 256                     # D of the mlp target
    dino_weights: str = ""                  # local DINO checkpoint (official key layout)
    dino_arch: str = "vit_b"                # 'vit_s' (D=384) or 'vit_b' (D=768)
    # loss (paper Eq. 5-6 and Table 7b): 'sigma' (swapped prediction), 'l2' (Eq. 2, regress phi; collapses with
    # the mlp target), 'pixel' (VideoMAE: regress standardised tube pixels)
    loss: str = "sigma"
    num_prototypes: int = 3000   # K; the paper's ablation peaks at 4000
    sk_eps: float = 0.05         # Sinkhorn entropy; released SSv2 ViT-B runs use 0.03
    sk_iters: int = 10
    temperature: float = 0.1     # tau of the swapped-prediction cross-entropy
    soft_codes: bool = False     # released code: hard argmax codes; paper's equations: soft
    # Two switches that are not SIGMA's (docs/forking.md), both off by default:
    # dec_depth = 0: no decoder (ViDROP, decoder-free masked modeling): mask tokens for a random predict_share of the
    # masked tubes enter the encoder beside the visible ones, the other masked tubes are dropped, and a linear head
    # maps the encoder's tokens at those positions to the target.
    predict_share: float = 0.25
    # clip_loss > 0: add clip_loss x a clip-level swapped prediction between two views of each video (SwAV / iBOT's
    # [CLS] term, ViDROP's global loss): each view's mean-pooled encoder tokens, through a small head, are scored
    # against clip_prototypes prototypes and predict the other view's Sinkhorn code (train.py --repeats 2).
    clip_loss: float = 0.0
    clip_prototypes: int = 32

    @property
    def grid(self):
        """Token grid (t, h, w)."""
        return (self.num_frames // self.tubelet_size, self.img_size // self.patch_size,
                self.img_size // self.patch_size)

    @property
    def num_tokens(self):
        return math.prod(self.grid)

    @property
    def tube_dim(self):
        """Values per tube: tubelet x patch x patch x RGB (1536 for 2x16x16)."""
        return self.tubelet_size * self.patch_size ** 2 * 3

    @property
    def target_dim(self):
        """D: width of phi's output, and of the decoder's head that predicts it."""
        return {"mlp": self.proj_dim, "pixel": self.tube_dim,
                "dino": DINO_ARCHS[self.dino_arch]["dim"]}[self.target]

    def validate(self):
        """Fail at start with a message that says what to change."""
        problems = []
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_frames % self.tubelet_size:
            problems.append(f"num_frames {self.num_frames} is not a multiple of tubelet_size "
                            f"{self.tubelet_size}: pick e.g. {self.num_frames // self.tubelet_size * self.tubelet_size or self.tubelet_size}")
        for name, dim, heads in [("enc", self.enc_dim, self.enc_heads), ("dec", self.dec_dim, self.dec_heads)]:
            if dim % heads and (name == "enc" or self.dec_depth):
                problems.append(f"{name}_dim {dim} is not divisible by {name}_heads {heads}")
        if self.target not in ("mlp", "dino", "pixel"):
            problems.append(f"unknown target {self.target!r}: choose mlp, dino or pixel")
        if self.loss not in ("sigma", "l2", "pixel"):
            problems.append(f"unknown loss {self.loss!r}: choose sigma, l2 or pixel")
        if self.loss == "pixel" and self.target != "pixel":
            problems.append("loss='pixel' is VideoMAE, whose target is the pixels: set target='pixel' "
                            "(or use loss='l2' to regress another target)")
        if self.target == "dino":
            if self.dino_arch not in DINO_ARCHS:
                problems.append(f"unknown dino_arch {self.dino_arch!r}: choose {sorted(DINO_ARCHS)}")
            if not self.dino_weights:
                problems.append("target='dino' needs dino_weights=<local path to DINO weights>, e.g. "
                                "dino_vitbase16_pretrain.pth (nothing is downloaded at run time)")
            elif not os.path.isfile(self.dino_weights):
                problems.append(f"dino_weights {self.dino_weights!r} does not exist")
            if self.img_size % 16:
                problems.append(f"target='dino' runs a ViT-*/16 on the frames: img_size {self.img_size} "
                                "must be a multiple of 16")
        if self.loss == "sigma" and self.num_prototypes < 2:
            problems.append("loss='sigma' needs num_prototypes >= 2")
        if self.dec_depth < 0:
            problems.append(f"dec_depth {self.dec_depth}: 0 (no decoder) or more, e.g. 4")
        if not 0 < self.predict_share <= 1:
            problems.append(f"predict_share {self.predict_share}: the share of masked tubes predicted without a "
                            "decoder, in (0, 1], e.g. 0.25")
        if self.clip_loss < 0:
            problems.append(f"clip_loss {self.clip_loss}: a weight >= 0 (0 = off), e.g. 0.5")
        if self.clip_prototypes < 2:
            problems.append(f"clip_prototypes {self.clip_prototypes}: 2 or more, e.g. 32")
        if problems:
            raise ValueError("invalid model config:\n  - " + "\n  - ".join(problems))
        return self


# ----------------------------------------------------------------------------------------------
# 1. Tubes

def patchify(videos, tubelet, patch):
    """Cut videos into tubes of raw values: (B, C, T, H, W) -> (B, N, tubelet*patch*patch, C).

    Tubes are in (t, h, w) token order; inside a tube values are in (p0, p1, p2) order, the released code's
    `b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c`.
    """
    B, C, T, H, W = videos.shape
    t, h, w = T // tubelet, H // patch, W // patch
    x = videos.reshape(B, C, t, tubelet, h, patch, w, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, t, h, w, p0, p1, p2, C)
    return x.reshape(B, t * h * w, tubelet * patch * patch, C)


def tube_pixel_targets(videos, tubelet, patch):
    """VideoMAE's standardised pixel target and the input of the MLP phi (released `modeling_pretrain.py`).

    videos: (B, 3, T, H, W) ImageNet-normalised. Returns (B, N, tubelet*patch*patch*3): each tube un-normalised to
    [0, 1], then standardised per colour channel over its pixels (unbiased std + 1e-6, as released), flattened in
    (p0 p1 p2 c) order.
    """
    mean = videos.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = videos.new_tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    x = patchify(videos.float() * std + mean, tubelet, patch)  # (B, N, P, 3) in [0, 1]
    x = (x - x.mean(dim=2, keepdim=True)) / (x.var(dim=2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return x.flatten(2)  # (B, N, P*3)


class TubeEmbed(nn.Module):
    """The released tube embedding, a Conv3d with kernel = stride = (tubelet, patch, patch): (B, 3, T, H, W) ->
    (B, N, D); its parameters proj.weight (D, 3, tubelet, patch, patch) and proj.bias keep the Conv3d's names and
    default init, so checkpoints are unchanged.

    Plain version: self.proj(videos).flatten(2).transpose(1, 2); not used: cuDNN runs this Conv3d on a slow path.
    The kernels do not overlap, so the convolution is one matmul of each tube's values with the flattened kernel,
    a GEMM on bf16 tensor cores (tests/test_model.py checks forward and backward against the Conv3d in fp64).

    forward(videos, index=None) -> (B, N, D); given index (B, M) token indices, those tubes only: (B, M, D). The
    encoder passes its visible tokens: at 90% masking, a tenth of the matmul and of the tube values saved for
    backward, with the same result for the visible tubes.
    """

    def __init__(self, dim, tubelet, patch, in_chans=3):
        super().__init__()
        self.tubelet, self.patch = tubelet, patch
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=(tubelet, patch, patch),
                              stride=(tubelet, patch, patch))

    def forward(self, videos, index=None):
        tubes = patchify(videos, self.tubelet, self.patch).flatten(2)  # (B, N, tubelet*patch*patch*C), (p0 p1 p2 c)
        if index is not None:
            tubes = gather_tokens(tubes, index)  # (B, M, tubelet*patch*patch*C): raw values of the chosen tubes
        kernel = self.proj.weight.permute(0, 2, 3, 4, 1).flatten(1)  # (D, C, p0, p1, p2) -> (D, p0*p1*p2*C)
        return F.linear(tubes, kernel, self.proj.bias)  # (B, N or M, D)


def mask_order(mask, n_masked=None):
    """Token indices of a tube mask (B, N) bool, True = masked -> (visible (B, N - n_masked), masked (B, n_masked)),
    each in ascending token order.

    Plain version: x[~mask].view(B, -1, D); not used: nonzero's data-dependent size syncs the host and breaks
    torch.compile. A stable argsort of the mask puts each clip's visible tokens first and its masked ones after,
    each group in token order; as every clip masks the same number of tokens, both index sets have a fixed size,
    and gather_tokens picks the tokens with them. n_masked: masked tokens per clip, known on the host where the
    masks are drawn (train.py passes it); None reads it from the mask: one host sync, fine outside a training loop.
    """
    if n_masked is None:
        n_masked = int(mask[0].sum())
    order = mask.to(torch.uint8).argsort(dim=1, stable=True)  # (B, N): visible tokens, then masked ones
    n_visible = mask.shape[1] - n_masked
    return order[:, :n_visible], order[:, n_visible:]


def gather_tokens(x, index):
    """x (B or 1, N, C), index (B, M) -> (B, M, C): the tokens of each clip at the given positions."""
    return torch.take_along_dim(x, index.unsqueeze(-1), dim=1)


def sinusoid_table(n_positions, dim):
    """Fixed 1-D sine-cosine position table (Vaswani et al.), (1, n_positions, dim).

    Channel 2i is sin(pos / 10000^(2i/dim)) and channel 2i+1 the matching cos, as in VideoMAE's table. Not a
    parameter and not saved: checkpoints never contain it (nor do the released ones).
    """
    pos = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)  # (n, 1)
    freq = 10000.0 ** (-(torch.arange(dim) // 2 * 2).double() / dim)  # (dim,) pairs share one freq
    angles = pos * freq  # (n, dim)
    table = torch.where(torch.arange(dim) % 2 == 0, angles.sin(), angles.cos())
    return table.float().unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# 2. Transformer block

class Attention(nn.Module):
    """Multi-head self-attention with VideoMAE's biases: q and v have one, k has none.

    A bias on the keys adds q.b_k to every logit of a query's row, which softmax ignores, so the k bias is
    redundant; dropping it is exact (this is also how DINO weights load, section 4).
    """

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # (3C,)
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, 3C)
        q, k, v = qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, C/h)
        # Plain version: softmax(q @ k^T / sqrt(C/h)) @ v; not used: SDPA computes the same in one fused kernel
        # (flash attention on a GPU) that never stores the (B, h, N, N) attention matrix.
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, C/h), scale (C/h)^-0.5
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x, p, training):
    """Stochastic depth (Huang et al. 2016) on a residual branch x (B, ...): in training, zero the whole branch
    for each sample with probability p and scale the kept ones by 1 / (1 - p), so the expected output is
    unchanged. Identity (the same tensor, bit for bit) when p == 0 or in eval."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= p  # (B, 1, 1) per sample
    return x * keep.to(x.dtype) / (1.0 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). LayerNorm eps 1e-6.

    drop_path: stochastic depth of both residual branches; 0 in pretraining (released recipe), used by fine-tuning
    (eval_finetune.py). It has no parameters, so checkpoints are the same either way.
    """

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def init_vit_weights(module):
    """VideoMAE init: xavier-uniform Linear weights, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# 3. Encoder and decoder

class Encoder(nn.Module):
    """ViT over tubes. Sees only visible tokens during pretraining, all tokens for evaluation.

    drop_path: the stochastic-depth rate of the last block; block i gets drop_path * i / (depth - 1), rising
    linearly from 0 as in the released fine-tuning model. 0 (pretraining) = no drop path.
    """

    def __init__(self, cfg, drop_path=0.0):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.enc_dim
        self.patch_embed = TubeEmbed(cfg.enc_dim, cfg.tubelet_size, cfg.patch_size)
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_tokens, cfg.enc_dim), persistent=False)
        rates = [drop_path * i / max(1, cfg.enc_depth - 1) for i in range(cfg.enc_depth)]  # 0 ... drop_path
        self.blocks = nn.ModuleList([Block(cfg.enc_dim, cfg.enc_heads, cfg.mlp_ratio, rate) for rate in rates])
        self.norm = nn.LayerNorm(cfg.enc_dim, eps=1e-6)
        init_vit_weights(self)  # the Conv3d keeps PyTorch's default init, as released

    def forward(self, videos, mask=None, n_masked=None, extra=None):
        """videos (B, 3, T, H, W), mask (B, N) bool or None -> (B, N_visible, D) or (B, N, D).
        n_masked: masked tokens per clip if known on the host (see mask_order). extra (B, M, D): tokens appended
        after the visible ones, positions included (SIGMA's decoder-free variant: mask tokens) -> (B, N_vis + M, D)."""
        cfg = self.cfg
        if videos.shape[1:] != (3, cfg.num_frames, cfg.img_size, cfg.img_size):
            raise ValueError(f"expected videos (B, 3, {cfg.num_frames}, {cfg.img_size}, {cfg.img_size}) "
                             f"for this model, got {tuple(videos.shape)}")
        if mask is None:
            x = self.patch_embed(videos) + self.pos_embed  # (B, N, D)
        else:  # only the visible tubes are embedded, each with the position of its own token
            visible = mask_order(mask, n_masked)[0]  # (B, N_vis) token indices, ascending
            x = self.patch_embed(videos, visible) + gather_tokens(self.pos_embed, visible)  # (B, N_vis, D)
        if extra is not None:
            x = torch.cat([x, extra.to(x.dtype)], dim=1)  # (B, N_vis + M, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Decoder(nn.Module):
    """Narrow transformer; returns predictions for the last n_masked tokens of its input."""

    def __init__(self, cfg, out_dim):
        super().__init__()
        self.blocks = nn.ModuleList([Block(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio)
                                     for _ in range(cfg.dec_depth)])
        self.norm = nn.LayerNorm(cfg.dec_dim, eps=1e-6)
        self.head = nn.Linear(cfg.dec_dim, out_dim)
        init_vit_weights(self)

    def forward(self, x, n_masked):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, -n_masked:]))  # (B, N_m, out_dim)


# ----------------------------------------------------------------------------------------------
# 4. Projection networks phi (the target side)

def projection_mlp(in_dim, hidden, out_dim):
    """phi for the 'mlp' target: Linear-GELU-...-Linear, keys head.0, head.2, ... as released."""
    dims = [in_dim, *hidden, out_dim]
    layers = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.GELU()]
    return nn.Sequential(*layers[:-1])  # no activation after the last Linear


# The clip-level head (clip_loss): enc_dim -> CLIP_HIDDEN -> CLIP_DIM, the widths of a small SwAV-like projector.
CLIP_HIDDEN, CLIP_DIM = 512, 128

DINO_ARCHS = {"vit_s": dict(dim=384, depth=12, heads=6), "vit_b": dict(dim=768, depth=12, heads=12)}


class DINO(nn.Module):
    """Frozen DINO ViT-*/16 image encoder (Caron et al. 2021) built from the blocks above.

    forward: frames (B', 3, H, W) ImageNet-normalised -> patch tokens (B', h*w, D) after the final LayerNorm, CLS
    dropped. Its qkv bias is split into q_bias / v_bias at load time (the k part is provably irrelevant, see
    Attention), so the official key layout loads unchanged.
    """

    def __init__(self, arch="vit_b", img_size=224):
        super().__init__()
        dim, depth, heads = DINO_ARCHS[arch]["dim"], DINO_ARCHS[arch]["depth"], DINO_ARCHS[arch]["heads"]
        self.grid = img_size // 16
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=16, stride=16)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # frozen: always in eval mode

    def load_dino_state_dict(self, sd):
        """Load official DINO weights; returns the keys that were ignored (e.g. a projection head)."""
        sd = dict(sd)
        if "teacher" in sd:  # full training checkpoint: take the teacher's backbone
            sd = {k.replace("module.", "").replace("backbone.", ""): v for k, v in sd["teacher"].items()}
        for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
            q, _, v = sd.pop(k).chunk(3)  # the k bias is dropped: softmax is invariant to it
            sd[k.replace("qkv.bias", "q_bias")], sd[k.replace("qkv.bias", "v_bias")] = q, v
        pos = sd.get("pos_embed")
        if pos is not None and pos.shape != self.pos_embed.shape:
            sd["pos_embed"] = _resize_pos_embed(pos, self.grid)
        ignored = [k for k in sd if k not in self.state_dict()]
        for k in ignored:
            sd.pop(k)
        self.load_state_dict(sd, strict=True)
        return ignored

    def forward(self, frames):
        x = self.patch_embed.proj(frames).flatten(2).transpose(1, 2)  # (B', h*w, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]  # (B', h*w, D)


def _resize_pos_embed(pos, grid):
    """Bicubic resize of a (1, 1 + g*g, D) ViT position table to a grid x grid patch grid."""
    cls, patches = pos[:, :1], pos[:, 1:]
    g = int(math.sqrt(patches.shape[1]))
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)


def dino_targets(dino, videos, grid):
    """SIGMA-DINO target (released `modeling_pretrain.py`): (B, 3, T, H, W) -> (B, N, D), standardised per clip.

    DINO sees frames 0, 2, 4, ... (one per tube slice); its (h, w) patch tokens line up with the tubes of that slice
    (resized bilinearly if the grids differ). Each channel is standardised over the clip's N tokens (unbiased
    std + 1e-6), as released.
    """
    B, _, T, H, W = videos.shape
    t, h, w = grid
    frames = videos[:, :, :: T // t].transpose(1, 2).flatten(0, 1)  # (B*t, 3, H, W)
    with torch.no_grad():
        x = dino(frames)  # (B*t, g*g, D)
        g, D = dino.grid, x.shape[-1]
        if (g, g) != (h, w):
            x = x.transpose(1, 2).reshape(-1, D, g, g)
            x = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
            x = x.flatten(2).transpose(1, 2)  # (B*t, h*w, D)
        x = x.float().reshape(B, t * h * w, D)  # (B, N, D) in (t, h, w) order
        return (x - x.mean(dim=1, keepdim=True)) / (x.var(dim=1, unbiased=True, keepdim=True).sqrt() + 1e-6)


# ----------------------------------------------------------------------------------------------
# 5. SIGMA

class SIGMA(nn.Module):
    """The pretraining module: encoder + decoder (Psi), projection phi, prototypes and loss.

    The loss path of forward(videos (B, 3, T, H, W), mask (B, N) bool, True = masked), methods in this order below:
      _predict           Psi: encoder on the visible tubes, + a mask token per masked tube, decoder -> pred (B, N_m, D)
                         phi of the masked tubes (MLP on their pixels, frozen DINO, or pixels)   -> target (B, N_m, D)
      loss 'sigma'       prototype_scores: fp32 cosines of pred and target against K prototypes -> (B*N_m, K) each;
                         swapped_prediction_loss (sinkhorn.py): each side predicts the other's Sinkhorn code (Eq. 5-6)
      loss 'l2', 'pixel' mean squared error of pred against target (Eq. 2; 'pixel' is VideoMAE)
      clip_loss > 0      + clip_loss x clip_term: the views of a video predict each other's clip-level code
    Returns a dict: 'loss' (to backpropagate), its terms and collapse monitors, all 0-d tensors left on the device
    (the monitors are global over ranks). n_masked = masked tokens per clip if known on the host (train.py): the
    step then has no host sync and compiles into one graph; None reads it from the mask (one sync).
    state_dict() holds exactly the released checkpoint keys (released `modeling_pretrain.py` names): no positional
    tables and no frozen DINO weights.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg.validate()
        self.encoder = Encoder(cfg)  # built first: at one seed every variant starts from the same encoder
        if cfg.dec_depth:
            self.encoder_to_decoder = nn.Linear(cfg.enc_dim, cfg.dec_dim, bias=False)  # default init, as released
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.register_buffer("pos_embed", sinusoid_table(cfg.num_tokens, cfg.dec_dim), persistent=False)
            self.decoder = Decoder(cfg, cfg.target_dim)
        else:  # decoder-free: the mask token has the encoder's width, one Linear reads the predictions out
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.enc_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.decoder = nn.Linear(cfg.enc_dim, cfg.target_dim)
            init_vit_weights(self.decoder)

        if cfg.target == "mlp":  # PyTorch's default init, as released (only encoder/decoder use xavier)
            self.head = projection_mlp(cfg.tube_dim, cfg.proj_hidden, cfg.proj_dim)
        elif cfg.target == "dino":
            self.dino = DINO(cfg.dino_arch, cfg.img_size)
            self.dino.load_dino_state_dict(load_checkpoint(cfg.dino_weights))
            # The frozen DINO is not part of a SIGMA checkpoint (released ones do not hold it).
            self._register_state_dict_hook(_drop_dino_keys)
            self.register_load_state_dict_post_hook(_ignore_missing_dino_keys)
        if cfg.loss == "sigma":
            self.prototypes = nn.Parameter(F.normalize(torch.randn(cfg.num_prototypes, cfg.target_dim), dim=1))
        if cfg.clip_loss:  # built last, so that everything above is initialised as without it
            self.clip_head = projection_mlp(cfg.enc_dim, (CLIP_HIDDEN,), CLIP_DIM)
            self.clip_prototypes = nn.Parameter(F.normalize(torch.randn(cfg.clip_prototypes, CLIP_DIM), dim=1))

    def forward(self, videos, mask, n_masked=None, views=1):
        cfg = self.cfg
        pred, target, encoded = self._predict(videos, mask, n_masked)  # (B, N_m, D) each, (B, N_vis, C_e)
        out = {}
        if cfg.loss in ("l2", "pixel"):
            # Eq. 2: regress phi. With a jointly trained phi the trivial solution (phi constant) has zero loss --
            # the collapse SIGMA exists to prevent. With pixels it is VideoMAE.
            out["loss"] = F.mse_loss(pred.float(), target.float())
        else:
            s_phi, s_psi = self.prototype_scores(pred, target)  # (B*N_m, K) each
            out.update(swapped_prediction_loss(s_phi, s_psi, cfg.sk_eps, cfg.sk_iters, cfg.temperature,
                                               hard=not cfg.soft_codes))
        # Per-token spread of phi (mean over channels of the std over masked tokens): 0 if the target collapses.
        out["target_std"] = target.detach().float().flatten(0, 1).std(dim=0).mean()  # 0-d, stays on device
        if cfg.clip_loss:
            out["loss_clip"] = self.clip_term(encoded, views)
            out["loss"] = out["loss"] + cfg.clip_loss * out["loss_clip"]
        return out

    def _predict(self, videos, mask, n_masked=None):
        """predict() and the encoder's visible tokens (B, N_vis, C_e), which the clip-level term reads."""
        visible, masked = mask_order(mask, n_masked)  # (B, N_vis), (B, N_m) token indices
        # Plain version: if (mask.sum(dim=1) != masked.shape[1]).any(): raise; not used: the `if` waits for the GPU.
        torch._assert_async((mask.sum(dim=1) == masked.shape[1]).all(),
                            "every clip in a batch must mask the same number of tokens (tube masking does)")
        if not self.cfg.dec_depth:
            return self._predict_without_decoder(videos, mask, masked)
        # Psi: encode visible tubes, append one mask token per masked tube, decode.
        encoded = self.encoder(videos, mask, masked.shape[1])  # (B, N_vis, C_e)
        x = self.encoder_to_decoder(encoded)  # (B, N_vis, C_d)
        pos = self.pos_embed.to(x.dtype)  # (1, N, C_d)
        pos_masked = gather_tokens(pos, masked)  # (B, N_m, C_d)
        x = torch.cat([x + gather_tokens(pos, visible),  # visible first, in token order
                       self.mask_token + pos_masked],    # then masked, in token order
                      dim=1)  # (B, N, C_d)
        pred = self.decoder(x, masked.shape[1])  # (B, N_m, D)
        return pred, self.phi(videos, masked), encoded

    def predict(self, videos, mask, n_masked=None):
        """Psi's predictions and phi's targets for the masked tubes: two (B, N_m, D) tensors (decoder-free:
        for the predicted share of them, (B, M, D))."""
        return self._predict(videos, mask, n_masked)[:2]

    def _predict_without_decoder(self, videos, mask, masked):
        """dec_depth = 0: a random predict_share of each clip's masked tubes get a mask token (with its position)
        in the encoder's input; the rest are dropped. The choice uses torch's global generator, which train.py
        seeds per (seed, epoch, rank), so a resumed run draws the same."""
        n_pred = max(1, round(self.cfg.predict_share * masked.shape[1]))
        # Plain version: torch.randperm per clip; not used: a loop of B draws, where argsort of noise is one kernel.
        pick = torch.rand(masked.shape, device=masked.device).argsort(dim=1)[:, :n_pred]  # (B, M) of N_m
        where = masked.gather(1, pick.sort(dim=1).values)  # (B, M) token indices, ascending
        queries = self.mask_token + gather_tokens(self.encoder.pos_embed, where)  # (B, M, C_e)
        x = self.encoder(videos, mask, masked.shape[1], extra=queries)  # (B, N_vis + M, C_e)
        return self.decoder(x[:, -n_pred:]), self.phi(videos, where), x[:, :-n_pred]

    def phi(self, videos, index):
        """phi of the tubes at token indices `index` (B, M), in that order: (B, M, D)."""
        cfg = self.cfg
        if cfg.target == "dino":
            # Released code: the frozen DINO runs in fp32 outside the training autocast (its features are the
            # targets; bf16 would round them to 8 mantissa bits before the standardisation). TF32: precision.py.
            with torch.autocast(videos.device.type, enabled=False):
                y = dino_targets(self.dino, videos.float(), cfg.grid)  # (B, N, D), frozen, fp32
        else:
            with torch.no_grad():  # pixels are data; phi's gradient starts at the MLP below
                y = tube_pixel_targets(videos, cfg.tubelet_size, cfg.patch_size)  # (B, N, P*3)
        y = gather_tokens(y, index)  # (B, M, .) the asked tubes only
        return self.head(y) if cfg.target == "mlp" else y

    def targets(self, videos, mask, n_masked=None):
        """phi of the masked tubes, (B, N_m, D): what the decoder's predictions are compared with."""
        return self.phi(videos, mask_order(mask, n_masked)[1])

    def prototype_scores(self, pred, target):
        """Cosine scores against the prototypes: (s_phi, s_psi), each (B*N_m, K).

        Only s_phi reaches the prototypes' gradient; s_psi uses detached prototypes (released). fp32 with autocast
        off, like the released loss head: a bf16 matmul rounds the scores to 8 mantissa bits, which at K=3000 flips
        the argmax code of ~1% of the tokens (eps 0.05), ten times what the released fp16 path loses; TF32 on CUDA
        (precision.tf32_in_fp32_regions) flips no more than fp16 (tests/test_model.py).
        """
        self.normalize_prototypes()
        with torch.autocast(pred.device.type, enabled=False):
            z_phi = F.normalize(target.flatten(0, 1).float(), dim=-1)  # (B*N_m, D) fp32
            z_psi = F.normalize(pred.flatten(0, 1).float(), dim=-1)  # (B*N_m, D) fp32
            protos = self.prototypes.float()  # (K, D)
            return z_phi @ protos.t(), z_psi @ protos.detach().t()  # (B*N_m, K) each, fp32

    @torch.no_grad()
    def normalize_prototypes(self):
        """Project the prototypes back onto the unit sphere (in place, outside autograd)."""
        self.prototypes.copy_(F.normalize(self.prototypes.float(), dim=1))
        if self.cfg.clip_loss:
            self.clip_prototypes.copy_(F.normalize(self.clip_prototypes.float(), dim=1))

    def clip_term(self, encoded, views):
        """The clip-level swapped prediction (clip_loss > 0): encoded (B*V, N_vis, C_e), the encoder's visible
        tokens of V views per video, consecutive (train.py's --repeats layout) -> 0-d loss.

        Each view's mean-pooled tokens go through clip_head onto the unit sphere and are scored against the clip
        prototypes; Sinkhorn turns the scores of every clip of the global batch into soft codes that use each
        prototype equally (SwAV: soft codes, the prototypes learn from both views), and each view predicts the
        mean code of its video's other views. fp32 with autocast off, like the token loss."""
        if views < 2:
            raise ValueError("clip_loss needs two or more views of each video (train.py: --repeats 2)")
        z = self.clip_head(encoded.mean(dim=1))  # (B*V, CLIP_DIM)
        with torch.autocast(z.device.type, enabled=False):
            scores = F.normalize(z.float(), dim=-1) @ self.clip_prototypes.float().t()  # (B*V, K_c)
            codes = sinkhorn(scores, self.cfg.sk_eps, self.cfg.sk_iters).view(-1, views, scores.shape[1])
            other = (codes.sum(dim=1, keepdim=True) - codes) / (views - 1)  # (B, V, K_c): the other views' mean
            logp = F.log_softmax(scores / self.cfg.temperature, dim=-1).view_as(other)
            return -(other * logp).sum(dim=-1).mean()


def _drop_dino_keys(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix + "dino.")]:
        del state_dict[k]


def _ignore_missing_dino_keys(module, incompatible_keys):
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith("dino.")]


# ----------------------------------------------------------------------------------------------
# 6. Presets and build_model

PRESETS = {
    # Pretrains in minutes on a 2-core CPU on the built-in synthetic videos (64x64, 8 frames).
    "tiny": dict(img_size=64, num_frames=8, patch_size=8, enc_dim=192, enc_depth=6, enc_heads=3,
                 dec_dim=96, dec_depth=2, dec_heads=3, proj_hidden=(512, 512), proj_dim=128),
    "vit_s": dict(enc_dim=384, enc_depth=12, enc_heads=6, dec_dim=192, dec_depth=4, dec_heads=3),
    "vit_b": dict(enc_dim=768, enc_depth=12, enc_heads=12, dec_dim=384, dec_depth=4, dec_heads=6),
}


def build_config(arch, target="mlp", loss="sigma", num_prototypes=3000, **overrides):
    if arch not in PRESETS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {sorted(PRESETS)}")
    fields = Config.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid: {sorted(fields)}")
    if "proj_hidden" in overrides:
        overrides["proj_hidden"] = tuple(overrides["proj_hidden"])
    return Config(**{**PRESETS[arch], "target": target, "loss": loss,
                     "num_prototypes": num_prototypes, **overrides}).validate()


def build_model(arch, target="mlp", loss="sigma", num_prototypes=3000, **overrides):
    """The pretraining module for a preset ('tiny', 'vit_s', 'vit_b'); any Config field can be overridden, e.g.
    build_model('vit_b', target='dino', dino_weights='dino_vitbase16.pth')."""
    return SIGMA(build_config(arch, target, loss, num_prototypes, **overrides))


# ----------------------------------------------------------------------------------------------
# 7. Checkpoints: reading them without unpickling code, fitting them to a model

def load_checkpoint(path):
    """torch.load that never executes pickled code: tensors, containers and argparse.Namespace (the released
    checkpoints' `args`) only. Two ways a file can fail, told apart because they need different fixes:
      - it asks for more than weights_only=True allows (a class or function to run while unpickling): refused, as
        loading it would execute pickled code;
      - it cannot be read at all (cut short by an interrupted copy or download, or not a checkpoint): named as
        truncated or corrupt, with its size, so the fix (copy it again) is obvious.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path!r} does not exist") from None
    except (IsADirectoryError, PermissionError) as e:  # the file is fine, or may be: say what is wrong instead
        raise RuntimeError(f"cannot read checkpoint {path!r}: {e.strerror}") from None
    except Exception as e:
        # torch wraps the weights-only unpickler's UnpicklingError in a longer one; the original says what was
        # refused. Globals, reduce calls and non-allowlisted classes are pickled code; anything else from the
        # unpickler (an unknown opcode, a string running past the end) is damaged bytes, as are the zip reader's
        # RuntimeError and the EOFError / OSError / KeyError of a short file.
        cause = e.__context__ if isinstance(e.__context__, pickle.UnpicklingError) else e
        if isinstance(e, pickle.UnpicklingError) and re.search(r"GLOBAL|allowlisted|reduce for", str(cause)):
            raise RuntimeError(f"refusing to load {path!r}: it needs more than weights_only=True allows (it "
                               f"would execute pickled code). Details: {str(cause).strip().splitlines()[0]}") from None
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise RuntimeError(f"cannot read checkpoint {path!r} ({os.path.getsize(path):,} bytes): the file is "
                           f"truncated or corrupt; copy or download it again. Details: {type(cause).__name__}: "
                           f"{detail}") from None


def clean_state_dict(sd):
    """Unwrap {'model': ...} / {'module': ...} / {'state_dict': ...} containers and strip the `module.` (DDP) and
    `_orig_mod.` (torch.compile) prefixes."""
    for key in ("model", "module", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    return {k.replace("module.", "", 1).replace("_orig_mod.", ""): v for k, v in sd.items()}


def load_weights(module, sd):
    """Load a checkpoint (path or dict) into a SIGMA module or into an Encoder.

    For an Encoder, keys are taken from the `encoder.` namespace of a pretraining checkpoint, or used as they are
    (fine-tuned VideoMAE checkpoints store the encoder without a prefix); decoder / phi / prototype keys are then
    unexpected by design and ignored. Returns (missing, unexpected) key lists after a non-strict load -- callers
    decide what is fatal.
    """
    if isinstance(sd, str):
        sd = load_checkpoint(sd)
    sd = clean_state_dict(sd)
    if isinstance(module, Encoder) and any(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    # Positional tables are fixed functions of the config (never loaded); older checkpoints may hold them.
    sd = {k: v for k, v in sd.items() if not k.endswith("pos_embed")}
    own = module.state_dict()
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if shape_errors:
        raise ValueError("checkpoint does not fit this architecture (" + describe_state_dict(sd) + "):\n  "
                         + "\n  ".join(shape_errors[:8]))
    result = module.load_state_dict(sd, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def config_from_dict(fields):
    """Config from a checkpoint's `model_config` (a plain dict; tuples may come back as lists)."""
    return Config(**{**fields, "proj_hidden": tuple(fields["proj_hidden"])})


def load_encoder(path, arch=None, **overrides):
    """Frozen-evaluation entry point: an Encoder built to match a checkpoint, with its weights.

    path: one of our checkpoints (they carry their model config), a released SIGMA / VideoMAE checkpoint (pass
    arch, plus overrides such as num_frames / img_size if not 16x224), or 'random' for a randomly initialised
    baseline of `arch`. Returns (encoder, config). Raises with the architecture of the checkpoint if it does not fit.
    """
    if path == "random":
        cfg = build_config(arch or "tiny", target="pixel", loss="pixel", **overrides)
        return Encoder(cfg), cfg
    ckpt = load_checkpoint(path)
    if "model_config" in ckpt:  # ours: the exact architecture is stored beside the weights
        # The encoder does not depend on phi or the loss; don't require e.g. DINO weights here.
        cfg = replace(config_from_dict({**ckpt["model_config"], **overrides}), target="pixel", loss="pixel",
                      dino_weights="")
    elif arch is None:
        raise ValueError(f"{path} is not one of our checkpoints: pass its arch "
                         f"({describe_state_dict(ckpt)})")
    else:
        cfg = build_config(arch, target="pixel", loss="pixel", **overrides)
    encoder = Encoder(cfg)
    missing, _ = load_weights(encoder, ckpt)  # decoder / phi / prototype keys are not needed here
    if missing:
        raise ValueError(f"{path} lacks encoder weights {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                         f"({describe_state_dict(ckpt)})")
    return encoder, cfg


def describe_state_dict(sd):
    """Guess the architecture of a state dict (prefixed or not), e.g. for an error message."""
    sd = clean_state_dict(sd)
    pe = next((v for k, v in sd.items() if k.endswith("patch_embed.proj.weight")), None)
    if pe is None or pe.dim() != 5:
        return "no video tube embedding found"
    dim, depth = pe.shape[0], len({k.split(".")[1] for k in sd if k.startswith("blocks.")} |
                                  {k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")})
    preset = next((name for name, p in PRESETS.items() if p["enc_dim"] == dim and p["enc_depth"] == depth), None)
    return (f"encoder width {dim}, depth {depth}, tubes {tuple(pe.shape[2:])}"
            + (f" -> preset '{preset}'" if preset else " -> no preset matches; pass enc_dim/enc_depth"))


# ----------------------------------------------------------------------------------------------
# 8. Parameter counts and FLOPs (`python model.py`)

def count_params(module):
    return sum(p.numel() for p in module.parameters())


def train_step_flops(model, batch=1):
    """Forward + backward FLOPs of one training step on `batch` clips, counted by torch on 1 and 2 clips (2 and 4,
    two views each, with the clip-level term).

    Every counted op grows linearly with the clips (attention is quadratic in a clip's tokens, not in the batch), so
    the count is a + b * batch and the line through the two counts is exact; an fp32 step on `batch` clips, which
    may not fit in memory at a large batch, is never run.
    """
    cfg, device = model.cfg, model.mask_token.device
    views = 2 if cfg.clip_loss else 1  # the clip-level term needs two views of each video

    def count(clips):
        videos = torch.randn(clips, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=device)
        mask = tube_mask(clips, cfg.grid, 0.9).to(device)  # (clips, N)
        with FlopCounterMode(display=False) as counter:
            model(videos, mask, views=views)["loss"].backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    one = count(views)
    return one if batch == views else one + (batch - views) * (count(2 * views) - one) // views


if __name__ == "__main__":
    print(f"{'preset':6s} {'input':>10s} {'tokens':>6s} {'encoder':>12s} {'decoder':>11s} "
          f"{'phi (mlp)':>11s} {'whole':>12s} {'fwd+bwd GFLOPs/clip':>20s}")
    for name in PRESETS:
        model = build_model(name)
        cfg = model.cfg
        print(f"{name:6s} {cfg.num_frames}x{cfg.img_size}x{cfg.img_size:<4d} {cfg.num_tokens:6d} "
              f"{count_params(model.encoder):12,d} {count_params(model.decoder):11,d} "
              f"{count_params(model.head):11,d} {count_params(model):12,d} "
              f"{train_step_flops(model) / 1e9:20.1f}")
    print("whole = encoder + decoder + encoder_to_decoder + mask token + mlp phi + 3000 prototypes; "
          "FLOPs of one training step (90% masked), counted by torch.utils.flop_counter.\n"
          "Timing on this machine: python train.py --bench --arch vit_s")