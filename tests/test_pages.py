"""The K/V page pool: a prefix lives once per version, shared by every row of its task, and the tokens stay
exactly those of each request alone and of PEFT's forward, whatever the page layout.

Covers prefix lengths around the page size (1, 15, 16, 17, 255), many rows sharing one prefix's pages, a
hot swap while rows run on the old version, eviction of idle prefixes under page pressure, and admission by
pages (reserved at admission: a request waits for pages, it never fails for lack of them mid-decode).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import app_client, make_tiny_model, peft_greedy, peft_prefix_model, tiny_app
from test_engine import make_requests, random_prefix

from server.engine.engine import Engine
from server.engine.paged import PrefillCache
from server.engine.pages import PagePool, ResidentPrefixes, bytes_per_page
from server.errors import InvalidRequest
from server.registry.format import ModelFingerprint, load_prefix, save_native

FAMILY = "llama-gqa"


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(FAMILY)


def small_engine(model, tokenizer, pages: int, **kwargs) -> Engine:
    """An engine whose pool holds `pages` usable pages of 16 tokens (plus the scratch page)."""
    page = bytes_per_page(ModelFingerprint.from_config(model.config), 16, torch.float32)
    return Engine(model, tokenizer, kv_cache_bytes=(pages + 1) * page, **kwargs)


# ---- the pool and the resident prefixes, alone ----


def test_pool_hands_out_pages_once_and_takes_them_back(model):
    fp = ModelFingerprint.from_config(model.config)
    pool = PagePool(fp, num_pages=6, page_size=4, dtype=torch.float32, device="cpu")
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert 0 not in a + b and len(set(a + b)) == 5 and pool.num_free == 0  # page 0 is scratch
    with pytest.raises(RuntimeError, match="2 K/V pages asked for, 0 free"):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 3 and sorted(pool.allocate(3)) == sorted(a)


def test_resident_prefixes_refcount_lru_and_supersede(model):
    fp = ModelFingerprint.from_config(model.config)
    pool = PagePool(fp, num_pages=9, page_size=4, dtype=torch.float32, device="cpu")  # 8 usable
    resident = ResidentPrefixes(pool)
    p5, q3 = random_prefix(fp, 5, 1), random_prefix(fp, 3, 2)
    a = resident.acquire(p5, ("a", 1, "x"))  # 2 pages
    assert resident.acquire(p5, ("a", 1, "x")) is a and a.refs == 2 and pool.num_free == 6
    # Pages hold the prefix as given: [layers, kv_heads, 4, d] per page, the tail of the last page unused.
    assert torch.equal(pool.keys[:, a.pages[0]], p5.keys[:, :, :4])
    assert torch.equal(pool.values[:, a.pages[1], :, :1], p5.values[:, :, 4:])
    b = resident.acquire(q3, ("b", 1, "y"))  # 1 page
    resident.release(b)
    assert resident.idle_pages == 1 and resident.is_resident(("b", 1, "y"))
    # A newer version of task a: the old one stays while rows use it, and goes with its last row.
    a2 = resident.acquire(q3, ("a", 2, "z"))
    assert a.superseded and resident.is_resident(("a", 1, "x"))
    resident.release(a)
    resident.release(a)
    assert not resident.is_resident(("a", 1, "x")) and pool.num_free == 8 - 1 - 1
    # Pressure: the idle prefix b goes first when pages are needed; a2 (in use) stays.
    resident.make_room(7)
    assert not resident.is_resident(("b", 1, "y")) and resident.is_resident(("a", 2, "z"))
    assert pool.num_free == 7 and a2.refs == 1


# ---- exactness over pages ----


@pytest.mark.parametrize("num_virtual_tokens", [1, 15, 16, 17, 255])
def test_prefix_lengths_around_the_page_size_equal_peft(model, tokenizer, tmp_path, num_virtual_tokens):
    """Real tokens start at position P whatever the page layout: a prefix that leaves its last page partly
    empty gives PEFT's tokens, alone and in a batch with other prefix lengths."""
    peft_model, weights, config = peft_prefix_model(make_tiny_model(FAMILY), num_virtual_tokens, 7, tmp_path)
    engine = Engine(model, tokenizer, max_rows=4)
    prefix = load_prefix(weights, engine.fingerprint, adapter_config=config)
    others = [random_prefix(engine.fingerprint, n, n) for n in (16, 17)]
    reqs = make_requests([prefix, others[0], None, others[1]], [9, 5, 20, 3], [12, 12, 12, 12])
    engine.generate(reqs)
    assert reqs[0].output_token_ids == peft_greedy(peft_model, reqs[0].prompt_token_ids, 12)
    alone = [
        engine.generate([r])[0]
        for r in make_requests([prefix, others[0], None, others[1]], [9, 5, 20, 3], [12] * 4)
    ]
    assert [r.output_token_ids for r in reqs] == [a.output_token_ids for a in alone]


def test_rows_of_one_task_share_its_pages_and_equal_each_alone(model, tokenizer):
    engine = Engine(model, tokenizer, max_rows=8)
    prefix = random_prefix(engine.fingerprint, 40, 3)  # 3 pages
    key = ("task", 1, "sha")
    reqs = make_requests(
        [prefix] * 6 + [None, random_prefix(engine.fingerprint, 5, 4)], [3, 9, 17, 1, 30, 6, 8, 4], [10] * 8
    )
    for r in reqs[:6]:
        r.prefix_key = key
    engine.admit(reqs)
    stats = engine.kv_stats()
    assert engine.prefixes.entries[key].refs == 6
    assert stats["pages_shared"] == 3 and stats["prefix_pages_resident"] == 3 + 1  # the task's, once
    # The rows of the task sit together (the attention kernel reads their prefix once per group).
    positions = [i for i, r in enumerate(engine.running) if r.prefix_key == key]
    assert positions == list(range(positions[0], positions[0] + 6))
    while engine.running:
        engine.step()
    alone = [
        Engine(model, tokenizer, max_rows=1).generate([r])[0]
        for r in make_requests(
            [prefix] * 6 + [None, random_prefix(engine.fingerprint, 5, 4)],
            [3, 9, 17, 1, 30, 6, 8, 4],
            [10] * 8,
        )
    ]
    assert [r.output_token_ids for r in reqs] == [a.output_token_ids for a in alone]
    assert engine.prefixes.entries[key].refs == 0 and engine.kv_stats()["pages_shared"] == 0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_rows_of_different_tasks_prefill_together_and_equal_each_alone(tokenizer, monkeypatch, attention):
    """Prefixes of one length read by one row each are gathered and attended as one batch per layer
    (engine/paged.py); the tokens stay each row's alone (where every prefix goes on its own)."""
    model = make_tiny_model(FAMILY)
    model.config._attn_implementation = attention
    shapes = []
    real = PrefillCache.prefix_kv

    def spied(self, layer):
        for rows, keys, values in real(self, layer):
            shapes.append((len(rows), keys.dim()))
            yield rows, keys, values

    monkeypatch.setattr(PrefillCache, "prefix_kv", spied)
    engine = Engine(model, tokenizer, max_rows=8)
    fp = engine.fingerprint

    def requests():  # five tasks of 15 tokens (one read by two rows), one of 17, one row without
        p15 = [random_prefix(fp, 15, seed) for seed in range(5)]
        prefixes = [p15[0], p15[1], None, p15[2], p15[3], random_prefix(fp, 17, 9), p15[4], p15[3]]
        return make_requests(prefixes, [4, 9, 3, 17, 1, 6, 12, 8], [8] * 8, logprobs=0)

    together = engine.generate(requests())
    assert (4, 4) in shapes  # the four 15-token prefixes of one row each: one batch
    assert (2, 3) in shapes and (1, 3) in shapes  # the shared one and the 17-token one as before
    shapes.clear()
    alone = [Engine(model, tokenizer, max_rows=1).generate([r])[0] for r in requests()]
    assert {dim for _, dim in shapes} == {3}
    for t, a in zip(together, alone, strict=True):
        assert t.output_token_ids == a.output_token_ids
        assert t.output_logprobs[0].logprob == pytest.approx(a.output_logprobs[0].logprob, abs=1e-5)


def test_hot_swap_while_rows_run_on_the_old_version(model, tokenizer):
    """Rows that started on v1 keep v1's pages; rows admitted after the swap read v2; v1's pages go with
    its last row."""
    engine = Engine(model, tokenizer, max_rows=6)
    fp = engine.fingerprint
    v1, v2 = random_prefix(fp, 20, 1), random_prefix(fp, 9, 2)
    old = make_requests([v1, v1], [5, 8], [14, 6])
    for r in old:
        r.prefix_key = ("t", 1, "a")
    engine.admit(old)
    for _ in range(3):
        engine.step()
    new = make_requests([v2, v2], [5, 8], [6, 9])
    for r in new:
        r.prefix_key = ("t", 2, "b")
    engine.admit(new)
    assert engine.is_resident(("t", 1, "a")) and engine.is_resident(("t", 2, "b"))
    while engine.running:
        engine.step()
    assert not engine.is_resident(("t", 1, "a")) and engine.is_resident(("t", 2, "b"))
    alone = make_requests([v1, v1], [5, 8], [14, 6]) + make_requests([v2, v2], [5, 8], [6, 9])
    for r in alone:
        engine.generate([r])
    assert [r.output_token_ids for r in old + new] == [a.output_token_ids for a in alone]


def test_idle_prefixes_are_evicted_under_page_pressure_and_come_back_exact(model, tokenizer):
    engine = small_engine(model, tokenizer, pages=8, max_rows=4)
    fp = engine.fingerprint
    a, b = random_prefix(fp, 48, 1), random_prefix(fp, 40, 2)  # 3 pages each
    first = make_requests([a], [6], [10])[0]
    first.prefix_key = ("a", 1, "x")
    engine.generate([first])
    assert engine.is_resident(("a", 1, "x")) and engine.num_available_pages == 8  # idle: evictable
    second = make_requests([b], [30], [40])[0]  # 3 prefix pages + 5 own pages: a must go
    second.prefix_key = ("b", 1, "y")
    engine.generate([second])
    assert not engine.is_resident(("a", 1, "x")) and engine.is_resident(("b", 1, "y"))
    again = make_requests([a], [6], [10])[0]
    again.prefix_key = ("a", 1, "x")
    engine.generate([again])
    assert again.output_token_ids == first.output_token_ids


def test_requests_wait_for_pages_and_never_fail_for_them(model, tokenizer):
    """More requests than the pool holds at once: admission reserves prompt + max_new_tokens per row, so
    rows join as others leave, every request completes, and each equals itself alone."""
    engine = small_engine(model, tokenizer, pages=10, max_rows=8)
    fp = engine.fingerprint
    prefixes = [random_prefix(fp, 17, i) for i in range(3)] + [None] * 3
    reqs = make_requests(prefixes, [10, 25, 3, 40, 7, 12], [20, 30, 25, 10, 33, 16])
    admitted_sizes = []
    pending = list(reqs)
    while pending or engine.running:
        take = engine.num_admissible(pending)
        engine.admit(pending[:take])
        pending = pending[take:]
        admitted_sizes.append(len(engine.running))
        assert engine.pool.num_free >= 0
        engine.step()
    assert max(admitted_sizes) < len(reqs)  # the pool, not the row limit, held requests back
    assert all(len(r.output_token_ids) == n for r, n in zip(reqs, [20, 30, 25, 10, 33, 16], strict=True))
    alone = [
        engine.generate([r])[0]
        for r in make_requests(prefixes, [10, 25, 3, 40, 7, 12], [20, 30, 25, 10, 33, 16])
    ]
    assert [r.output_token_ids for r in reqs] == [a.output_token_ids for a in alone]


def test_a_request_larger_than_the_pool_is_refused_clearly(model, tokenizer):
    engine = small_engine(model, tokenizer, pages=4, max_rows=2)
    request = make_requests([random_prefix(engine.fingerprint, 20, 1)], [30], [40])[0]  # 2 + 5 pages
    with pytest.raises(InvalidRequest, match=r"need 7 K/V pages of 16 tokens, the pool holds 4"):
        engine.validate(request)
    with pytest.raises(ValueError, match="need 7 K/V pages, 4 are free"):
        engine.admit([request])


# ---- visible through the API ----


async def test_metrics_and_prefix_status_show_the_pool(model, tokenizer, tmp_path):
    """/metrics counts a task's prefix pages once however many rows read them, and GET /prefixes/{id}
    says whether its K/V are resident."""
    engine = Engine(model, tokenizer, max_rows=8)
    prefix = random_prefix(engine.fingerprint, 40, 1)  # 3 pages
    async with app_client(tiny_app(engine, tmp_path / "prefixes", max_batch_wait_ms=200.0)) as api:
        files = {"file": ("p.safetensors", save_native(prefix), "application/octet-stream")}
        assert (await api.post("/prefixes", data={"task_id": "t"}, files=files)).status_code == 201
        assert (await api.get("/prefixes/t")).json()["resident"] is False
        seen = []
        real_step = engine.step

        def step():  # the gauges as a scrape would read them while the 6 rows run
            seen.append(engine.kv_stats())
            return real_step()

        engine.step = step
        body = {"task_id": "t", "prompt": "hello", "max_new_tokens": 8, "ignore_eos": True}
        replies = await asyncio.gather(*(api.post("/generate", json=body) for _ in range(6)))
        assert all(r.status_code == 200 for r in replies)
        assert len({tuple(r.json()["token_ids"]) for r in replies}) == 1
        busiest = max(seen, key=lambda s: s["pages_shared"])
        assert busiest["pages_shared"] == 3 and busiest["prefix_pages_resident"] == 3
        status = (await api.get("/prefixes/t")).json()
        assert status["resident"] is True and status["version"] == 1
        metrics = (await api.get("/metrics")).text
        gauges = {
            line.split()[0]: float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("prefix_server_kv_")
        }
        assert gauges["prefix_server_kv_prefix_pages_resident"] == 3
        assert gauges["prefix_server_kv_pages_shared"] == 0  # nothing runs now
        assert gauges["prefix_server_kv_pages_total"] == engine.pool.num_usable
        # A new version: the old one's pages go (no row uses them), the new one is not resident yet.
        files = {"file": ("p.safetensors", save_native(random_prefix(engine.fingerprint, 5, 2)), "x")}
        assert (await api.post("/prefixes", data={"task_id": "t"}, files=files)).status_code == 201
        assert (await api.get("/prefixes/t")).json()["resident"] is False


def test_a_model_on_another_attention_implementation_prefills_over_the_pages(tokenizer):
    """The cascade prefill is for SDPA models; a model on eager attention gets each row's prefix and prompt
    K/V side by side from the same pages, and the same tokens."""
    sdpa, eager = make_tiny_model(FAMILY), make_tiny_model(FAMILY)
    eager.config._attn_implementation = "eager"
    runs = []
    for model in (sdpa, eager):
        engine = Engine(model, tokenizer, max_rows=4)
        fp = engine.fingerprint
        prefixes = [random_prefix(fp, 17, 1), None, random_prefix(fp, 3, 2), random_prefix(fp, 17, 1)]
        runs.append(
            [r.output_token_ids for r in engine.generate(make_requests(prefixes, [5, 9, 2, 7], [8] * 4))]
        )
    assert eager.config._attn_implementation == "eager"  # left as it was: not the cascade
    assert runs[0] == runs[1]


def test_default_pool_size_wants_the_tokens_within_a_quarter_of_free_memory(model, monkeypatch):
    from server.engine import pages

    fp = ModelFingerprint.from_config(model.config)
    page = bytes_per_page(fp, 16, torch.float32)
    monkeypatch.setattr(pages, "_mem_available", lambda: 400 * page)
    assert pages.default_pool_bytes(fp, torch.float32, "cpu", tokens=16 * 50) == 51 * page  # + scratch
    assert pages.default_pool_bytes(fp, torch.float32, "cpu", tokens=16 * 500) == 100 * page  # a quarter
    monkeypatch.setattr(pages, "_mem_available", lambda: 0)  # unknown: what is wanted
    assert pages.default_pool_bytes(fp, torch.float32, "cpu", tokens=16 * 500) == 501 * page


def test_default_pool_size_on_a_gpu_takes_most_of_its_free_memory(model, monkeypatch):
    """On CUDA (its free memory faked): 60% of what is free after the model, less the prefix cache, and
    never into the reserve for activations and graphs."""
    from server.engine import pages

    fp = ModelFingerprint.from_config(model.config)
    page = bytes_per_page(fp, 16, torch.bfloat16)
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 80 * gib))
    size = pages.default_pool_bytes(fp, torch.bfloat16, "cuda", tokens=16 * 50, other_bytes=gib // 2)
    assert size == int(40 * gib * 0.6) - gib // 2
    # A small GPU: what the tokens want, within what is free beyond the reserve and the prefix cache.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * gib, 8 * gib))
    size = pages.default_pool_bytes(fp, torch.bfloat16, "cuda", tokens=10**9, other_bytes=gib // 2)
    assert size == 3 * gib - 2 * gib - gib // 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib, 8 * gib))  # nothing left
    assert pages.default_pool_bytes(fp, torch.bfloat16, "cuda", tokens=16) == 2 * page
