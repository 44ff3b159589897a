"""Sinkhorn-Knopp: marginals, parity with the literal algorithm (as SwAV and the released code run it),
distributed equivalence over 2 gloo processes, fp32 under autocast, and the swapped-prediction loss."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sinkhorn import assignment_stats, sinkhorn, swapped_prediction_loss


def random_scores(n, k, seed=0, d=16):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, d, generator=g), dim=1)
    protos = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return feats @ protos.t()  # (n, k) cosine similarities


def reference_sinkhorn(scores, eps, n_iters):
    """The algorithm step by step, on the full matrix, in float64: exp(s / eps) transposed to (K, N), divided
    by its total, then n_iters times rows to mass 1/K and columns to mass 1/N; columns finally sum to 1."""
    Q = torch.exp(scores.double() / eps).t()  # (K, N)
    K, N = Q.shape
    Q /= Q.sum()
    for _ in range(n_iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= N
    Q *= N
    return Q.t()


@pytest.mark.parametrize("eps", [0.05, 0.03])
def test_matches_literal_algorithm(eps):
    scores = random_scores(700, 50)
    assert torch.allclose(sinkhorn(scores, eps, 10), reference_sinkhorn(scores, eps, 10).float(), atol=1e-6)


def test_marginals():
    scores = random_scores(1200, 40)
    q = sinkhorn(scores, eps=0.05, n_iters=10)
    assert q.dtype == torch.float32 and q.shape == (1200, 40)
    assert torch.allclose(q.sum(1), torch.ones(1200), atol=1e-5)  # each token: a distribution
    # 10 iterations leave the prototype marginal slightly off; more iterations converge to N/K.
    assert (q.sum(0) / (1200 / 40) - 1).abs().max() < 0.05
    q = sinkhorn(scores, eps=0.05, n_iters=300)
    assert (q.sum(0) / (1200 / 40) - 1).abs().max() < 1e-3


def test_equipartition_spreads_clustered_tokens():
    # Tokens from 2 tight clusters: plain argmax piles them onto a few prototypes, the
    # Sinkhorn codes spread them over (nearly) all of them.
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(2, 16, generator=g), dim=1)
    feats = F.normalize(centers[torch.arange(2000) % 2] + 0.1 * torch.randn(2000, 16, generator=g), dim=1)
    scores = feats @ F.normalize(torch.randn(40, 16, generator=g), dim=1).t()
    plain = torch.bincount(scores.argmax(1), minlength=40)
    balanced = torch.bincount(sinkhorn(scores).argmax(1), minlength=40)
    assert (plain > 0).sum() < 20 and (balanced > 0).sum() >= 36
    assert balanced.max() < plain.max() / 4


def test_extreme_eps_does_not_overflow():
    scores = random_scores(300, 20)
    assert not torch.isfinite(torch.exp(scores / 0.008)).all()  # the literal exp overflows fp32 here
    q = sinkhorn(scores, eps=0.008, n_iters=10)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(300), atol=1e-4)


def test_fp32_inside_autocast():
    scores = random_scores(256, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sinkhorn(scores)
    assert q.dtype == torch.float32
    assert torch.equal(q, sinkhorn(scores.float()))


def _distributed_worker(rank, world, init_file, scores, splits, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    local = scores[splits[rank]:splits[rank + 1]]
    q = sinkhorn(local, eps=0.05, n_iters=10)
    used, entropy = assignment_stats(q.argmax(1), F.log_softmax(local / 0.1, dim=1))
    torch.save({"q": q, "used": used, "entropy": entropy}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_distributed_equals_concatenation(tmp_path):
    # Uneven split on purpose: 300 + 212 tokens, 24 prototypes.
    scores, splits = random_scores(512, 24, seed=3), [0, 300, 512]
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), scores, splits, str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    q_dist = torch.cat([p["q"] for p in parts])
    assert torch.allclose(q_dist, sinkhorn(scores, eps=0.05, n_iters=10), atol=1e-6)
    used, entropy = assignment_stats(sinkhorn(scores).argmax(1), F.log_softmax(scores / 0.1, dim=1))
    for p in parts:  # the collapse monitor is global too: every rank reports the same numbers
        assert p["used"] == used and math.isclose(p["entropy"], entropy, rel_tol=1e-6)


def test_swapped_prediction_hard_and_soft():
    s_phi = random_scores(400, 30, seed=1).requires_grad_()
    s_psi = random_scores(400, 30, seed=2).requires_grad_()
    out = swapped_prediction_loss(s_phi, s_psi, temperature=0.1, hard=True)
    loss, l_phi, l_psi = out["loss"], out["loss_phi"], out["loss_psi"]
    # Hard codes (released code): cross-entropy to the other side's argmax Sinkhorn code.
    y_psi, y_phi = sinkhorn(s_psi).argmax(1), sinkhorn(s_phi).argmax(1)
    assert torch.allclose(l_phi, F.cross_entropy(s_phi / 0.1, y_psi))
    assert torch.allclose(l_psi, F.cross_entropy(s_psi / 0.1, y_phi))
    # Soft codes (paper's equations): expected log-likelihood under the other side's codes.
    soft = swapped_prediction_loss(s_phi, s_psi, hard=False)
    assert torch.allclose(soft["loss_phi"], -(sinkhorn(s_psi) * F.log_softmax(s_phi / 0.1, 1)).sum(1).mean())
    assert torch.allclose(soft["loss_psi"], -(sinkhorn(s_phi) * F.log_softmax(s_psi / 0.1, 1)).sum(1).mean())
    # The gradient is the reference's: codes are targets (no gradient through them), each term trains its own
    # side, neither term is dropped or detached.
    reference = F.cross_entropy(s_phi / 0.1, y_psi) + F.cross_entropy(s_psi / 0.1, y_phi)
    grads, ref_grads = torch.autograd.grad(loss, [s_phi, s_psi]), torch.autograd.grad(reference, [s_phi, s_psi])
    assert torch.allclose(loss, reference) and all(g.abs().sum() > 0 for g in grads)
    assert all(torch.allclose(g, r, rtol=1e-5, atol=1e-9) for g, r in zip(grads, ref_grads))


def test_collapse_monitor_describes_phi_side():
    # phi's tokens take 3 distinct score rows, psi's are spread: the monitor counts phi's distinct codes (3, since
    # identical rows get identical codes) and the entropy of phi's mean softmax, not psi's.
    s_psi = random_scores(400, 30, seed=2)
    s_phi = random_scores(3, 30, seed=1)[torch.arange(400) % 3]
    out = swapped_prediction_loss(s_phi, s_psi, eps=0.05, temperature=0.1)
    mean_p = F.softmax(s_phi / 0.1, dim=1).mean(0)
    assert out["protos_used"] == len(sinkhorn(s_phi).argmax(1).unique()) == 3
    assert len(sinkhorn(s_psi).argmax(1).unique()) > 20
    assert torch.allclose(out["assign_entropy"], -(mean_p * mean_p.log()).sum())


def test_assignment_stats_detects_collapse():
    k = 50
    healthy = random_scores(2000, k)
    collapsed = healthy[:1].expand(2000, -1)  # every token has the same scores
    used_h, ent_h = assignment_stats(sinkhorn(healthy).argmax(1), F.log_softmax(healthy / 0.1, dim=1))
    used_c, ent_c = assignment_stats(sinkhorn(collapsed).argmax(1), F.log_softmax(collapsed / 0.1, dim=1))
    assert used_h > 0.8 * k and used_c == 1
    assert ent_h > 0.9 * math.log(k) and ent_c < ent_h


def test_both_sides_in_one_loop_share_the_all_reduces(monkeypatch):
    # SIGMA's two sides solved together: each side's codes equal its own solve (and the literal algorithm), and
    # the loop all-reduces once per iteration for both sides: 2 + n_iters calls instead of 2 x (2 + n_iters).
    import sinkhorn as sk
    a, b = random_scores(600, 48, seed=1), random_scores(600, 48, seed=2)
    calls = []
    plain = sk._all_reduce
    monkeypatch.setattr(sk, "_all_reduce", lambda x, *args, **kw: calls.append(x.shape) or plain(x, *args, **kw))
    both = sinkhorn([a, b], 0.05, 10)
    assert both.shape == (2, 600, 48) and len(calls) == 2 + 10
    for q, s in zip(both, (a, b)):
        assert torch.allclose(q, sinkhorn(s, 0.05, 10), atol=1e-6, rtol=0)
        assert torch.allclose(q, reference_sinkhorn(s, 0.05, 10).float(), atol=1e-6, rtol=0)


def test_local_only_skips_every_all_reduce(monkeypatch):
    # A fake world of 2 ranks that records the all-reduces: Sinkhorn and the loss issue them normally, none inside
    # local_only() (code that one rank runs alone would otherwise wait forever), and they are back after it.
    import sinkhorn as sk
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **kw: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda x, op=None, **kw: calls.append(op))
    a, b = random_scores(100, 16, seed=1), random_scores(100, 16, seed=2)
    sinkhorn(a, 0.05, 10)
    assert len(calls) == 2 + 10
    calls.clear()
    with sk.local_only():
        q = sinkhorn(a, 0.05, 10)
        swapped_prediction_loss(a, b)
    assert calls == [] and torch.allclose(q, reference_sinkhorn(a, 0.05, 10).float(), atol=1e-6)
    swapped_prediction_loss(a, b)
    assert len(calls) == 2 + 10 + 1  # the loop's, and the monitor's one
