"""
Sinkhorn-Knopp equipartition and SIGMA's symmetric swapped-prediction loss.

SIGMA scores every masked tube against K learnable prototypes twice: once through the
projection network phi (the target side) and once through the video model Psi (encoder +
decoder, the prediction side). Plain "predict phi's features" collapses when phi is trained
jointly (paper Eq. 2). SIGMA instead turns each side's scores into cluster assignments that are
forced to use every prototype equally often over the batch (an optimal-transport problem,
solved approximately by Sinkhorn-Knopp), and makes each side predict the other's assignment.

    python sinkhorn.py          # equipartition on a toy problem: prototype usage before / after

Conventions: scores are (N, K) = (tokens, prototypes) cosine similarities in [-1, 1].
Under torch.distributed every rank holds its own N tokens; the equipartition is over the
*global* batch (all ranks), exactly as if the scores had been concatenated on one process; inside
local_only() over this process's tokens alone.
"""
import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

_local_only = False  # set by local_only(): every _all_reduce is skipped


@contextlib.contextmanager
def local_only():
    """Inside, no all-reduce: for code that one rank runs alone (an estimate, a picture), where one would hang."""
    global _local_only
    before, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = before


def _all_reduce(x, op=dist.ReduceOp.SUM):
    """Reduce a tensor over all ranks in place (a no-op when not distributed, and inside local_only())."""
    if not _local_only and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=op)
    return x


@torch.no_grad()
def sinkhorn(scores, eps=0.05, n_iters=10):
    """Soft cluster assignments with equal prototype usage over the global batch.

    scores: (N, K) similarities of this rank's N tokens to K prototypes (any dtype), or a list of S such
            matrices: S independent problems solved in one loop (SIGMA's two sides), sharing every all-reduce.
    returns: (N, K) fp32 codes, or (S, N, K) for a list; each row sums to 1, and summed over the tokens of
             *all* ranks every prototype receives the same mass N_total / K.

    Q = exp(scores / eps) is a transport plan between tokens (rows) and prototypes (columns); small eps = sharper
    codes. Sinkhorn-Knopp alternately rescales its prototype columns to mass 1/K each and its token rows to mass
    1/N_total each (Cuturi 2013; SwAV's `distributed_sinkhorn`, as in the released code).
    Plain version: alternately normalise the columns and rows of Q, one call per problem; not used: each
    normalisation is several passes over the N x K matrix, and a call per problem repeats every all-reduce.
    Every rescaling multiplies Q by a diagonal matrix, so after any number of steps
        Q = diag(v) P diag(u),   P = exp(scores / eps),   v (N,) scales the token rows, u (K,) the prototype columns,
    and it suffices to iterate u and v: each step is one matrix-vector product per problem, and the S problems
    share each step's all-reduce. The result is the same algorithm (tests/test_sinkhorn.py checks it against the
    literal matrix version).
    """
    single = torch.is_tensor(scores)
    scores = [scores] if single else list(scores)
    # fp32 always: exp(1 / 0.03) ~ 3e14 overflows fp16, and bf16 loses the small entries.
    # Autocast would run the matrix-vector products below in bf16, so switch it off here.
    with torch.autocast(scores[0].device.type, enabled=False):
        # Subtracting one constant from all scores of a problem (its global max) rescales P by a scalar that
        # the first normalisation absorbs exactly; it keeps exp() <= 1, so no overflow at small eps.
        s_max = _all_reduce(torch.stack([s.max() for s in scores]).float(), op=dist.ReduceOp.MAX)  # (S,)
        S, (N, K) = len(scores), scores[0].shape
        # Plain version: P = ((torch.stack(scores).float() - s_max[:, None, None]) / eps).exp(); not used: each op
        # allocates another (S, N, K) fp32 tensor, the largest of the step; here one is filled, then updated in place.
        P = scores[0].new_empty((S, N, K), dtype=torch.float32)  # the plans
        for p, s, m in zip(P, scores, s_max):
            torch.sub(s.float(), m, out=p)
        P.div_(eps).exp_()  # (S, N, K)
        # Plain version: N * world_size, a Python number; not used: tokens per rank may differ (e.g. the last batch),
        # so they are all-reduced, into a (1,) tensor filled on the device that stays there: no host sync per step.
        n_total = _all_reduce(P.new_full((1,), float(N)))

        v = P.new_ones(S, N)  # token scaling: the first step weighs tokens equally
        for _ in range(n_iters):
            # Prototypes: mass of prototype k = u_k * sum_j v_j P_jk = 1/K. The sum runs over the tokens of
            # every rank, so it is all-reduced -- the only communication in the loop, one for all S problems.
            # (One matrix-vector product per problem: on CPU a batched matmul of a vector is 2x slower, measured.)
            u = 1.0 / (K * _all_reduce(torch.stack([p.t() @ x for p, x in zip(P, v)])))  # (S, K)
            # Tokens: mass of token j = v_j * sum_k P_jk u_k = 1/N_total. Local to this rank.
            v = 1.0 / (n_total * torch.stack([p @ x for p, x in zip(P, u)]))  # (S, N)
        # Q = diag(N_total v) P diag(u): each token's row sums to 1, a distribution over prototypes per token.
        P.mul_(u.unsqueeze(1)).mul_((n_total * v).unsqueeze(2))  # (S, N, K)
        return P[0] if single else P


def swapped_prediction_loss(s_phi, s_psi, eps=0.05, n_iters=10, temperature=0.1, hard=True):
    """SIGMA's symmetric swapped prediction (paper Eq. 5-6).

    s_phi: (N, K) scores of the projection network's features (the target side).
    s_psi: (N, K) scores of the video model's predictions, computed against *detached*
           prototypes by the caller (released code: prototypes learn through s_phi only).
    Each side predicts the Sinkhorn codes of the other side:
        L = CE(s_phi / tau, q_psi) + CE(s_psi / tau, q_phi),  mean over the N tokens.
    hard=True (released code) uses the argmax of the codes as a class label; hard=False uses
    the soft codes q as in the paper's equations.
    returns: dict(loss, loss_phi, loss_psi, protos_used, assign_entropy); loss_phi is the term
    that trains phi, the last two are the collapse monitor of phi's side (assignment_stats).
    """
    # The whole loss is fp32 with autocast off (as the released loss head), like Sinkhorn: the logits s / tau span
    # [-10, 10] and the cross-entropy compares them with a precision bf16 does not have.
    with torch.autocast(s_phi.device.type, enabled=False):
        q_phi, q_psi = sinkhorn([s_phi, s_psi], eps, n_iters)  # (N, K) each, no grad; one loop, shared all-reduces
        logp_phi = F.log_softmax(s_phi.float() / temperature, dim=-1)  # (N, K)
        logp_psi = F.log_softmax(s_psi.float() / temperature, dim=-1)  # (N, K)
        y_phi = q_phi.argmax(dim=-1)  # (N,) hard assignment of each token on phi's side
        if hard:
            loss_phi = F.nll_loss(logp_phi, q_psi.argmax(dim=-1))
            loss_psi = F.nll_loss(logp_psi, y_phi)
        else:
            loss_phi = -(q_psi * logp_phi).sum(dim=-1).mean()
            loss_psi = -(q_phi * logp_psi).sum(dim=-1).mean()
        used, entropy = assignment_stats(y_phi, logp_phi.detach())
    return dict(loss=loss_phi + loss_psi, loss_phi=loss_phi.detach(), loss_psi=loss_psi.detach(),
                protos_used=used, assign_entropy=entropy)


@torch.no_grad()
def assignment_stats(assignments, logp):
    """Collapse monitor over the global batch.

    assignments: (N,) prototype index of each token (argmax of its Sinkhorn code: the hard target the
    other side must predict). logp: (N, K) log_softmax(scores / tau) of the same tokens.
    Returns 0-d tensors (prototypes_used, entropy): how many prototypes are assigned at least one token on any
    rank, and the entropy (nats) of the mean soft assignment exp(logp). Healthy: many prototypes used
    and entropy towards ln(K). Collapse (identical features): one prototype used. Entropy falling
    towards 0 while prototypes stay in use means phi's features crowd onto a few prototypes and
    only Sinkhorn's rebalancing still spreads the targets -- an early warning.
    """
    K = logp.shape[1]
    # Plain version: torch.bincount(assignments, minlength=K); not used: its output size depends on the data (on a
    # GPU a host sync, and a torch.compile graph break), where index_add_ into K zeros keeps the shape K.
    counts = logp.new_zeros(K, dtype=torch.float32).index_add_(
        0, assignments, logp.new_ones(assignments.shape, dtype=torch.float32))  # (K,)
    p = logp.exp().sum(dim=0)  # (K,) summed soft mass
    # One all-reduce for both statistics: [assignment counts | soft mass | token count].
    packed = torch.cat([counts, p.float(), logp.new_full((1,), float(logp.shape[0]), dtype=torch.float32)])
    _all_reduce(packed)
    counts, p, n = packed[:K], packed[K:2 * K], packed[-1]
    p = p / n
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    # Plain version: return numbers read with .item(); not used: each read makes the host wait for the GPU, every
    # step. These 0-d tensors stay on the device; train.py reads all logged scalars at once per log interval.
    return (counts > 0).sum(), entropy


if __name__ == "__main__":
    # Toy problem: 4096 tokens drawn around 4 tight directions, 64 random prototypes. Plain
    # argmax piles all tokens onto the few prototypes nearest those directions; Sinkhorn
    # spreads them evenly while keeping each token on a prototype that still scores well.
    torch.manual_seed(0)
    N, K, D = 4096, 64, 32
    centers = F.normalize(torch.randn(4, D), dim=-1)
    feats = F.normalize(centers[torch.randint(0, 4, (N,))] + 0.05 * torch.randn(N, D), dim=-1)
    protos = F.normalize(torch.randn(K, D), dim=-1)
    scores = feats @ protos.t()  # (N, K) cosine similarities

    for name, assign in [("argmax of scores", scores.argmax(-1)),
                         ("argmax of Sinkhorn codes", sinkhorn(scores).argmax(-1))]:
        usage = torch.bincount(assign, minlength=K)
        print(f"{name:26s}: {int((usage > 0).sum()):3d}/{K} prototypes used, "
              f"max load {usage.max().item():5d} tokens (uniform = {N // K})")
    q = sinkhorn(scores)
    print(f"Sinkhorn marginals: prototype mass {q.sum(0).min():.1f}..{q.sum(0).max():.1f} "
          f"(target {N / K:.1f}), token mass {q.sum(1).min():.4f}..{q.sum(1).max():.4f} (target 1)")
    used, ent = assignment_stats(q.argmax(-1), F.log_softmax(scores / 0.1, dim=-1))
    print(f"collapse monitor: {int(used)} prototypes assigned, entropy of the mean soft assignment (tau 0.1) "
          f"{ent:.2f} (max ln K = {math.log(K):.2f})")
