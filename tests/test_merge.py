"""The merging layer: closed form vs an independent KKT solve, the constraint, gradients."""

import pytest
import torch

from mci_lib import erase
from mci_lib.merge import MergeFactor, hard_merge, independent_rows, merge_residual, soft_merge



@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _problem(seed=0, d=6, d_out=5, R=20, n=2, t=2):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d, generator=g, dtype=torch.float64)
    Wn = [W + 0.3 * torch.randn(d_out, d, generator=g, dtype=torch.float64) for _ in range(n)]
    Cn = [torch.randn(t, d, generator=g, dtype=torch.float64) for _ in range(n)]
    K = torch.randn(R, d, generator=g, dtype=torch.float64)
    return W, Wn, Cn, K


def _kkt_solution(W, Wn, Cn, K, delta):
    """Each output row w' minimises (w'-w) M (w'-w)^T s.t. C w'^T = v: solve the KKT system."""
    d = W.shape[1]
    M = K.T @ K + delta * torch.eye(d)
    C = torch.cat(Cn)
    VT = torch.cat([w @ c.T for w, c in zip(Wn, Cn)], dim=1)
    T = C.shape[0]
    kkt = torch.zeros(d + T, d + T)
    kkt[:d, :d] = 2 * M
    kkt[:d, d:] = C.T
    kkt[d:, :d] = C
    rows = []
    for i in range(W.shape[0]):
        rhs = torch.cat([2 * M @ W[i], VT[i]])
        rows.append(torch.linalg.solve(kkt, rhs)[:d])
    return torch.stack(rows)


def test_hard_merge_equals_kkt_solution_and_meets_constraint():
    W, Wn, Cn, K = _problem()
    factor = MergeFactor.from_embeddings(K, delta=1e-3)
    merged = hard_merge(W, Wn, Cn, factor)
    assert torch.allclose(merged, _kkt_solution(W, Wn, Cn, K, 1e-3), atol=1e-6)
    C = torch.cat(Cn)
    VT = torch.cat([w @ c.T for w, c in zip(Wn, Cn)], dim=1)
    assert torch.allclose(merged @ C.T, VT, atol=1e-8)
    assert merge_residual(merged, Wn, Cn) < 1e-10


def test_single_concept_without_regularization_pull_returns_adapted_weights():
    W, Wn, Cn, K = _problem(n=1, t=6, d=6)  # targets span the space: the constraint fixes W'
    factor = MergeFactor.from_embeddings(K, delta=1e-3)
    assert torch.allclose(hard_merge(W, Wn, Cn, factor), Wn[0], atol=1e-8)
    # with a vanishing regularization set the soft form also returns W_1 as lam_m grows
    tiny = MergeFactor.from_embeddings(torch.zeros(1, 6), delta=1e-9)
    W1, Wn1, Cn1, _ = _problem(n=1, t=3, d=6)
    assert torch.allclose(soft_merge(W1, Wn1, Cn1, tiny, lam_m=1e6) @ Cn1[0].T, Wn1[0] @ Cn1[0].T, atol=1e-6)


def test_duplicate_target_rows_are_dropped_by_rank():
    W, Wn, Cn, K = _problem()
    near_copy = Cn[0][:1] * (1 + 1e-9)
    Cn_dup = [torch.cat([Cn[0], near_copy]), Cn[1]]
    keep = independent_rows(torch.cat(Cn_dup))
    assert keep.tolist() == [0, 1, 3, 4]
    factor = MergeFactor.from_embeddings(K, delta=1e-3)
    # the duplicate row carries the same target, so the answer is unchanged and finite
    merged = hard_merge(W, [Wn[0], Wn[1]], Cn_dup, factor)
    assert torch.isfinite(merged).all()
    assert torch.allclose(merged, hard_merge(W, Wn, Cn, factor), atol=1e-6)


def test_more_target_rows_than_dimensions_stays_solvable():
    W, Wn, Cn, K = _problem(d=4, t=3, n=2)  # 6 target rows in 4 dimensions
    merged = hard_merge(W, Wn, Cn, MergeFactor.from_embeddings(K, delta=1e-3))
    assert torch.isfinite(merged).all()


def test_soft_merge_approaches_hard_merge_as_lambda_grows():
    W, Wn, Cn, K = _problem()
    factor = MergeFactor.from_embeddings(K, delta=1e-3)
    hard = hard_merge(W, Wn, Cn, factor)
    gaps = [(soft_merge(W, Wn, Cn, factor, lam) - hard).norm().item() for lam in (1.0, 1e2, 1e4, 1e6)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-3


def test_gradcheck_hard_and_soft():
    W, Wn, Cn, K = _problem(d=4, d_out=3, R=8, n=2, t=1)
    inputs = [t.clone().requires_grad_(True) for t in (W, Wn[0], Wn[1], Cn[0], Cn[1], K)]

    def hard(W, W1, W2, C1, C2, K):
        return hard_merge(W, [W1, W2], [C1, C2], MergeFactor.from_embeddings(K, 1e-2))

    def soft(W, W1, W2, C1, C2, K):
        return soft_merge(W, [W1, W2], [C1, C2], MergeFactor.from_embeddings(K, 1e-2), lam_m=3.0)

    assert torch.autograd.gradcheck(hard, inputs, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(soft, inputs, eps=1e-6, atol=1e-5)


def test_bad_inputs_are_refused():
    W, Wn, Cn, K = _problem()
    with pytest.raises(ValueError, match="delta"):
        MergeFactor.from_embeddings(K, delta=0.0)
    with pytest.raises(ValueError, match="adapted weights"):
        hard_merge(W, Wn, Cn[:1], MergeFactor.from_embeddings(K, 1e-3))


def test_prompt_rows_let_every_concept_into_the_hard_merge(micro_pipe):
    """The defect ``immunize.merge_rows: prompt`` mends: one prompt's sequence rows (concept word
    to the end, padding included) span every dimension of a narrow text encoder, so the hard merge
    keeps the first concept's rows and drops the second's; its prompt rows (word to end-of-text)
    leave room for both."""
    prompts, words = ["a photo of a badge", "a photo of a tile"], ["badge", "tile"]
    d = micro_pipe.text_encoder.config.hidden_size
    for through, second_kept in (("sequence", False), ("prompt", True)):
        rows = erase.token_rows(micro_pipe, prompts, words, through)
        keep = independent_rows(torch.cat(rows))
        from_second = int((keep >= rows[0].shape[0]).sum())
        assert (from_second == rows[1].shape[0]) == second_kept, (through, from_second, d)
        if not second_kept:
            assert from_second <= 1 and len(keep) >= d - 1
