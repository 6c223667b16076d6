"""CUDA Graph runtime on a GPU (skipped without CUDA): graphs on vs off identical, every output written by a
replay, buckets reused across request sizes, no memory growth."""
import pytest
import torch
from PIL import Image

import fastjanus
from fastjanus.random_init import cached_random_model, init_random

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny_gpu(tmp_path_factory):
    d = init_random("tiny", tmp_path_factory.mktemp("tinyg"), seed=0)
    on = fastjanus.load(d, device="cuda", dtype=torch.bfloat16, backend="triton", cuda_graphs=True)
    off = fastjanus.load(d, device="cuda", dtype=torch.bfloat16, backend="triton", cuda_graphs=False)
    return on, off


@pytest.fixture(scope="module")
def pro1b_gpu():
    d = cached_random_model("janus-pro-1b")  # shared with tests/test_gpu.py through the cache
    return fastjanus.load(d, device="cuda", dtype=torch.bfloat16, backend="triton", cuda_graphs=True), d


PROMPTS = [["a cat"], ["a cat", "a lighthouse on a cliff at dusk, oil painting"],
           ["a", "bb cc", "a much longer prompt about a quiet harbour town in the rain"]]


@pytest.mark.parametrize("prompts", PROMPTS)
@pytest.mark.parametrize("num_images", [1, 3])
def test_graphs_match_eager_codes(tiny_gpu, prompts, num_images):
    on, off = tiny_gpu
    rows_on, rows_off = [], []
    a = on.generate_image_tokens(prompts, num_images=num_images, seed=5, top_k=100,
                                 callback=lambda r, c: rows_on.append(c))
    b = off.generate_image_tokens(prompts, num_images=num_images, seed=5, top_k=100,
                                  callback=lambda r, c: rows_off.append(c))
    assert on.last_timings["cuda_graphs"] is True and off.last_timings["cuda_graphs"] is False
    assert all(d.graph is not None for d in on.runtime.decoders.values())  # really replayed graphs
    assert all(d.graph is None for d in off.runtime.decoders.values())
    assert torch.equal(a, b)
    assert len(rows_on) == on.cfg.vq.grid and all(torch.equal(x, y) for x, y in zip(rows_on, rows_off))


def test_graphs_match_eager_text(tiny_gpu):
    on, off = tiny_gpu
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    for seed, t, k in ((0, 0.0, None), (3, 1.0, None), (4, 1.0, 50)):
        assert on.answer_ids(img, "What is it?", max_new_tokens=40, temperature=t, seed=seed, top_k=k) == \
            off.answer_ids(img, "What is it?", max_new_tokens=40, temperature=t, seed=seed, top_k=k)


def test_replay_loop_never_syncs(tiny_gpu):
    on, _ = tiny_gpu
    on.generate_image_tokens("a", num_images=1, seed=0)
    d = next(d for k, d in on.runtime.decoders.items() if k[0] == 2 and k[2] and k[3] is None)
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside raises
    try:
        d.run(50)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_warmup_captures_all_buckets_then_serves(tmp_path):
    d = init_random("tiny", tmp_path / "t", seed=0)
    p = fastjanus.load(d, device="cuda", dtype=torch.bfloat16, backend="triton", max_rows=16)
    assert p.warmup() == [16, 8, 4, 2]
    assert all(dec.graph is not None for dec in p.runtime.decoders.values())
    q = fastjanus.load(d, device="cuda", dtype=torch.bfloat16, backend="triton", cuda_graphs=False, max_rows=16)
    for n in (1, 3, 8):
        assert torch.equal(p.generate_image_tokens("a fox", num_images=n, seed=n),
                           q.generate_image_tokens("a fox", num_images=n, seed=n))


def test_replay_writes_every_output(tiny_gpu):
    on, _ = tiny_gpu
    on.generate_image_tokens(["a", "b"], num_images=1, seed=1)  # captures the 4-row bucket
    d = next(d for k, d in on.runtime.decoders.items() if k[0] == 4 and k[2])
    with torch.inference_mode():  # the decode state is made under inference mode: only writable inside it
        d.sampler.codes.fill_(-7)
        d.sampler.rows.fill_(-7)
    codes = on.generate_image_tokens(["c", "d"], num_images=1, seed=2)
    assert (d.sampler.codes >= 0).all() and (d.sampler.rows >= 0).all()
    assert codes.min() >= 0 and codes.max() < on.cfg.vq.codebook_size


def test_buckets_survive_requests_of_changing_size_without_memory_growth(tiny_gpu):
    on, _ = tiny_gpu
    sizes = [1, 4, 2, 7, 1, 16, 3]
    for n in sizes:  # capture every bucket needed
        on.generate_image_tokens("a fox", num_images=n, seed=n)
    torch.cuda.synchronize()
    before, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    ref = {n: on.generate_image_tokens("a fox", num_images=n, seed=n) for n in sizes}
    for i in range(100):
        n = sizes[i % len(sizes)]
        if i < len(sizes):
            assert torch.equal(on.generate_image_tokens("a fox", num_images=n, seed=n), ref[n])
        else:
            on.generate_image_tokens("a fox", num_images=n, seed=i)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 1 << 20  # under 1 MiB: nothing accumulates
    assert torch.cuda.memory_reserved() - reserved < 64 << 20


def test_pro1b_graphs_vs_eager_and_speed(pro1b_gpu):
    import time
    on, d = pro1b_gpu
    off = fastjanus.load(d, device="cuda", dtype=torch.bfloat16, backend="triton", cuda_graphs=False)
    for n in (1, 16):
        a = on.generate_image_tokens("a red fox in the snow", num_images=n, seed=0)
        b = off.generate_image_tokens("a red fox in the snow", num_images=n, seed=0)
        assert torch.equal(a, b)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        on.generate_image_tokens("a red fox in the snow", num_images=n, seed=1)
        t_on = time.perf_counter() - t0
        t0 = time.perf_counter()
        off.generate_image_tokens("a red fox in the snow", num_images=n, seed=1)
        t_off = time.perf_counter() - t0
        print(f"\n[gpu] {torch.cuda.get_device_name()} bf16 janus-pro-1b {n} image(s) codes: graphs {t_on:.2f} s, "
              f"eager {t_off:.2f} s")


def test_warmup_at_load_keeps_capture_out_of_the_first_request(tmp_path):
    d = init_random("tiny", tmp_path / "t", seed=0)
    p = fastjanus.load(d, device="cuda", dtype=torch.bfloat16, backend="triton", max_rows=8, warmup=True)
    assert p.load_timings["warmup_s"] > 0
    graphs = {k: dec.graph for k, dec in p.runtime.decoders.items()}
    assert sorted(k[0] for k in graphs if k[2]) == [2, 4, 8] and all(g is not None for g in graphs.values())
    p.generate_image_tokens("a fox", num_images=3, seed=0)
    p.answer_ids(Image.new("RGB", (8, 8)), "what?", max_new_tokens=5)
    # no new bucket and no new capture: the requests replayed what load() captured
    assert {k: dec.graph for k, dec in p.runtime.decoders.items()} == graphs


def test_close_and_drop_release_device_memory(tmp_path):
    import gc
    d = init_random("tiny", tmp_path / "t", seed=0)
    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    for how in ("close", "del"):
        gc.disable()  # reference counting alone must free it
        try:
            # 64 rows x 1024 slots: a 16 MiB pool, next to the tiny model's 2 MiB of weights
            p = fastjanus.load(d, device="cuda", dtype=torch.bfloat16, backend="triton", max_rows=64, max_len=1024,
                               warmup=True)
            p.generate_image_tokens("a fox", num_images=2, seed=0)
            pool = p.memory_plan.pool_bytes
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - base
            assert held >= pool
            if how == "close":
                p.close()
            else:
                del p
            torch.cuda.synchronize()
            left = torch.cuda.memory_allocated() - base
            assert held - left >= pool, (how, held, left)  # the pool, the weights and the graphs' memory went
            # what may stay: cuBLAS keeps one workspace per stream it ran on (32 MiB on Hopper), and
            # empty_cache does not release those
            assert left <= 3 * 32 * 2 ** 20 + 2 ** 20, (how, left)
        finally:
            gc.enable()
