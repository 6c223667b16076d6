"""Fused CFG sampling kernel vs the torch rules (on the CPU through TRITON_INTERPRET=1; on CUDA when present)."""

import pytest
import torch

pytest.importorskip("triton")
from fastjanus.engine.sampling import cfg_mix  # noqa: E402
from fastjanus.kernels.cfg_sample import cfg_sample, topk_threshold  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _guided(logits, w, paired):
    return cfg_mix(logits, w) if paired else logits.float()


def _poisoned(n, steps=4):
    return (torch.full((n,), -7, dtype=torch.long, device=DEV), torch.full((2 * n,), -7, dtype=torch.long, device=DEV),
            torch.full((n, steps), -7, dtype=torch.long, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,vocab", [(1, 1), (3, 7), (2, 513), (1, 1500)])
@pytest.mark.parametrize("paired,w", [(True, 1.0), (True, 5.0), (False, 1.0)])
def test_greedy_is_argmax_of_guided_logits(dtype, n, vocab, paired, w):
    g = torch.Generator().manual_seed(n * 1000 + vocab)
    logits = (torch.randn(2 * n if paired else n, vocab, generator=g) * 3).to(DEV, dtype)
    out, rows, hist = _poisoned(n)
    cfg_sample(logits, cfg_weight=w, temperature=0.0, seed=1, step=2, paired=paired, out=out,
               rows_out=rows if paired else None, history=hist, block_v=256)
    ref = _guided(logits, w, paired).argmax(-1)
    assert torch.equal(out, ref)
    assert torch.equal(hist[:, 2], ref) and (hist[:, [0, 1, 3]] == -7).all()  # only column `step` written
    if paired:
        assert torch.equal(rows, ref.repeat_interleave(2))


def test_greedy_ties_go_to_the_lowest_index():
    logits = torch.zeros(2, 3000, device=DEV)
    logits[0, [2999, 1700, 1025, 1024]] = 4.0  # maxima in three tiles of 1024; 1024 is first
    out = cfg_sample(logits, temperature=0.0, paired=False)
    assert out.tolist() == [1024, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,k", [(1, 1), (9, 1), (9, 4), (9, 9), (777, 50), (2049, 3)])
def test_topk_threshold_is_the_kth_largest_guided_logit(dtype, vocab, k):
    g = torch.Generator().manual_seed(vocab + k)
    logits = torch.randn(6, vocab, generator=g).to(DEV, dtype)
    thr = torch.full((3,), float("nan"), device=DEV)
    topk_threshold(logits, k=k, cfg_weight=3.0, out=thr, block_v=512)
    ref = torch.topk(cfg_mix(logits, 3.0), k, dim=-1).values[:, -1]
    assert torch.equal(thr, ref)


def test_topk_threshold_handles_ties_and_negative_zero():
    logits = torch.tensor([[-0.0, 0.0, 2.0, 2.0, -1.0, -5.0]], device=DEV)
    for k, want in [(1, 2.0), (2, 2.0), (3, 0.0), (5, -1.0), (6, -5.0)]:
        assert topk_threshold(logits, k=k, paired=False).item() == want


@pytest.mark.parametrize("k", [1, 4])
def test_top_k_never_samples_outside_the_top_k(k):
    n, vocab = 12, 50
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(2 * n, vocab, generator=g).to(DEV)
    allowed = torch.topk(cfg_mix(logits, 2.0), k, dim=-1).indices
    for step in range(2):  # high temperature: without the filter, most draws would land outside the top k
        out = cfg_sample(logits, cfg_weight=2.0, temperature=50.0, seed=5, step=step, top_k=k)
        assert (allowed == out[:, None]).any(-1).all()


def test_same_seed_same_stream_and_seed_or_step_changes_it():
    logits = torch.randn(2 * 16, 300, generator=torch.Generator().manual_seed(0)).to(DEV)

    def draw(seed, step):
        return cfg_sample(logits, cfg_weight=1.5, temperature=1.0, seed=seed, step=step)

    a = draw(7, 0)
    assert torch.equal(a, draw(7, 0))
    assert torch.equal(a, draw(torch.tensor([7], device=DEV), torch.tensor([0], device=DEV)))  # device scalars
    assert not torch.equal(a, draw(8, 0)) and not torch.equal(a, draw(7, 1))


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64), stat / 2).item()


def test_sampled_frequencies_match_guided_softmax():
    """Frequencies of n draws vs softmax((u + w·(c − u)) / T), and the test has the power to reject the
    distributions a bug would give (no guidance, no temperature, conditional row only)."""
    w, temp, n = 3.0, 0.7, 1000 if DEV == "cpu" else 200_000
    c = torch.tensor([0.3, 0.9, -0.4, 0.1, 0.6], dtype=torch.float64)
    u = torch.tensor([0.2, 0.8, -0.1, 0.5, 0.1], dtype=torch.float64)
    logits = torch.stack([c, u]).float().repeat(n, 1).to(DEV)  # n identical pairs, one draw each
    out = cfg_sample(logits, cfg_weight=w, temperature=temp, seed=123, step=0)
    counts = torch.bincount(out.cpu(), minlength=5).double()
    want = torch.softmax((u + w * (c - u)) / temp, -1)
    assert _chi2_pvalue(counts, want) > 1e-3
    for wrong in (torch.softmax(u + w * (c - u), -1), torch.softmax(c / temp, -1), torch.softmax(u / temp, -1)):
        assert _chi2_pvalue(counts, wrong) < 1e-5


def test_launcher_rejects_bad_arguments():
    logits = torch.randn(3, 10, device=DEV)
    with pytest.raises(AssertionError, match="even number of rows"):
        cfg_sample(logits)
    with pytest.raises(AssertionError, match="contiguous"):
        cfg_sample(torch.randn(10, 4, device=DEV).t())
    with pytest.raises(AssertionError, match="1-element"):
        cfg_sample(torch.randn(2, 10, device=DEV), temperature=torch.ones(2, device=DEV))



def test_history_write_past_the_buffer_is_dropped():
    logits = torch.randn(4, 30, device=DEV)
    hist = torch.full((2, 3), -7, dtype=torch.long, device=DEV)
    out = cfg_sample(logits, temperature=0.0, step=3, history=hist)  # column 3 of a 3-wide history
    assert (hist == -7).all() and torch.equal(out, cfg_mix(logits, 1.0).argmax(-1))
