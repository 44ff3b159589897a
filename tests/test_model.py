"""model.py: parameter counts, shapes, the mask convention, gradient flow, the released
checkpoint layout, DINO loading (with parity against an independent ViT), and collapse."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from data import tube_mask
from model import (DINO, Encoder, build_config, build_model, count_params, describe_state_dict,
                   load_checkpoint, load_weights, patchify, sinusoid_table, train_step_flops, tube_pixel_targets)
from sinkhorn import sinkhorn

TINY = dict(num_prototypes=64)  # tiny preset with few prototypes: fast tests


def clips(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)


def dino_layout_state_dict(dim=384, depth=2, grid=14, seed=0):
    """Random weights under the official DINO key names (what dino_vits16.pth holds)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.02 * torch.randn(*shape, generator=g)
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
          "patch_embed.proj.weight": r(dim, 3, 16, 16), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
                   p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
                   p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
                   p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
                   p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    return sd


def reference_vit(sd, frames, heads):
    """An independent DINO ViT forward with the *full* qkv bias (k bias included)."""
    x = F.conv2d(frames, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    B, N, C = x.shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = lambda name: sd[f"blocks.{i}.{name}"]
        h = F.layer_norm(x, (C,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(B, N, 3, heads, -1).unbind(2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(C // heads)
        o = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(B, N, C)
        x = x + F.linear(o, p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (C,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    return F.layer_norm(x, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 1:]


def released_keys(cfg, target="mlp", K=3000):
    """The released checkpoints' layout (parameter names of the released modeling_pretrain.py), written out
    independently of model.py: key -> shape."""
    keys = {"encoder.patch_embed.proj.weight": (cfg.enc_dim, 3, cfg.tubelet_size, cfg.patch_size, cfg.patch_size),
            "encoder.patch_embed.proj.bias": (cfg.enc_dim,),
            "encoder.norm.weight": (cfg.enc_dim,), "encoder.norm.bias": (cfg.enc_dim,),
            "decoder.norm.weight": (cfg.dec_dim,), "decoder.norm.bias": (cfg.dec_dim,),
            "decoder.head.weight": (cfg.target_dim, cfg.dec_dim), "decoder.head.bias": (cfg.target_dim,),
            "encoder_to_decoder.weight": (cfg.dec_dim, cfg.enc_dim), "mask_token": (1, 1, cfg.dec_dim),
            "prototypes": (K, cfg.target_dim)}
    for part, dim, depth in [("encoder", cfg.enc_dim, cfg.enc_depth), ("decoder", cfg.dec_dim, cfg.dec_depth)]:
        for i in range(depth):
            p = f"{part}.blocks.{i}."
            keys.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,), p + "norm2.weight": (dim,),
                         p + "norm2.bias": (dim,), p + "attn.q_bias": (dim,), p + "attn.v_bias": (dim,),
                         p + "attn.qkv.weight": (3 * dim, dim), p + "attn.proj.weight": (dim, dim),
                         p + "attn.proj.bias": (dim,), p + "mlp.fc1.weight": (4 * dim, dim),
                         p + "mlp.fc1.bias": (4 * dim,), p + "mlp.fc2.weight": (dim, 4 * dim),
                         p + "mlp.fc2.bias": (dim,)})
    if target == "mlp":
        dims = [cfg.tube_dim, *cfg.proj_hidden, cfg.proj_dim]
        for j in range(len(dims) - 1):
            keys[f"head.{2 * j}.weight"], keys[f"head.{2 * j}.bias"] = (dims[j + 1], dims[j]), (dims[j + 1],)
    return keys


# ---------------------------------------------------------------------------------------- sizes

def test_parameter_counts_match_released_code():
    vit_b = build_model("vit_b")
    assert count_params(vit_b.encoder) == 86_227_200
    assert count_params(vit_b) == 97_765_760
    assert count_params(build_model("vit_s").encoder) == 21_879_936
    # no positional table is a parameter or saved
    assert not any("pos_embed" in k for k in vit_b.state_dict())


@pytest.mark.parametrize("arch", ["tiny", "vit_s", "vit_b"])
def test_encoder_shapes(arch):
    cfg = build_config(arch)
    enc = Encoder(cfg).eval()
    x = clips(cfg, batch=1)
    mask = tube_mask(1, cfg.grid, 0.9)
    n_vis = cfg.grid[0] * (cfg.grid[1] * cfg.grid[2] - int(0.9 * cfg.grid[1] * cfg.grid[2]))
    with torch.no_grad():
        assert enc(x, mask).shape == (1, n_vis, cfg.enc_dim)
        if arch != "vit_b":  # all 1568 tokens through ViT-B is slow on CPU; the path is the same
            assert enc(x).shape == (1, cfg.num_tokens, cfg.enc_dim)
    if arch != "tiny":
        assert (cfg.num_tokens, n_vis) == (1568, 160)  # 8x14x14 tubes; 8 x (196 - 176) visible


@pytest.mark.parametrize("target,loss", [("mlp", "sigma"), ("pixel", "sigma"), ("mlp", "l2"),
                                         ("pixel", "pixel"), ("dino", "sigma"), ("dino", "l2")])
def test_forward_every_target_and_loss(target, loss, tmp_path):
    extra = {}
    if target == "dino":
        torch.save(dino_layout_state_dict(depth=12), tmp_path / "dino.pth")
        extra = dict(dino_weights=str(tmp_path / "dino.pth"), dino_arch="vit_s")
    torch.manual_seed(0)
    model = build_model("tiny", target=target, loss=loss, **TINY, **extra)
    cfg = model.cfg
    x, mask = clips(cfg), tube_mask(2, cfg.grid, 0.9, generator=torch.Generator().manual_seed(0))
    pred, tgt = model.predict(x, mask)
    n_masked = int(mask[0].sum())
    assert pred.shape == tgt.shape == (2, n_masked, cfg.target_dim)
    assert cfg.target_dim == {"mlp": 128, "pixel": 2 * 8 * 8 * 3, "dino": 384}[target]
    out = model(x, mask)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    if loss == "sigma":  # each term and monitor against the paper's formula on the same features
        ref = reference_swapped_prediction(model, pred, tgt)
        for key in ("loss_phi", "loss_psi", "assign_entropy"):
            assert torch.allclose(out[key], ref[key], rtol=1e-5, atol=0), key
        assert out["protos_used"] == ref["protos_used"]
        assert torch.allclose(out["loss"], ref["loss_phi"] + ref["loss_psi"], rtol=1e-5, atol=0)
    else:
        assert torch.allclose(out["loss"], F.mse_loss(pred, tgt), rtol=1e-5, atol=0)


def reference_swapped_prediction(model, pred, target):
    """Paper Eq. 5-6 with the released hard codes, written out from the model's features (B, N_m, D): cosine
    scores against the unit prototypes, each side's Sinkhorn argmax code, each side's cross-entropy against the
    other side's code, and the collapse monitor of phi's side (distinct codes, entropy of the mean softmax)."""
    cfg = model.cfg
    protos = F.normalize(model.prototypes.detach(), dim=1)  # (K, D)
    s_phi = F.normalize(target.detach().flatten(0, 1), dim=1) @ protos.t()  # (N, K)
    s_psi = F.normalize(pred.detach().flatten(0, 1), dim=1) @ protos.t()  # (N, K)
    y_phi = sinkhorn(s_phi, cfg.sk_eps, cfg.sk_iters).argmax(1)  # (N,)
    y_psi = sinkhorn(s_psi, cfg.sk_eps, cfg.sk_iters).argmax(1)  # (N,)
    mean_p = F.softmax(s_phi / cfg.temperature, dim=1).mean(0)  # (K,)
    return dict(loss_phi=F.cross_entropy(s_phi / cfg.temperature, y_psi),
                loss_psi=F.cross_entropy(s_psi / cfg.temperature, y_phi),
                protos_used=len(y_phi.unique()), assign_entropy=-(mean_p * mean_p.log()).sum())


def test_loss_terms_and_monitor_belong_to_their_side():
    # phi collapsed to one vector (its last Linear: zero weight, non-zero bias) while the decoder's predictions
    # vary. The total loss is symmetric in the two sides, so only the terms tell them apart: phi's monitor must
    # see one prototype, loss_phi must be phi's cross-entropy against psi's codes. Prototypes off the unit sphere
    # on entry: the loss must normalise them. Catches s_phi / s_psi unpacked in the wrong order, the monitor of
    # the wrong side, eps and tau swapped, soft codes where hard ones are configured.
    torch.manual_seed(0)
    model = build_model("tiny", **TINY)
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.linspace(-1, 1, model.cfg.proj_dim))
        model.prototypes.mul_(3.0)
    x, mask = clips(model.cfg), tube_mask(2, model.cfg.grid, 0.9, generator=torch.Generator().manual_seed(0))
    pred, tgt = model.predict(x, mask)
    assert (tgt == tgt[0, :1]).all() and pred.flatten(0, 1).std(0).min() > 0
    out = model(x, mask)
    ref = reference_swapped_prediction(model, pred, tgt)
    assert out["protos_used"] == ref["protos_used"] == 1
    assert len(sinkhorn(F.normalize(pred.detach().flatten(0, 1), dim=1) @ model.prototypes.detach().t())
               .argmax(1).unique()) > 10  # psi's side spreads: a swapped monitor would report it
    # (Not loss_psi: phi's identical rows get uniform codes, whose argmax, psi's label, is a tie broken by rounding.)
    for key in ("loss_phi", "assign_entropy"):
        assert torch.allclose(out[key], ref[key], rtol=1e-5, atol=0), key


# ------------------------------------------------------------------------------ mask convention

def test_mask_true_means_hidden_from_the_encoder():
    cfg = build_config("tiny")
    enc = Encoder(cfg).eval()
    x, mask = clips(cfg, batch=1), tube_mask(1, cfg.grid, 0.9, generator=torch.Generator().manual_seed(0))
    noise = torch.randn_like(x)
    with torch.no_grad():
        ref = enc(x, mask)
        # Perturb only the masked tubes: the encoder output must not change at all.
        masked_noise = patchify_mask_to_video(mask, cfg) * noise
        assert torch.equal(enc(x + masked_noise, mask), ref)
        # Perturb one visible tube: it must change.
        visible_noise = patchify_mask_to_video(~mask, cfg) * noise
        assert not torch.allclose(enc(x + visible_noise, mask), ref)


def patchify_mask_to_video(mask, cfg):
    """(B, N) token mask -> (B, 1, T, H, W) float pixel mask, via the (t, h, w) token order."""
    t, h, w = cfg.grid
    m = mask.float().reshape(-1, 1, t, 1, h, 1, w, 1)
    m = m.expand(-1, -1, -1, cfg.tubelet_size, -1, cfg.patch_size, -1, cfg.patch_size)
    m = m.reshape(-1, 1, cfg.num_frames, cfg.img_size, cfg.img_size)
    # cross-check against patchify: the pixels of token n are exactly tube n
    assert torch.equal(patchify(m, cfg.tubelet_size, cfg.patch_size).amax(dim=(2, 3)), mask.float())
    return m


def test_targets_line_up_with_masked_tokens_in_ascending_order():
    model = build_model("tiny", target="pixel", loss="pixel")
    cfg = model.cfg
    x, mask = clips(cfg), tube_mask(2, cfg.grid, 0.9)
    _, tgt = model.predict(x, mask)
    full = tube_pixel_targets(x, cfg.tubelet_size, cfg.patch_size)  # (B, N, P*3)
    for b in range(2):
        assert torch.equal(tgt[b], full[b, mask[b].nonzero().squeeze(1)])


def test_predictions_equal_a_decoder_run_in_token_order():
    # Psi written out in token order: the encoder's visible tokens projected to the decoder width, the mask token
    # at every masked position, the decoder's positions added to all N tokens, the blocks over the whole sequence
    # (attention without positions is order-free), and norm + head read at the masked positions. Catches
    # positions added to the wrong tokens, the decoder reading the wrong end of its sequence, norm and head swapped.
    torch.manual_seed(0)
    model = build_model("tiny", **TINY)
    cfg = model.cfg
    x, mask = clips(cfg), tube_mask(2, cfg.grid, 0.9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred, _ = model.predict(x, mask)  # (B, N_m, D)
        seq = model.mask_token.expand(2, cfg.num_tokens, -1).clone()  # (B, N, C_d)
        seq[~mask] = model.encoder_to_decoder(model.encoder(x, mask)).flatten(0, 1)
        seq = seq + sinusoid_table(cfg.num_tokens, cfg.dec_dim)
        for block in model.decoder.blocks:
            seq = block(seq)
        ref = model.decoder.head(model.decoder.norm(seq))[mask].reshape(pred.shape)
    assert torch.allclose(pred, ref, rtol=0, atol=1e-5)


def test_tube_pixel_targets_formula():
    cfg = build_config("tiny")
    x = clips(cfg, batch=1)
    y = tube_pixel_targets(x, 2, 8)  # (1, N, 2*8*8*3)
    # token 0 = frames 0-1, rows 0-7, cols 0-7; value order (p0, p1, p2, c)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    raw = x[0, :, 0:2, 0:8, 0:8] * std[:, None, None, None] + mean[:, None, None, None]  # (3, 2, 8, 8)
    raw = raw.permute(1, 2, 3, 0).reshape(128, 3)  # (p0 p1 p2, c)
    ref = (raw - raw.mean(0)) / (raw.std(0, unbiased=True) + 1e-6)
    assert torch.allclose(y[0, 0], ref.reshape(-1), atol=1e-5)


def test_unequal_mask_counts_fail_clearly():
    model = build_model("tiny", **TINY)
    x, mask = clips(model.cfg), tube_mask(2, model.cfg.grid, 0.9)
    mask[1, mask[1].nonzero()[0]] = False
    with pytest.raises(RuntimeError, match="same number"):  # an on-device assert: no host sync
        model(x, mask)


def test_sinusoid_table():
    t = sinusoid_table(50, 8)[0]
    assert torch.allclose(t[7, 2], torch.tensor(math.sin(7 / 10000 ** (2 / 8))))
    assert torch.allclose(t[7, 3], torch.tensor(math.cos(7 / 10000 ** (2 / 8))))


# ------------------------------------------------------------------------------- gradient flow

def test_gradients_sigma_mlp():
    model = build_model("tiny", **TINY)
    x, mask = clips(model.cfg), tube_mask(2, model.cfg.grid, 0.9)
    pred, tgt = model.predict(x, mask)
    s_phi, s_psi = model.prototype_scores(pred, tgt)
    # Psi's scores use detached prototypes: they train the encoder/decoder, not the prototypes.
    s_psi.square().sum().backward(retain_graph=True)
    assert model.prototypes.grad is None and model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.head.parameters())
    model.zero_grad(set_to_none=True)
    # phi's scores train the MLP and the prototypes, never the video model.
    s_phi.square().sum().backward()
    assert model.prototypes.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.head.parameters())
    assert all(p.grad is None for p in model.encoder.parameters())
    # The full loss reaches every trainable parameter.
    model.zero_grad(set_to_none=True)
    model(x, mask)["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dino_target_is_frozen(tmp_path):
    torch.save(dino_layout_state_dict(depth=12), tmp_path / "dino.pth")
    model = build_model("tiny", target="dino", dino_arch="vit_s", dino_weights=str(tmp_path / "dino.pth"), **TINY)
    model.train()
    assert not model.dino.training  # frozen means eval mode too
    x, mask = clips(model.cfg), tube_mask(2, model.cfg.grid, 0.9)
    model(x, mask)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.dino.parameters())
    assert model.prototypes.grad.abs().sum() > 0 and model.encoder.norm.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- checkpoints

def test_state_dict_is_the_released_layout():
    for arch in ["vit_b", "vit_s"]:
        model = build_model(arch)
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert own == released_keys(model.cfg)


def test_released_checkpoint_round_trip(tmp_path):
    model = build_model("vit_s")
    # A file as the released code writes it: a Namespace of args beside the weights.
    sd = {k: torch.randn(shape) for k, shape in released_keys(model.cfg).items()}
    ckpt = {"model": sd, "optimizer": {}, "epoch": 799, "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="pretrain_videomae_small_patch16_224", mask_ratio=0.9)}
    torch.save(ckpt, tmp_path / "checkpoint-799.pth")
    loaded = load_checkpoint(str(tmp_path / "checkpoint-799.pth"))
    assert loaded["args"].mask_ratio == 0.9
    model.load_state_dict(loaded["model"], strict=True)
    assert torch.equal(model.encoder.blocks[3].attn.q_bias, sd["encoder.blocks.3.attn.q_bias"])
    # The encoder alone loads from the full checkpoint, with DDP/compile prefixes stripped.
    wrapped = {"model": {"module._orig_mod." + k: v for k, v in sd.items()}}
    enc = Encoder(model.cfg)
    missing, unexpected = load_weights(enc, wrapped)
    assert missing == [] and all(not k.startswith("encoder.") for k in unexpected)
    assert torch.equal(enc.norm.weight, sd["encoder.norm.weight"])
    # A VideoMAE pretraining checkpoint (pixel target, no prototypes) fills encoder and decoder.
    videomae = build_model("vit_s", target="pixel", loss="pixel")
    vm_sd = {k: torch.randn(s) for k, s in released_keys(videomae.cfg, target="pixel").items() if k != "prototypes"}
    videomae.load_state_dict(vm_sd, strict=True)


class Payload:
    """Unpickling this calls print(): stands for arbitrary code hidden in a checkpoint."""

    def __reduce__(self):
        return print, ("payload executed",)


def test_loader_refuses_pickled_code(tmp_path, capsys):
    torch.save({"model": {}, "payload": Payload()}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="refusing"):
        load_checkpoint(str(tmp_path / "bad.pth"))
    assert "payload executed" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["cut in half", "last bytes missing", "empty", "not a checkpoint"])
def test_unreadable_checkpoint_is_called_truncated_or_corrupt(tmp_path, damage):
    """A damaged file is named and called truncated or corrupt, not a security risk."""
    good = tmp_path / "good.pth"
    torch.save({"model": build_model("tiny", **TINY).state_dict(), "args": argparse.Namespace(lr=1.0)}, good)
    data = good.read_bytes()
    bad = tmp_path / "ckpt.pth"
    bad.write_bytes({"cut in half": data[:len(data) // 2], "last bytes missing": data[:-10], "empty": b"",
                     "not a checkpoint": b"xyz" * 100}[damage])
    with pytest.raises(RuntimeError) as info:
        load_checkpoint(str(bad))
    message = str(info.value)
    assert "truncated or corrupt" in message and str(bad) in message
    assert "pickled code" not in message
    assert load_checkpoint(str(good))["args"].lr == 1.0  # the intact file still loads


def test_pickled_code_is_not_called_corrupt(tmp_path):
    torch.save({"model": {}, "payload": Payload()}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="pickled code") as info:
        load_checkpoint(str(tmp_path / "bad.pth"))
    assert "truncated" not in str(info.value) and "bad.pth" in str(info.value)


def test_wrong_architecture_is_named():
    sd = build_model("tiny", **TINY).state_dict()
    with pytest.raises(ValueError, match="preset 'tiny'"):
        load_weights(Encoder(build_config("vit_s")), sd)
    assert "preset 'vit_s'" in describe_state_dict(build_model("vit_s").state_dict())


def test_dino_loads_official_layout_and_matches_reference_vit(tmp_path):
    sd = dino_layout_state_dict(dim=384, depth=2, grid=14)
    sd["head.mlp.0.weight"] = torch.zeros(1)  # stray projection-head keys are ignored
    dino = DINO("vit_s", img_size=224)
    dino.blocks = dino.blocks[:2]
    ignored = dino.load_dino_state_dict(sd)
    assert ignored == ["head.mlp.0.weight"]
    frames = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = dino(frames)
    # Dropping the k bias is exact: the reference keeps the full qkv bias.
    assert ours.shape == (2, 196, 384)
    assert torch.allclose(ours, reference_vit(sd, frames, heads=6), atol=1e-4)


def test_dino_checkpoint_excluded_from_sigma_state_dict(tmp_path):
    torch.save({"teacher": {"backbone." + k: v for k, v in dino_layout_state_dict(depth=12).items()}},
               tmp_path / "dino_full.pth")  # a full DINO training checkpoint: teacher backbone
    model = build_model("tiny", target="dino", dino_arch="vit_s", dino_weights=str(tmp_path / "dino_full.pth"), **TINY)
    sd = model.state_dict()
    assert not any(k.startswith("dino.") for k in sd)
    assert sd["prototypes"].shape == (64, 384) and "head.0.weight" not in sd
    fresh = build_model("tiny", target="dino", dino_arch="vit_s", dino_weights=str(tmp_path / "dino_full.pth"), **TINY)
    fresh.load_state_dict(sd, strict=True)


def test_bad_config_messages():
    with pytest.raises(ValueError, match="multiple of tubelet_size"):
        build_model("tiny", num_frames=7)
    with pytest.raises(ValueError, match="needs dino_weights"):
        build_model("tiny", target="dino")
    with pytest.raises(ValueError, match="set target='pixel'"):
        build_model("tiny", loss="pixel")
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vit_h")
    with pytest.raises(ValueError, match="unknown model option"):
        build_model("tiny", drop_path=0.1)
    with pytest.raises(ValueError, match="expected videos"):
        model = build_model("tiny", **TINY)
        model(torch.randn(1, 3, 16, 64, 64), tube_mask(1, model.cfg.grid))


# ----------------------------------------------------------------------------------- collapse

def train_tiny(loss, steps=60):
    """A few dozen AdamW steps of a small model on a fixed stream of 4 smooth random batches."""
    torch.manual_seed(0)
    model = build_model("tiny", loss=loss, num_prototypes=64, enc_dim=96, enc_depth=2, dec_depth=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    videos = F.interpolate(torch.randn(16, 3, 8, 16, 16, generator=g), size=(8, 64, 64), mode="trilinear")
    history = []
    for step in range(steps):
        batch = videos[(4 * step) % 16:(4 * step) % 16 + 4]
        out = model(batch, tube_mask(4, model.cfg.grid, 0.9, generator=g))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append(out)
    return history


def test_l2_collapses_and_sigma_does_not():
    l2, sigma = train_tiny("l2"), train_tiny("sigma")
    # Eq. 2 with a jointly trained phi: the target's spread across tokens collapses.
    assert l2[-1]["target_std"] < 0.35 * l2[0]["target_std"]
    # SIGMA: the target spreads out and most prototypes stay in use.
    assert sigma[-1]["target_std"] > l2[0]["target_std"]
    assert sigma[-1]["protos_used"] >= 32 and sigma[-1]["loss"] < sigma[0]["loss"]


# --------------------------------------------------------------------------------- precision

def test_scores_codes_and_loss_are_fp32_under_bf16_autocast(monkeypatch):
    # Scores, Sinkhorn and the cross-entropy are fp32 also inside autocast (sinkhorn.py). Feed SIGMA.forward
    # the same fp32 features (K=3000, D=256, random unit features) with and
    # without bf16 autocast and record the Sinkhorn codes. Tolerance: codes identical, loss to 1e-6
    # relative. With autocast off in the loss both runs execute the same fp32 kernels, so anything
    # looser would hide a bf16 op: bf16 scores (8 mantissa bits, ~4e-3 relative) flip ~1% of the
    # 1200 argmax codes here and move the loss by ~1e-3.
    import sinkhorn as sk
    model = build_model("tiny", proj_dim=256, num_prototypes=3000)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 600, 256, generator=g), torch.randn(2, 600, 256, generator=g)
    # forward takes pred and target from _predict (its third output feeds only the clip-level term, off here)
    monkeypatch.setattr(model, "_predict", lambda videos, mask, n_masked=None: (pred, target, None))
    codes, plain = [], sk.sinkhorn
    monkeypatch.setattr(sk, "sinkhorn", lambda s, *a: codes.extend(plain(s, *a).argmax(-1)) or plain(s, *a))
    x, mask = clips(model.cfg), tube_mask(2, model.cfg.grid, 0.9)
    ref = model(x, mask)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = model(x, mask)["loss"]
    assert amp.dtype == torch.float32
    for fp32_codes, amp_codes in zip(codes[:2], codes[2:]):  # (phi, psi) of each run
        assert torch.equal(fp32_codes, amp_codes), f"{(fp32_codes != amp_codes).float().mean():.2%} codes differ"
    assert torch.allclose(amp, ref, rtol=1e-6, atol=0)


def test_dino_target_runs_in_fp32_outside_autocast(tmp_path):
    # Released code: the frozen DINO is evaluated in fp32 outside the training autocast.
    torch.save(dino_layout_state_dict(depth=12), tmp_path / "dino.pth")
    model = build_model("tiny", target="dino", dino_arch="vit_s", dino_weights=str(tmp_path / "dino.pth"), **TINY)
    x, mask = clips(model.cfg), tube_mask(2, model.cfg.grid, 0.9)
    ref = model.targets(x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = model.targets(x, mask)
    assert amp.dtype == torch.float32 and torch.equal(amp, ref)


def test_forward_backward_has_no_host_sync(monkeypatch):
    # The logged monitors stay 0-d tensors on the device and no Python-level read of a tensor value
    # (.item(), int(), float(), bool(), .tolist()) happens in a training step (train.py passes n_masked): on a
    # GPU each one would make the host wait for the GPU.
    model = build_model("tiny", **TINY)
    x, mask = clips(model.cfg), tube_mask(2, model.cfg.grid, 0.9)
    n_masked = int(mask[0].sum())
    def refuse(*args):
        raise AssertionError("host sync in the training step")
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out = model(x, mask, n_masked=n_masked)
    out["loss"].backward()
    monkeypatch.undo()
    plain = model(x, mask)  # n_masked read from the mask: the same step
    assert out.keys() == plain.keys() and all(torch.is_tensor(v) and v.ndim == 0 for v in out.values())
    assert all(torch.allclose(out[k].float(), plain[k].float(), rtol=1e-5, atol=0) for k in out)


class SyncOps(TorchDispatchMode):
    """Counts the aten ops whose output size depends on tensor data (nonzero, boolean-mask indexing,
    masked_select) or that read a value on the host (_local_scalar_dense): each makes the host wait for a GPU."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] if i is not None)
        if bool_index or name in ("nonzero", "masked_select", "_local_scalar_dense"):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


class OpNames(TorchDispatchMode):
    """The names of the aten ops that ran."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("target, loss", [("mlp", "sigma"), ("pixel", "pixel")])
def test_training_forward_has_no_sync_op_and_no_graph_break(target, loss):
    # Fixed-size gathers (mask_order): no data-dependent op in forward + backward (the boolean-mask gathers of
    # the tokens, positions and targets were 4 nonzero calls), and torch.compile captures the forward whole.
    model = build_model("tiny", target=target, loss=loss, **TINY)
    x, mask = clips(model.cfg), tube_mask(2, model.cfg.grid, 0.9)
    n_masked = int(mask[0].sum())
    with SyncOps() as ops:
        model(x, mask, n_masked=n_masked)["loss"].backward()
    assert ops.seen == []
    explained = torch._dynamo.explain(model)(x, mask, n_masked=n_masked)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_gathers_equal_boolean_mask_indexing():
    # mask_order's index sets pick exactly the tokens x[~mask] / x[mask] picked, in the same (ascending) order.
    from model import gather_tokens, mask_order
    mask = tube_mask(3, (2, 4, 4), 0.75, generator=torch.Generator().manual_seed(0))  # (3, 32)
    x = torch.randn(3, 32, 5)
    visible, masked = mask_order(mask)
    assert torch.equal(gather_tokens(x, visible), x[~mask].reshape(3, -1, 5))
    assert torch.equal(gather_tokens(x, masked), x[mask].reshape(3, -1, 5))
    assert torch.equal(mask_order(mask, n_masked=24)[0], visible)


def _keep_mantissa_bits(x, bits):
    """fp32 x with its mantissa truncated to `bits` bits (TF32 keeps 10): the lower 23 - bits bits zeroed."""
    return (x.view(torch.int32) & ~((1 << (23 - bits)) - 1)).view(torch.float32)


def code_flip_rates(K=3000, D=256, N=4096, eps=0.05):
    """Share of Sinkhorn argmax codes that differ from those of fp64 scores, for scores computed with TF32 inputs
    (10 mantissa bits, truncated: the worse of rounding and truncation; fp32 accumulation and output), on the
    released fp16 path (fp16 inputs and output) and in bf16 (8 bits). Random unit features: the closest calls."""
    from sinkhorn import sinkhorn
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(K, D, generator=g), dim=1)
    z = F.normalize(torch.randn(N, D, generator=g), dim=1)
    exact = sinkhorn((z.double() @ protos.double().t()).float(), eps).argmax(1)
    flips = lambda scores: (sinkhorn(scores, eps).argmax(1) != exact).float().mean().item()  # noqa: E731
    return dict(tf32=flips(_keep_mantissa_bits(z, 10) @ _keep_mantissa_bits(protos, 10).t()),
                fp16=flips((z.half().float() @ protos.half().float().t()).half()),
                bf16=flips((z.bfloat16().float() @ protos.bfloat16().float().t()).bfloat16()))


def test_tf32_scores_flip_no_more_codes_than_the_released_fp16_path():
    # At K = 3000 and eps 0.05 TF32 scores must flip no more codes than the released fp16 path, and fewer than
    # bf16 (which shows the comparison can tell the precisions apart).
    rates = code_flip_rates()
    assert rates["tf32"] <= rates["fp16"] < rates["bf16"], rates


def test_model_re_exports_the_precision_rule():
    # train.py and the evaluation scripts import the precision helpers from model; they live in precision.py.
    import model
    import precision
    for name in ("autocast_dtype", "inference_autocast", "tf32_in_fp32_regions"):
        assert getattr(model, name) is getattr(precision, name), name


def test_tf32_context_only_on_cuda_with_autocast(monkeypatch):
    # The flag is switched for the step on CUDA under bf16 / fp16 and restored after; fp32 runs and CPUs keep
    # true fp32 matmuls. (Setting the flag needs no GPU.)
    from precision import tf32_in_fp32_regions
    before = torch.backends.cuda.matmul.fp32_precision
    for device, precision, inside in [("cuda", "bf16", "tf32"), ("cuda", "fp16", "tf32"), ("cuda", "fp32", before),
                                      ("cpu", "bf16", before)]:
        with tf32_in_fp32_regions(torch.device(device), precision):
            assert torch.backends.cuda.matmul.fp32_precision == inside
        assert torch.backends.cuda.matmul.fp32_precision == before


def test_tube_embedding_matmul_equals_conv3d_forward_and_backward():
    # The matmul form of the tube embedding against the Conv3d it replaces, in fp64: output and the gradients
    # of the input, weight and bias; parameter names (the checkpoint layout) are the Conv3d's.
    from model import TubeEmbed
    torch.manual_seed(0)
    embed = TubeEmbed(24, tubelet=2, patch=4).double()
    assert list(embed.state_dict()) == ["proj.weight", "proj.bias"] and embed.proj.weight.shape == (24, 3, 2, 4, 4)
    x = torch.randn(2, 3, 4, 8, 12, dtype=torch.float64, requires_grad=True)
    with OpNames() as ops:
        out = embed(x)  # (2, 2*2*3, 24)
    assert "convolution" not in ops.names and {"addmm", "mm", "bmm"} & ops.names  # a GEMM, not a Conv3d
    ref = F.conv3d(x, embed.proj.weight, embed.proj.bias, stride=(2, 4, 4)).flatten(2).transpose(1, 2)
    assert out.shape == ref.shape == (2, 12, 24) and torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, embed.proj.weight, embed.proj.bias], g)
    ref_grads = torch.autograd.grad(ref, [x, embed.proj.weight, embed.proj.bias], g)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(grads, ref_grads))


def reference_encoder(enc, x, mask=None):
    """The released order, written out: every tube embedded by the Conv3d, positions added to all N tokens, the
    visible ones kept by boolean-mask indexing (mask None: all), then the blocks and the final norm."""
    cfg = enc.cfg
    kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
    x = F.conv3d(x, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=kernel)  # (B, D, t, h, w)
    x = x.flatten(2).transpose(1, 2) + sinusoid_table(cfg.num_tokens, cfg.enc_dim).to(x.dtype)  # (B, N, D)
    if mask is not None:
        x = x[~mask].reshape(len(x), -1, cfg.enc_dim)  # (B, N_vis, D)
    for block in enc.blocks:
        x = block(x)
    return enc.norm(x)


def test_encoder_embeds_the_visible_tubes_only():
    # Embedding the visible tubes alone equals embedding all N and dropping the masked ones, in fp64, forward and
    # backward; mask=None embeds every tube. The embedding's matmul runs on the visible tubes only: its FLOPs are
    # 2 x N_vis x tube values x width. Catches positions added to the wrong tokens, the masked tubes embedded
    # instead, and embedding every tube again.
    cfg = build_config("tiny")
    torch.manual_seed(0)
    enc = Encoder(cfg).double()
    x, mask = clips(cfg).double(), tube_mask(2, cfg.grid, 0.9, generator=torch.Generator().manual_seed(0))
    params = list(enc.parameters())
    for m in (mask, None):
        out, ref = enc(x, m), reference_encoder(enc, x, m)
        assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(out)
        grads, ref_grads = torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-10) for a, b in zip(grads, ref_grads))
    with FlopCounterMode(display=False) as counter:
        enc(x, mask)
    n_visible = int((~mask).sum())  # over the 2 clips
    assert sum(counter.get_flop_counts()["Encoder.patch_embed"].values()) == 2 * n_visible * cfg.tube_dim * cfg.enc_dim


def test_train_step_flops_extrapolates_two_counts_exactly():
    # train_step_flops runs steps of 1 and 2 clips only, and its line through them equals a direct count at 3.
    torch.manual_seed(0)
    model = build_model("tiny", **TINY)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    flops = train_step_flops(model, batch=3)
    assert seen == [1, 2]
    videos = torch.randn(3, 3, model.cfg.num_frames, model.cfg.img_size, model.cfg.img_size)
    with FlopCounterMode(display=False) as counter:
        model(videos, tube_mask(3, model.cfg.grid, 0.9))["loss"].backward()
    assert flops == counter.get_total_flops()


# ---- the two switches of docs/forking.md: --decoder_depth 0 (no decoder) and --clip_loss ----

def test_switches_left_off_draw_no_random_numbers_and_add_no_keys():
    # A fork's default-off option must leave the model bit-identical (same keys, same weights, same RNG state after
    # building), or every cached baseline would be a different model. predict_share only acts without a decoder.
    torch.manual_seed(0)
    base = build_model("tiny", **TINY).state_dict()
    after_base = torch.get_rng_state()
    torch.manual_seed(0)
    off = build_model("tiny", **TINY, predict_share=0.5, clip_loss=0.0, clip_prototypes=8).state_dict()
    assert torch.equal(torch.get_rng_state(), after_base)
    assert off.keys() == base.keys() and all(torch.equal(off[k], base[k]) for k in base)


def test_clip_head_is_built_last_so_the_rest_starts_as_without_it():
    torch.manual_seed(0)
    base = build_model("tiny", **TINY).state_dict()
    torch.manual_seed(0)
    with_clip = build_model("tiny", **TINY, clip_loss=1.0).state_dict()
    assert set(with_clip) - set(base) == {"clip_prototypes", "clip_head.0.weight", "clip_head.0.bias",
                                          "clip_head.2.weight", "clip_head.2.bias"}
    assert all(torch.equal(with_clip[k], base[k]) for k in base)


def test_clip_term_makes_each_view_predict_the_other_views_code():
    torch.manual_seed(0)
    model = build_model("tiny", **TINY, clip_loss=1.0, clip_prototypes=8)
    cfg = model.cfg
    x, mask = clips(cfg, batch=6), tube_mask(6, cfg.grid, 0.9)  # 3 videos x 2 views, consecutive
    out = model(x, mask, views=2)
    # Reference, written out: pooled visible tokens -> head -> sphere -> prototype scores; Sinkhorn codes over all
    # 6 clips; view 0 of a video is scored against view 1's code and vice versa.
    with torch.no_grad():
        tokens = model.encoder(x, mask)  # (6, N_vis, C)
        z = F.normalize(model.clip_head(tokens.mean(1)), dim=-1)
        s = z @ F.normalize(model.clip_prototypes, dim=-1).t()  # (6, 8)
        q, logp = sinkhorn(s, cfg.sk_eps, cfg.sk_iters), F.log_softmax(s / cfg.temperature, dim=-1)
        swapped = q.view(3, 2, 8).flip(1).reshape(6, 8)  # each clip's other view
        ref = -(swapped * logp).sum(-1).mean()
        own = -(q * logp).sum(-1).mean()  # what a term matching each view to itself would give
    assert torch.allclose(out["loss_clip"], ref, atol=1e-5) and not torch.allclose(ref, own, atol=1e-3)
    assert torch.allclose(out["loss"], out["loss_phi"] + out["loss_psi"] + cfg.clip_loss * out["loss_clip"],
                          atol=1e-5)
    # Its gradient reaches the encoder, the head and the clip prototypes.
    model.zero_grad()
    out["loss_clip"].backward()
    for name in ("encoder.blocks.0.attn.qkv.weight", "clip_head.0.weight", "clip_prototypes"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="two or more views"):
        model(x, mask, views=1)


def test_without_a_decoder_mask_tokens_enter_the_encoder_for_a_share_of_the_masked_tubes():
    torch.manual_seed(0)
    model = build_model("tiny", **TINY, dec_depth=0, predict_share=0.25)
    cfg = model.cfg
    assert not any(k.startswith(("encoder_to_decoder", "decoder.blocks")) for k in model.state_dict())
    x, mask = clips(cfg, batch=2), tube_mask(2, cfg.grid, 0.9)
    n_masked = int(mask[0].sum())
    seen = []
    hook = model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    pred, target = model.predict(x, mask)
    hook.remove()
    m = round(0.25 * n_masked)
    assert pred.shape == target.shape == (2, m, cfg.target_dim)
    assert seen == [(2, cfg.num_tokens - n_masked + m, cfg.enc_dim)]  # visible tokens + m mask tokens
    # Every target is phi of a masked tube (never a visible one), each at most once.
    with torch.no_grad():
        every = model.phi(x, torch.arange(cfg.num_tokens).expand(2, -1))  # (2, N, D)
    for b in range(2):
        hits = (target[b, :, None, :] - every[b, None, :, :]).abs().amax(-1) < 1e-6  # (m, N)
        where = hits.float().argmax(1)
        assert hits.sum(1).eq(1).all() and mask[b, where].all() and where.unique().numel() == m
    # The loss trains the mask token and the linear head, and every encoder block.
    model(x, mask)["loss"].backward()
    assert model.mask_token.grad.abs().sum() > 0 and model.decoder.weight.grad.abs().sum() > 0
    assert model.encoder.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_step_flops_of_the_switches_extrapolate_exactly():
    for overrides in (dict(clip_loss=1.0), dict(dec_depth=0)):
        torch.manual_seed(0)
        model = build_model("tiny", **TINY, **overrides)
        views = 2 if overrides.get("clip_loss") else 1
        with FlopCounterMode(display=False) as counter:
            model(clips(model.cfg, batch=6), tube_mask(6, model.cfg.grid, 0.9), views=views)["loss"].backward()
        assert train_step_flops(model, batch=6) == counter.get_total_flops()


# ============ a config that cannot train stops at construction, with what to change ============

@pytest.mark.parametrize("overrides, says", [
    (dict(img_size=60, patch_size=8), "img_size 60 is not a multiple of patch_size 8"),
    (dict(num_frames=15), "num_frames 15 is not a multiple of tubelet_size 2: pick e.g. 14"),
    (dict(enc_dim=100, enc_heads=8), "enc_dim 100 is not divisible by enc_heads 8"),
    (dict(dec_dim=100, dec_heads=8), "dec_dim 100 is not divisible by dec_heads 8"),
    (dict(target="rgb"), "unknown target 'rgb': choose mlp, dino or pixel"),
    (dict(loss="mse"), "unknown loss 'mse': choose sigma, l2 or pixel"),
    (dict(loss="pixel"), "loss='pixel' is VideoMAE, whose target is the pixels: set target='pixel'"),
    (dict(target="dino", dino_arch="vit_l", dino_weights=__file__), "unknown dino_arch 'vit_l'"),
    (dict(target="dino"), "target='dino' needs dino_weights=<local path"),
    (dict(target="dino", dino_weights="/no/such/dino.pth"), "dino_weights '/no/such/dino.pth' does not exist"),
    (dict(target="dino", dino_weights=__file__, img_size=120, patch_size=8), "img_size 120 must be a multiple of 16"),
    (dict(num_prototypes=1), "loss='sigma' needs num_prototypes >= 2"),
    (dict(dec_depth=-1), "dec_depth -1: 0 (no decoder) or more"),
    (dict(dec_depth=0, predict_share=0.0), "predict_share 0.0: the share of masked tubes"),
    (dict(clip_loss=-0.5), "clip_loss -0.5: a weight >= 0"),
    (dict(clip_prototypes=1), "clip_prototypes 1: 2 or more"),
])
def test_invalid_config_names_the_field_and_a_valid_value(overrides, says):
    # For code that builds the model itself (a notebook, a fork): train.py's options reach the same checks, but
    # a field no check covers would fail deep in the first forward pass instead, with a shape error.
    with pytest.raises(ValueError, match="invalid model config") as error:
        build_model("tiny", **overrides)
    assert says in str(error.value)


def test_invalid_config_lists_every_problem_at_once():
    with pytest.raises(ValueError) as error:
        build_model("tiny", num_frames=15, loss="mse", clip_prototypes=1)
    assert str(error.value).count("\n  - ") == 3
    # a decoder-free model does not check the decoder's heads (it has none)
    assert build_model("tiny", dec_depth=0, dec_dim=100).cfg.dec_depth == 0
