"""The static decode runtime on the CPU: the memory plan's arithmetic and messages, load options, the shared
KV pool and buckets, up-front refusals. (Graph capture itself needs CUDA: tests/test_gpu_graphs.py.)"""
import pytest
import torch
from PIL import Image

import fastjanus
from fastjanus.config import preset
from fastjanus.engine import graphs
from fastjanus.engine import memory as mem
from fastjanus.engine.memory import GiB, MemoryPlan, plan_memory
from fastjanus.engine.pipeline import resolve_cuda_graphs
from fastjanus.errors import InputError

KiB = 1024
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the triton backend: the interpreter on the CPU


def test_plan_from_explicit_sizes():
    cfg = preset("janus-pro-1b")
    p = plan_memory(cfg, 2, None, max_rows=8, max_len=700)
    assert p.pool_slots == 8 * 700 and p.pool_bytes == 8 * 700 * 192 * KiB
    assert p.buckets == [2, 4, 8]  # 16 rows would get 350 slots: less than one image
    assert p.capacity(2) == 700 and p.capacity(8) == 700
    assert p.image_bucket(2, 100) == (2, 700)
    assert p.image_bucket(6, 100) == (8, 700)  # 3 images run padded in the 8-row bucket


def test_plan_from_free_memory_by_hand():
    cfg = preset("janus-pro-7b")
    free = 10 * GiB
    p = plan_memory(cfg, 2, free)
    kvpt = 480 * KiB
    reserve = mem.decode_workspace_bytes(cfg, 64) + 256 * 2 ** 20 + free // 20  # + the prefill chunk budget
    assert p.reserve_bytes == reserve
    assert p.pool_slots == (free - reserve - mem.vq_decode_bytes(cfg, 1, 2)) // kvpt
    assert p.max_len == 576 + 512
    # the pool is shared: a 32-row bucket gets pool_slots // 32 slots per row
    assert p.capacity(32) == min(1088, p.pool_slots // 32)


def test_pool_is_shared_so_short_prompts_fit_more_rows():
    cfg = preset("janus-pro-7b")
    p = MemoryPlan(pool_slots=32 * 620, max_len=1088, max_rows=64, kv_bytes_per_token=480 * KiB,
                   image_tokens=576, context=16384, free_bytes=None, reserve_bytes=0, vq_batch=8, source="test")
    assert p.image_bucket(32, 40) == (32, 620)  # 16 images with a 40-token prompt fit exactly
    with pytest.raises(InputError) as e:
        p.image_bucket(32, 50)  # 626 slots per row are needed, 620 exist
    msg = str(e.value)
    assert "16 image(s) with a 50-token prompt need 32 rows x 626 KV slots" in msg
    assert "fits at most 8 image(s) at this prompt length" in msg
    assert "or 16 image(s) with prompts up to 44 tokens" in msg
    assert "fewer images" in msg
    assert cfg.language.num_hidden_layers == 30  # the 480 KiB above: 30 layers × 2 × 4096 × 2 bytes
    assert mem.kv_bytes_per_token(cfg.language, 2) == 480 * KiB


def test_plan_refusals():
    cfg = preset("janus-pro-7b")
    with pytest.raises(InputError, match="not enough device memory for one image"):
        plan_memory(cfg, 2, 1 * GiB)
    with pytest.raises(InputError, match="max_rows must be even"):
        plan_memory(cfg, 2, None, max_rows=3)
    with pytest.raises(InputError, match="exceeds the model's context"):
        plan_memory(cfg, 2, None, max_len=20000)
    with pytest.raises(InputError, match=r"max_rows=64 x max_len=1000 needs 29.30 GiB"):
        plan_memory(cfg, 2, 20 * GiB, max_rows=64, max_len=1000)
    p = plan_memory(cfg, 2, None, max_rows=2, max_len=700)  # 1400 slots: one text row may use them all
    with pytest.raises(InputError, match="lower max_new_tokens to 800"):
        p.text_capacity(600, 1000)
    with pytest.raises(InputError, match="the prompt alone is 1500 tokens"):
        p.text_capacity(1500, 10)
    assert p.text_capacity(600, 100) == 1024 and p.text_capacity(600, 800) == 1400  # power of two, or the pool


def test_odd_and_large_max_rows_make_their_own_bucket():
    cfg = preset("janus-pro-1b")
    assert plan_memory(cfg, 2, None, max_rows=6, max_len=700).buckets == [2, 4, 6]
    assert plan_memory(cfg, 2, None, max_rows=6, max_len=700).image_bucket(6, 50) == (6, 700)
    assert plan_memory(cfg, 2, None, max_rows=128, max_len=700).buckets == [2, 4, 8, 16, 32, 64, 128]


def test_prefill_chunks_bound_the_activations():
    cfg = preset("janus-pro-7b")
    per_row = mem.prefill_workspace_bytes(cfg, 1, 600, 2)
    n = mem.prefill_chunk_rows(cfg, 600, 2)
    assert n * per_row <= 256 * 2 ** 20 < (n + 1) * per_row
    assert mem.prefill_chunk_rows(cfg, 10 ** 6, 2) == 1


def test_smallest_cards_for_the_note():
    """The arithmetic behind the note's table: Pro-7B bf16 weights (14.8 GB) + the plan on a card."""
    from fastjanus.models.janus import JanusModel
    cfg = preset("janus-pro-7b")
    with torch.device("meta"):
        weights = sum(p.numel() for p in JanusModel(cfg).parameters()) * 2
    assert abs(weights / 1e9 - 14.8) < 0.05

    def fits(card_gib, images, prompt=48, context_overhead=0.6 * GiB):
        try:
            plan_memory(cfg, 2, int(card_gib * GiB - weights - context_overhead)).image_bucket(2 * images, prompt)
            return True
        except InputError:
            return False
    assert fits(20, 1) and fits(20, 4) and not fits(24, 16) and fits(26, 16)
    assert not fits(16, 1)


def test_cuda_graphs_option_is_validated(tiny_dir):
    cpu = torch.device("cpu")
    assert resolve_cuda_graphs("auto", cpu, "triton") is False
    assert resolve_cuda_graphs(False, cpu, "triton") is False
    with pytest.raises(InputError, match="needs a CUDA device"):
        resolve_cuda_graphs(True, cpu, "triton")
    with pytest.raises(InputError, match="True, False or 'auto'"):
        resolve_cuda_graphs("yes", cpu, "triton")
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert resolve_cuda_graphs("auto", cuda, "triton") is True
        assert resolve_cuda_graphs("auto", cuda, "torch") is False
        with pytest.raises(InputError, match="needs backend='triton'"):
            resolve_cuda_graphs(True, cuda, "torch")
    with pytest.raises(InputError, match="max_rows/max_len"):
        fastjanus.load(tiny_dir, device="cpu", backend="torch", max_rows=4)


@pytest.fixture(scope="module")
def small_plan_pipe(tiny_dir):
    pytest.importorskip("triton")
    # 4 rows x 80 slots: one or two images of the tiny model (64 codes) with prompts up to 16 tokens
    return fastjanus.load(tiny_dir, device=DEV, dtype=torch.float32, backend="triton", max_rows=4, max_len=80)


def test_warmup_builds_every_bucket_largest_first(tiny_dir, monkeypatch):
    pytest.importorskip("triton")
    pipe = fastjanus.load(tiny_dir, device=DEV, dtype=torch.float32, backend="triton", max_rows=8, max_len=80)
    assert pipe.warmup() == [8, 4, 2]
    image_keys = sorted(k[0] for k in pipe.runtime.decoders if k[2])
    text_keys = [k for k in pipe.runtime.decoders if not k[2]]
    assert image_keys == [2, 4, 8] and len(text_keys) == 1 and text_keys[0][0] == 1  # + the one-row text state
    assert all((d.graph is not None) == pipe.cuda_graphs for d in pipe.runtime.decoders.values())
    keys = set(pipe.runtime.decoders)

    class Stop(Exception):
        pass

    def stop(self, steps):  # the decode loop itself is not the point (and slow in the interpreter)
        raise Stop
    monkeypatch.setattr(graphs.StaticDecoder, "run", stop)
    with pytest.raises(Stop):  # 3 images: the 8-row bucket, found ready
        pipe.generate_image_tokens("a cat", num_images=3, temperature=0)
    monkeypatch.undo()
    pipe.answer_ids(Image.new("RGB", (8, 8)), "what?", max_new_tokens=3)
    assert set(pipe.runtime.decoders) == keys  # the requests used the warmed-up state: nothing new was built
    assert fastjanus.load(tiny_dir, device="cpu", backend="torch").warmup() == []
    # load(warmup=True) does the same at load and times it
    p2 = fastjanus.load(tiny_dir, device=DEV, dtype=torch.float32, backend="triton", max_rows=8, max_len=80,
                        warmup=True)
    assert set(p2.runtime.decoders) == keys and p2.load_timings["warmup_s"] > 0
    with pytest.raises(InputError, match="warmup must be True or False"):
        fastjanus.load(tiny_dir, device="cpu", warmup="yes")


def test_request_too_large_fails_before_any_work(small_plan_pipe):
    pipe = small_plan_pipe
    assert pipe.memory_plan.buckets == [2, 4] and pipe.runtime is not None
    with pytest.raises(InputError, match=r"3 image\(s\) .* fits at most 2 image\(s\)"):
        pipe.generate_image_tokens("a cat", num_images=3, temperature=0)
    long_prompt = "a very long prompt " * 10
    with pytest.raises(InputError, match="prompts up to 16 tokens"):
        pipe.generate_image_tokens(long_prompt, num_images=1, temperature=0)
    assert pipe.runtime.decoders == {}  # refused up front: no decode state was even built


def test_buckets_share_one_pool_and_are_reused(small_plan_pipe, tiny_dir):
    pipe = small_plan_pipe
    pool = pipe.runtime.pool  # allocated at load
    ptr = pool.k.data_ptr()
    a = pipe.generate_image_tokens("a cat", num_images=1, temperature=0)  # 2 rows
    d = pipe.runtime.decoders[(2, 80, True, None)]
    # the result is a copy, never the bucket's static history (the next request overwrites that)
    assert a.data_ptr() != d.sampler.codes.data_ptr() and torch.equal(a, d.sampler.codes[:1].cpu())
    with torch.inference_mode():  # the decode state is made under inference mode
        d.sampler.codes.fill_(-1)
    assert (a >= 0).all()
    b = pipe.generate_image_tokens(["a cat", "fox"], num_images=1, temperature=0)  # 4 rows
    assert pipe.runtime.pool is pool and pool.k.data_ptr() == ptr
    assert sorted(k[0] for k in pipe.runtime.decoders) == [2, 4]
    assert torch.equal(b[0], a[0])  # the 4-row bucket, over the 2-row bucket's memory: same codes
    # and the same as the plain eager torch path
    eager = fastjanus.load(tiny_dir, device=DEV, dtype=torch.float32, backend="torch")
    assert torch.equal(a, eager.generate_image_tokens("a cat", num_images=1, temperature=0))
    assert pipe.last_timings["cuda_graphs"] is pipe.cuda_graphs
