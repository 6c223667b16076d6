"""Fused speculative verify step (kernels/spec_verify.py) against `verify_ref` (engine/speculative.py), on the CPU
through TRITON_INTERPRET=1 (on CUDA when present).

With the same SpecNoise both must give exactly the same integer state; the Philox path is checked for
determinism and, statistically, for the distribution the speculative rule promises. The interpreter costs
~10–70 ms per program instance, so the cases are few and small (W·N·tiles row programs + N image programs, and
topk_threshold's 32 passes per pair with top-k)."""

import pytest
import torch

pytest.importorskip("triton")
from fastjanus.engine.sampling import filter_top_k_top_p  # noqa: E402
from fastjanus.engine.speculative import SpecNoise, SpecState, guided, verify_ref  # noqa: E402
from fastjanus.kernels.spec_verify import spec_verify  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INT_FIELDS = ("codes", "done", "drafts", "q_row", "tokens", "passes")
W_CFG = 3.0


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), device=DEV).to(dtype)


def _start(n, window, n_tok, vocab, gen) -> SpecState:
    st = SpecState(n, window, n_tok, DEV)
    st.start(torch.randint(0, vocab, (n,), generator=gen).to(DEV),
             torch.randint(0, vocab, (n, window), generator=gen).to(DEV))
    return st


def _buffers(st: SpecState, vocab: int, dtype) -> dict:
    """The kernel's buffers: the reference state cloned; lse, thresholds and the previous pass's buffers
    poisoned with NaN (the first pass must read none of them, and every lse it returns must be written)."""
    N, W = st.n, st.window
    buf = {f: getattr(st, f).clone() for f in INT_FIELDS}
    buf.update(lengths=torch.arange(5, 5 + 2 * N, dtype=torch.int32, device=DEV), lse=_nan(N, W),
               prev_lse=_nan(N, W), thr=_nan(W * N), prev_thr=_nan(W * N), prev_logits=_nan(W * 2 * N, vocab,
                                                                                           dtype=dtype))
    return buf


def _logits(st: SpecState, vocab: int, dtype, gen, prev=None, lift_prob=0.6) -> torch.Tensor:
    """Random window-major paired logits [W·2N, V]. A row whose draft was carried over copies the previous pass's
    row it was drawn from (q_row) plus noise, as a real model's would nearly: p ≈ q, so carried drafts are often
    accepted, and a rejection's residual max(0, p − q) overlaps both supports. A random draft is, with
    probability lift_prob, lifted by up to 30 in both rows (so in the guided logits): p(draft) anywhere in
    (0, 1]. Every row is shifted by its own offset: the distributions stay, the top-k thresholds move apart (a
    kernel mixing up this pass's and the previous pass's thresholds would be caught)."""
    N, W = st.n, st.window
    q_row = st.q_row.t().cpu()  # [W, N]
    x = torch.randn(W, N, 2, vocab, generator=gen) * 2
    if prev is not None:
        prev = prev.float().cpu().view(W, N, 2, vocab)
        same = prev[q_row.clamp(min=0), torch.arange(N)] + torch.randn(W, N, 2, vocab, generator=gen)
        x = torch.where((q_row >= 0)[:, :, None, None], same, x)
    x += (torch.rand(W, N, 1, 1, generator=gen) - 0.5) * 40
    lift = ((torch.rand(W, N, generator=gen) < lift_prob) & (q_row < 0)) * torch.rand(W, N, generator=gen) * 30
    col = st.drafts.t().cpu()[:, :, None, None].expand(W, N, 2, 1)
    x.scatter_add_(3, col, lift[:, :, None, None].expand(W, N, 2, 1))
    return x.reshape(W * 2 * N, vocab).to(DEV, dtype)


def _noise(n, window, vocab, gen) -> SpecNoise:
    nz = SpecNoise.draw(n, window, vocab, gen, "cpu")
    return SpecNoise(*(t.to(DEV) for t in (nz.accept, nz.fresh, nz.residual, nz.init)))


def _run(buf, logits, *, temperature, top_k, block_v, noise=None, seed=0, pass_count=None):
    pc = torch.zeros(1, dtype=torch.int64, device=DEV) if pass_count is None else pass_count
    state = {k: v for k, v in buf.items() if k != "prev_logits"}
    spec_verify(logits, prev_logits=buf["prev_logits"], cfg_weight=torch.tensor([W_CFG], device=DEV),
                temperature=temperature, seed=seed, pass_count=pc, top_k=top_k, noise=noise, block_v=block_v,
                **state)
    return pc


def _decisions(st_before, a, codes):
    """(accepted drafts, rejected drafts, rejected carried drafts) of one pass, read off the reference: a kept
    code equal to its draft was accepted (a rejection never returns its draft: greedy replaces it with the
    different argmax, the residual max(0, p − q) is 0 at a rejected draft)."""
    done, drafts, q_row = st_before
    acc = rej = carried_rej = 0
    for n, k in enumerate(a.tolist()):
        for j in range(k):
            ok = codes[n, done[n] + j].item() == drafts[n, j].item()
            acc, rej = acc + ok, rej + (not ok)
            carried_rej += (not ok) and q_row[n, j].item() >= 0
    return acc, rej, carried_rej


CASES = [  # temperature, top_k, window, images, vocab, logits dtype, block_v, n_tok
    (0.0, None, 8, 2, 37, torch.float32, 16, 8),
    pytest.param(0.0, 3, 3, 1, 37, torch.bfloat16, 16, 6, marks=pytest.mark.slow),  # ~5 s each in the interpreter
    (1.0, None, 3, 3, 1500, torch.bfloat16, 512, 7),
    (1.0, 3, 2, 2, 37, torch.float32, 16, 6),
    pytest.param(0.7, 3, 3, 1, 37, torch.bfloat16, 16, 6, marks=pytest.mark.slow),
    (0.7, None, 8, 1, 1500, torch.float32, 512, 10),
    (1.0, None, 1, 3, 37, torch.bfloat16, 16, 6),
]


@pytest.mark.parametrize("temperature,top_k,W,N,V,dtype,block_v,n_tok", CASES)
def test_matches_verify_ref_over_passes(temperature, top_k, W, N, V, dtype, block_v, n_tok):
    """Consecutive passes, the updated state fed back (carried q's from pass 2 on), until every image is done
    and one more pass (done images accept nothing): every integer output exactly verify_ref's."""
    gen = torch.Generator().manual_seed(W * 100 + N * 10 + V)
    st = _start(N, W, n_tok, V, gen)
    buf = _buffers(st, V, dtype)
    ref_lengths = buf["lengths"].clone()
    pc = torch.zeros(1, dtype=torch.int64, device=DEV)
    acc = rej = carried_rej = idle = 0
    for p in range(3 * n_tok):
        finished = bool((st.done == n_tok).all())
        idle += int((st.done == n_tok).sum())
        logits, noise = _logits(st, V, dtype, gen, prev=st.prev_logits), _noise(N, W, V, gen)
        before = (st.done.tolist(), st.drafts.clone(), st.q_row.clone())
        _run(buf, logits, temperature=temperature, top_k=top_k, block_v=block_v, noise=noise, pass_count=pc)
        a = verify_ref(st, logits, cfg_weight=W_CFG, temperature=temperature, top_k=top_k, top_p=None, noise=noise,
                       lengths=ref_lengths)
        for f in INT_FIELDS:
            assert torch.equal(buf[f], getattr(st, f)), (f, p, buf[f], getattr(st, f))
        assert torch.equal(buf["lengths"], ref_lengths), p
        lse_ref = filter_top_k_top_p(guided(logits, N, W, W_CFG) / (temperature or 1.0), top_k, None).logsumexp(-1)
        torch.testing.assert_close(buf["lse"], lse_ref, rtol=1e-5, atol=1e-5)
        # the next pass's q: this pass's logits, normalisers and thresholds, and the pass counted on the device
        assert torch.equal(buf["prev_logits"], logits) and torch.equal(buf["prev_lse"], buf["lse"])
        if top_k is not None:
            kth = torch.topk(guided(logits, N, W, W_CFG), top_k, dim=-1).values[..., -1]  # [N, W]
            assert torch.equal(buf["prev_thr"], kth.t().flatten())
        assert pc.item() == p + 1
        d_acc, d_rej, d_car = _decisions(before, a, st.codes)
        acc, rej, carried_rej = acc + d_acc, rej + d_rej, carried_rej + d_car
        if finished:
            break
    assert finished and idle > 0, "every image finishes, then a pass runs with nothing left to accept"
    assert acc > 0 and rej > 0, (acc, rej)  # both branches ran
    if temperature > 0 and W > 1:  # the residual max(0, p − q) with a carried q ran
        assert carried_rej > 0


def test_rejected_carried_draft_under_top_k_uses_the_previous_pass_q():
    """A carried draft rejected under top-k: q is the previous pass's filtered distribution (its own threshold
    and normaliser), and the residual max(0, p − q) leaves the draft out. The residual noise is rigged to favour
    the draft, so q masked with this pass's thresholds (40 higher: q would vanish, the residual become p) would
    return it."""
    N, W, V, k = 1, 2, 37, 3
    gen = torch.Generator().manual_seed(9)
    prev, cur = torch.randn(W, V, generator=gen), torch.randn(W, V, generator=gen)
    prev[:, [5, 6, 7]] = torch.tensor([10.0, 9.5, 9.0])  # q's top 3: q(5) ≈ 0.51
    cur[:, [5, 6, 8]] = torch.tensor([9.0, 10.0, 9.5])  # p's top 3: p(5) ≈ 0.19
    cur += 40

    def paired(g):  # both rows g: guided g at any weight
        return g[:, None].expand(W, 2, V).reshape(W * 2, V).contiguous().to(DEV)

    st = SpecState(N, W, 8, DEV)
    st.start(torch.tensor([1], device=DEV), torch.tensor([[5, 6]], device=DEV))
    st.q_row = torch.tensor([[0, 1]], device=DEV)  # both drafts carried from the previous pass's rows 0, 1
    st.prev_logits = paired(prev)
    buf = _buffers(st, V, torch.float32)
    buf["prev_logits"].copy_(st.prev_logits)
    buf["prev_lse"].copy_(filter_top_k_top_p(prev, k, None).logsumexp(-1)[None])
    buf["prev_thr"].copy_(torch.topk(prev, k).values[:, -1])
    noise = _noise(N, W, V, gen)
    noise.accept.fill_(0.99)  # p(5)/q(5) ≈ 0.37: rejected
    noise.residual[0, 5] = 50.0
    ref_lengths = buf["lengths"].clone()
    _run(buf, paired(cur), temperature=1.0, top_k=k, block_v=16, noise=noise)
    verify_ref(st, paired(cur), cfg_weight=W_CFG, temperature=1.0, top_k=k, top_p=None, noise=noise,
               lengths=ref_lengths)
    assert st.codes[0, 1].item() in (6, 8)  # the residual's support
    for f in INT_FIELDS:
        assert torch.equal(buf[f], getattr(st, f)), f


def test_philox_same_key_same_result_and_pass_or_seed_change_it():
    N, W, V = 2, 3, 37
    gen = torch.Generator().manual_seed(5)
    st = _start(N, W, 9, V, gen)
    logits = _logits(st, V, torch.float32, gen)

    def run(seed, pass_no, top_k=None):
        buf = _buffers(st, V, torch.float32)
        pc = _run(buf, logits, temperature=1.0, top_k=top_k, block_v=16, seed=seed,
                  pass_count=torch.tensor([pass_no], device=DEV))
        assert pc.item() == pass_no + 1  # advanced on the device
        assert ((buf["drafts"] >= 0) & (buf["drafts"] < V)).all()  # random drafts too
        return buf

    a = run(11, 5)
    b = run(11, 5)
    c = run(11, 5, top_k=V)  # k ≥ V filters nothing (no threshold computed)
    for k in a:  # thr stays NaN (no top-k)
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True)
    for other in (run(11, 6), run(12, 5)):
        assert any(not torch.equal(a[f], other[f]) for f in ("codes", "drafts"))


def test_philox_greedy_matches_verify_ref_except_random_drafts():
    """Greedy takes no noise but the random drafts of positions new to the window."""
    N, W, V = 3, 3, 37
    gen = torch.Generator().manual_seed(6)
    st = _start(N, W, 9, V, gen)
    buf = _buffers(st, V, torch.float32)
    logits = _logits(st, V, torch.float32, gen)
    ref_lengths = buf["lengths"].clone()
    _run(buf, logits, temperature=0.0, top_k=None, block_v=16, seed=3)
    verify_ref(st, logits, cfg_weight=W_CFG, temperature=0.0, top_k=None, top_p=None,
               noise=_noise(N, W, V, gen), lengths=ref_lengths)
    for f in ("codes", "done", "q_row", "passes"):
        assert torch.equal(buf[f], getattr(st, f)), f
    assert torch.equal(buf["lengths"], ref_lengths)
    carried = st.q_row >= 0
    assert carried.any() and (~carried).any()
    assert torch.equal(buf["drafts"][carried], st.drafts[carried])


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64), stat / 2).item()


def _outcome(p, q, accept, residual):
    """The distribution of the code when a draft x ~ q is kept with probability accept[x], else replaced by a draw
    from `residual`."""
    kept = q * accept
    return kept + (1 - kept.sum()) * residual


def test_philox_first_code_is_distributed_as_p():
    """Carried drafts x ~ q, accepted with probability min(1, p/q), else replaced from norm(max(0, p − q)): the
    code is distributed as p (the speculative-sampling lemma), one image per sample. The check fails a correct
    kernel with probability 1e-3 (the p-value threshold; this seed passes). With these p and q it has the power
    to reject what broken rules would give (computed exactly below): the accept test flipped (u·q ≥ p), the
    draft always kept (a stuck uniform, u ≡ 0: q), the uniform halved (accept while u·q < 2p) or the residual
    drawn without its Gumbel noise (its argmax). Checked on the real kernel too: flipping its comparison,
    halving its Philox uniform or scaling its residual Gumbel noise by 0.1 each made this test fail."""
    N, V = 64, 3
    p = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)
    q = torch.tensor([0.02, 0.02, 0.96], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    st = SpecState(N, 1, 3, DEV)
    st.start(torch.zeros(N, dtype=torch.int64, device=DEV), torch.multinomial(q.float(), N, True, generator=gen)
             .to(DEV)[:, None])
    buf = _buffers(st, V, torch.float32)
    buf["q_row"].zero_()  # each draft was drawn from the previous pass's row 0: q
    buf["prev_logits"].copy_(q.log().float().repeat(2 * N, 1))  # both rows log q: guided log q at any weight
    buf["prev_lse"].copy_(torch.logsumexp(q.log().float(), 0))
    _run(buf, p.log().float().repeat(2 * N, 1).to(DEV), temperature=1.0, top_k=None, block_v=4, seed=2024)
    assert (buf["done"] == 2).all()
    counts = torch.bincount(buf["codes"][:, 1].cpu(), minlength=V).double()
    assert _chi2_pvalue(counts, p) > 1e-3, counts
    one = torch.ones(V, dtype=torch.float64)
    residual = (p - q).clamp(min=0) / (p - q).clamp(min=0).sum()
    wrong = {"flipped": _outcome(p, q, 1 - torch.minimum(p / q, one), residual), "stuck uniform": q,
             "halved uniform": _outcome(p, q, torch.minimum(2 * p / q, one), residual),
             "no residual noise": _outcome(p, q, torch.minimum(p / q, one), (residual == residual.max()).double())}
    for name, dist in wrong.items():  # each would fail the check above
        assert _chi2_pvalue(counts, dist) < 1e-3, (name, counts, dist)


def test_launcher_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(1)
    st = _start(2, 3, 8, 11, gen)
    buf = _buffers(st, 11, torch.float32)
    logits = _logits(st, 11, torch.float32, gen)
    with pytest.raises(AssertionError, match="rows"):
        _run(buf, logits[:-2], temperature=1.0, top_k=None, block_v=16)
    bad = dict(buf, lengths=buf["lengths"].long())
    with pytest.raises(AssertionError, match="lengths"):
        _run(bad, logits, temperature=1.0, top_k=None, block_v=16)
    with pytest.raises(AssertionError, match="thr"):
        _run(dict(buf, thr=None), logits, temperature=1.0, top_k=2, block_v=16)
    with pytest.raises(AssertionError, match="noise.fresh"):
        nz = _noise(2, 3, 10, gen)
        _run(buf, logits, temperature=1.0, top_k=None, block_v=16,
             noise=SpecNoise(nz.accept, nz.fresh, torch.zeros(2, 11, device=DEV), nz.init))
