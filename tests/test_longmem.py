"""LongMem: config validation, memory bank exactness and bad inputs, the SideNet's equations, generation with a KV
cache, training that leaves the backbone untouched, and save/load (local folders and the local Hub)."""

import itertools
import math
import os

import pytest
import torch
from conftest import load_benchmark, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM

from peft_ext.models.longmem import LongMemConfig, LongMemForCausalLM, MemoryBank, MemoryBankSpec
from peft_ext.models.longmem.data import DocumentStreams, RecallTask, collate_stream_batch

BACKBONES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def make_lm(family="llama", seed=0, **settings):
    settings = {"memory_size": 64, "chunk_size": 4, "topk_chunks": 3, **settings}
    return LongMemForCausalLM.from_backbone(BACKBONES[family](seed), LongMemConfig(**settings))


def spec(**overrides):
    return MemoryBankSpec(**{"source": "test", "layer": 1, "num_kv_heads": 2, "head_dim": 8, "chunk_size": 4,
                             "memory_size": 4096, **overrides})


def random_bank(streams=2, chunks=300, backend="torch", seed=0, **overrides):
    torch.manual_seed(seed)
    bank = MemoryBank(spec(**overrides), streams, backend=backend)
    tokens = chunks * bank.spec.chunk_size
    bank.write(torch.randn(streams, tokens, 2, 8), torch.randn(streams, tokens, 2, 8))
    return bank


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(("settings", "message"), [
    ({"memory_size": 10, "chunk_size": 4}, "`memory_size` \\(10\\) must be a multiple of `chunk_size` \\(4\\)"),
    ({"chunk_size": 0}, "`chunk_size` must be a positive integer"),
    ({"topk_chunks": -1}, "`topk_chunks` must be a positive integer"),
    ({"retrieval_backend": "annoy"}, "`retrieval_backend` must be one of"),
    ({"memory_layer": 2}, "`memory_layer` must be an odd"),
])
def test_config_rejects_bad_values(settings, message):
    with pytest.raises(ValueError, match=message):
        LongMemConfig(**settings)


def test_config_checks_layers_against_the_backbone():
    backbone = tiny_llama().config.to_dict()
    with pytest.raises(ValueError, match=r"odd backbone layer index in \[1, 1\]"):
        LongMemConfig(backbone_config=backbone, memory_layer=3)
    with pytest.raises(ValueError, match="model_type must be one of"):
        LongMemConfig(backbone_config={**backbone, "model_type": "bloom"})
    config = LongMemConfig(backbone_config={**backbone, "num_hidden_layers": 24})
    assert (config.memory_layer, config.sidenet_num_layers, config.sidenet_memory_layer) == (17, 12, 8)


# ------------------------------------------------------------------------------------------------ bank
def brute_force_topk(bank, queries, k):
    """Per stream, head and query: every stored chunk's score computed one by one, sorted."""
    streams, heads, n, _ = queries.shape
    result = torch.zeros(streams, heads, n, k, dtype=torch.long)
    for s in range(streams):
        count = int(bank.num_chunks[s])
        for h in range(heads):
            for t in range(n):
                scores = [float(queries[s, h, t] @ bank.keys[s, h, c].mean(dim=0)) for c in range(count)]
                result[s, h, t] = torch.tensor(sorted(range(count), key=lambda c: -scores[c])[:k])
    return result


def test_torch_topk_equals_brute_force():
    bank = random_bank(chunks=50)
    queries = torch.randn(2, 2, 5, 8)
    slots, valid = bank.search(queries, 7)
    assert valid.all()
    assert torch.equal(slots, brute_force_topk(bank, queries, 7))


def test_blocked_torch_search_equals_brute_force_with_unequal_streams(monkeypatch):
    """Query blocks (3, 3, 1 queries here: the last one short) and streams holding different numbers of chunks."""
    from peft_ext.models.longmem import memory_bank

    torch.manual_seed(0)
    bank = MemoryBank(spec(), 2)
    token_mask = torch.ones(2, 200, dtype=torch.bool)
    token_mask[1, 120:] = False  # stream 1 holds 30 chunks, stream 0 holds 50
    bank.write(torch.randn(2, 200, 2, 8), torch.randn(2, 200, 2, 8), token_mask=token_mask)
    assert bank.num_chunks.tolist() == [50, 30]
    queries = torch.randn(2, 2, 7, 8)
    monkeypatch.setattr(memory_bank, "SCORE_BLOCK_ELEMENTS", 2 * 2 * 50 * 3)
    slots, valid = bank.search(queries, 7)
    assert valid.all()
    assert torch.equal(slots, brute_force_topk(bank, queries, 7))


@pytest.mark.parametrize("width", [64 * 7, 1000, 4099])
def test_two_stage_exact_topk_equals_torch_topk(width):
    from peft_ext.models.longmem.memory_bank import TOPK_GROUP_SIZE, exact_topk

    assert width // TOPK_GROUP_SIZE >= 4 * 7  # the grouped path, not the small-row fallback
    generator = torch.Generator().manual_seed(width)
    scores = torch.randn(3, 5, width, generator=generator)
    scores[0, :, width // 2:] = float("-inf")  # a stream whose bank is half empty
    scores[1, 0, -1] = 10.0  # the best score in the last column (a trailing one where the groups leave some)
    ties = (torch.randn(2, width, generator=generator) * 2).round()  # many equal scores
    for rows in (scores, ties):
        values, indices = exact_topk(rows, 7)
        expected = torch.topk(rows, 7, dim=-1).values
        assert torch.equal(values, expected)
        assert torch.equal(rows.gather(-1, indices), values)
        assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # 7 distinct columns per row


def test_blocked_search_over_a_large_bank_equals_brute_force():
    """Enough chunks (1,000, not a multiple of the group size) for the two-stage top-k, in unequal streams."""
    torch.manual_seed(1)
    bank = MemoryBank(spec(), 2)
    token_mask = torch.ones(2, 4000, dtype=torch.bool)
    token_mask[1, 2400:] = False
    bank.write(torch.randn(2, 4000, 2, 8), torch.randn(2, 4000, 2, 8), token_mask=token_mask)
    assert bank.num_chunks.tolist() == [1000, 600]
    queries = torch.randn(2, 2, 9, 8)
    slots, valid = bank.search(queries, 7)
    assert valid.all()
    assert torch.equal(slots, brute_force_topk(bank, queries, 7))


def test_faiss_flat_equals_torch_and_hnsw_recall_is_reported():
    torch_bank = random_bank(chunks=200)
    queries = torch.randn(2, 2, 16, 8)
    expected, _ = torch_bank.search(queries, 10)
    for backend in ("faiss-flat", "faiss-hnsw"):
        bank = random_bank(chunks=200, backend=backend)
        slots, valid = bank.search(queries, 10)
        assert valid.all()
        if backend == "faiss-flat":
            assert torch.equal(slots, expected)
        else:  # approximate: most true neighbours found at this tiny size
            hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(slots.flatten(0, 2), expected.flatten(0, 2)))
            assert hits / expected.numel() > 0.9


def test_faiss_ivf_is_a_trained_ivf_index_with_reported_recall():
    import faiss

    bank = random_bank(streams=1, chunks=2000, backend="faiss-ivf", memory_size=8192)  # 44 lists of ~45 chunks
    exact = random_bank(streams=1, chunks=2000, memory_size=8192)
    queries = torch.randn(1, 2, 32, 8)
    slots, valid = bank.search(queries, 10)
    assert isinstance(bank._faiss_indexes[(0, 0)], faiss.IndexIVFFlat) and valid.all()
    expected, _ = exact.search(queries, 10)
    found = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(slots.flatten(0, 2), expected.flatten(0, 2)))
    assert 0.3 < found / expected.numel() < 1.0  # approximate: nprobe 8 of 44 lists finds most, not all


def test_grouped_query_heads_search_their_shared_key_value_head():
    bank = random_bank(chunks=20)
    queries = torch.randn(2, 4, 3, 8)  # 4 query heads over 2 key/value heads
    retrieved = bank.retrieve(queries, 2)
    for query_head in range(4):
        slots, _ = bank.search(queries[:, query_head:query_head + 1].expand(-1, 2, -1, -1).contiguous(), 2)
        kv_head = query_head // 2
        expected = bank.keys[0, kv_head, slots[0, kv_head]]  # (tokens, k, chunk, dim)
        assert torch.equal(retrieved.keys[0, query_head], expected.flatten(1, 2))


def test_chunks_follow_the_stream_whatever_the_write_sizes():
    torch.manual_seed(0)
    keys, values = torch.randn(1, 23, 2, 8), torch.randn(1, 23, 2, 8)
    whole = MemoryBank(spec(), 1)
    whole.write(keys, values)
    pieces = MemoryBank(spec(), 1)
    for start, stop in ((0, 3), (3, 10), (10, 23)):
        pieces.write(keys[:, start:stop], values[:, start:stop])
    assert int(whole.num_chunks[0]) == int(pieces.num_chunks[0]) == 5  # 20 tokens stored, 3 pending
    assert torch.equal(whole.keys, pieces.keys) and torch.equal(whole.pending_keys[0], pieces.pending_keys[0])
    assert torch.allclose(whole.chunk_keys[0, :, 1], keys[0, 4:8].mean(dim=0))


def test_full_bank_evicts_oldest_chunks_and_counts_them():
    bank = MemoryBank(spec(memory_size=16), 1)  # 4 chunks
    tokens = torch.arange(24, dtype=torch.float)[None, :, None, None].expand(1, 24, 2, 8)
    bank.write(tokens, tokens)
    assert int(bank.num_chunks[0]) == 4 and int(bank.evicted_tokens[0]) == 8
    stored = sorted(bank.chunk_keys[0, 0, :, 0].tolist())
    assert stored == [9.5, 13.5, 17.5, 21.5]  # the means of tokens 8-11, ..., 20-23: the newest four chunks


def test_segment_longer_than_the_bank_keeps_its_newest_tokens():
    bank = MemoryBank(spec(memory_size=8), 1)
    tokens = torch.arange(40, dtype=torch.float)[None, :, None, None].expand(1, 40, 2, 8)
    bank.write(tokens, tokens)
    assert int(bank.evicted_tokens[0]) == 32
    assert sorted(bank.chunk_keys[0, 0, :, 0].tolist()) == [33.5, 37.5]


def test_empty_bank_and_batch_mismatch():
    bank = MemoryBank(spec(), 2)
    slots, valid = bank.search(torch.randn(2, 2, 3, 8), 4)
    assert slots.shape == (2, 2, 3, 0) and not valid.any()
    with pytest.raises(ValueError, match="holds 2 streams .* batch has 3 rows"):
        bank.search(torch.randn(3, 2, 3, 8), 4)
    with pytest.raises(ValueError, match="holds 2 streams .* batch has 1 rows"):
        bank.write(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))


def test_rows_with_fewer_chunks_mark_missing_slots_invalid():
    bank = MemoryBank(spec(), 2)
    mask = torch.tensor([[1] * 12, [0] * 8 + [1] * 4])  # row 1 left-padded: 4 real tokens
    bank.write(torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8), token_mask=mask)
    assert bank.num_chunks.tolist() == [3, 1]
    _, valid = bank.search(torch.randn(2, 2, 1, 8), 3)
    assert valid[0].all() and valid[1].sum(dim=-1).eq(1).all()


def test_bank_save_load_round_trip_and_foreign_bank(tmp_path):
    bank = random_bank(chunks=30)
    bank.write(torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8))  # leaves 2 pending tokens per stream
    bank.save(tmp_path)
    loaded = MemoryBank.load(tmp_path, bank.spec)
    queries = torch.randn(2, 2, 4, 8)
    assert torch.equal(bank.retrieve(queries, 5).values, loaded.retrieve(queries, 5).values)
    assert torch.equal(bank.pending_keys[1], loaded.pending_keys[1])
    with pytest.raises(ValueError, match="made for another model or layer.*layer: saved 1 vs this model 3"):
        MemoryBank.load(tmp_path, spec(layer=3))


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bank_holds_the_backbone_memory_layer_keys_before_rotation(family):
    lm = make_lm(family)
    ids = torch.randint(1, 100, (2, 16))
    lm.memorize(ids)
    hidden = lm.backbone(ids, output_hidden_states=True).hidden_states[1]  # input of block 1 = memory layer
    block = lm.family.blocks[1]
    if family == "llama":
        keys = block.self_attn.k_proj(block.input_layernorm(hidden))
    else:
        keys = block.attn.c_attn(block.ln_1(hidden)).split(32, dim=-1)[1]
    keys = keys.view(2, 16, lm.family.num_kv_heads, -1).transpose(1, 2)  # (batch, heads, tokens, dim)
    stored = lm.memory.keys[:, :, :4].flatten(2, 3)  # four chunks, in order
    torch.testing.assert_close(stored, keys, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cross_network_residual_telescopes_to_the_backbone(family):
    """With every SideNet block a no-op, eq. (1) sums the residuals H[2l] - H[2l-2] back to H[L]."""
    lm = make_lm(family)
    with torch.no_grad():
        for layer in lm.sidenet:
            for module in (layer.out_proj, layer.mlp):
                for p in module.parameters():
                    p.zero_()
    ids = torch.randint(1, 100, (2, 12))
    torch.testing.assert_close(lm(ids, use_memory=False).logits, lm.backbone(ids).logits, rtol=1e-5, atol=1e-5)


def test_sidenet_layers_start_as_copies_of_blocks_2i_plus_1_and_only_they_train():
    backbone = tiny_llama()
    backbone.config.num_hidden_layers = 4
    backbone = AutoModelForCausalLM.from_config(backbone.config)
    lm = LongMemForCausalLM.from_backbone(backbone, LongMemConfig(memory_size=64))
    assert len(lm.sidenet) == 2 and lm.config.memory_layer == 1
    for i, layer in enumerate(lm.sidenet):
        assert torch.equal(layer.qkv.q_proj.weight, backbone.model.layers[2 * i + 1].self_attn.q_proj.weight)
        assert layer.qkv.q_proj.weight.data_ptr() != backbone.model.layers[2 * i + 1].self_attn.q_proj.weight.data_ptr()
    assert [layer.reads_memory for layer in lm.sidenet] == [True, False]
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("backbone.") for n in trainable)


def test_memory_attention_with_every_chunk_retrieved_is_full_attention_over_the_bank():
    from peft_ext.models.longmem.modeling_longmem import memory_attention

    bank = random_bank(chunks=12)
    queries = torch.randn(2, 4, 3, 8)
    read, has_memory = memory_attention(queries, bank, topk_chunks=12, scaling=8**-0.5)
    assert has_memory.all()
    for query_head in range(4):
        keys = bank.keys[:, query_head // 2, :12].flatten(1, 2)  # (streams, tokens, dim)
        values = bank.values[:, query_head // 2, :12].flatten(1, 2)
        probs = (queries[:, query_head] @ keys.transpose(1, 2) * 8**-0.5).softmax(-1)
        torch.testing.assert_close(read[:, query_head], probs @ values, rtol=1e-5, atol=1e-5)


def test_memory_changes_the_output_and_rows_do_not_see_each_other():
    lm = make_lm()
    question = torch.randint(1, 100, (2, 6))
    lm.reset_memory(batch_size=2)
    empty = lm(question, update_memory=False).logits
    local_only = lm(question, use_memory=False, update_memory=False).logits
    torch.testing.assert_close(empty, local_only)  # an empty bank: local context only
    lm.memorize(torch.randint(1, 100, (2, 40)))
    first = lm(question, update_memory=False).logits
    assert not torch.allclose(first[0], empty[0])
    lm.memory.reset([1])
    only_row_1 = torch.tensor([[0] * 40, [1] * 40])
    lm.memory.write(*(2 * [torch.randn(2, 40, 2, 8)]), token_mask=only_row_1)  # only row 1 changes
    second = lm(question, update_memory=False).logits
    torch.testing.assert_close(second[0], first[0])
    assert not torch.allclose(second[1], first[1])


def test_batch_size_must_match_the_banks():
    lm = make_lm()
    lm.memorize(torch.randint(1, 100, (2, 16)))
    with pytest.raises(ValueError, match="reset_memory\\(batch_size=3\\)"):
        lm(torch.randint(1, 100, (3, 5)))
    lm.reset_memory(batch_size=3)
    assert lm(torch.randint(1, 100, (3, 5))).logits.shape == (3, 5, 100)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_kv_cache_equals_recomputing_and_reads_memory(family):
    lm = make_lm(family, gate_init=2.0)
    lm.memorize(torch.randint(1, 100, (2, 48)))
    prompt = torch.randint(1, 100, (2, 5))
    chunks_before = lm.memory.num_chunks.clone()
    cached = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert torch.equal(lm.memory.num_chunks, chunks_before)  # generation reads, never writes
    ids = prompt
    for _ in range(8):  # greedy decoding recomputing the whole sequence at every step
        next_token = lm(ids, update_memory=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    assert torch.equal(cached, ids)
    scores = {use_memory: lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                                      do_sample=False, use_memory=use_memory, output_scores=True,
                                      return_dict_in_generate=True).scores[-1] for use_memory in (True, False)}
    assert not torch.allclose(scores[True], scores[False])


def test_generate_with_an_empty_bank_uses_the_local_context():
    lm = make_lm()
    prompt = torch.randint(1, 100, (1, 5))
    out = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and lm.memory.is_empty()


def test_training_changes_only_the_sidenet_and_backbone_stays_bit_identical():
    lm = make_lm()
    before = {k: v.clone() for k, v in lm.backbone.state_dict().items()}
    side_before = {k: v.clone() for k, v in lm.sidenet_state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    lm.train()
    assert not lm.backbone.training
    stream = DocumentStreams([torch.randint(1, 100, (40,)) for _ in range(4)], batch_size=2, segment_length=16)
    for _, batch in zip(range(4), stream):
        loss = lm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in lm.backbone.state_dict().items())
    assert any(not torch.equal(side_before[k], v) for k, v in lm.sidenet_state_dict().items())
    assert all(p.grad is None for p in lm.backbone.parameters())


def test_document_streams_reset_banks_at_document_boundaries():
    documents = [torch.arange(10), torch.arange(40, 45), torch.arange(70, 77)]
    stream = iter(DocumentStreams(documents, batch_size=2, segment_length=4))
    batches = [next(stream) for _ in range(4)]
    # stream 0: doc 0 (3 segments) then restarts; stream 1: doc 1 (2 segments), doc 2 (2 segments)
    assert [b["new_document"].tolist() for b in batches] == [[True, True], [False, False], [False, True],
                                                             [True, False]]
    assert batches[2]["input_ids"][0].tolist() == [8, 9, 0, 0] and batches[2]["labels"][0, 2:].tolist() == [-100] * 2
    assert batches[3]["input_ids"][0].tolist() == [0, 1, 2, 3]
    assert collate_stream_batch([batches[0]]) is batches[0]
    with pytest.raises(ValueError, match="per_device_train_batch_size=1"):
        collate_stream_batch(batches[:2])
    lm = make_lm()
    lm(**batches[0])
    lm(**batches[1])  # row 1's 5-token document: one chunk stored, one token pending
    assert lm.memory.num_tokens().tolist() == [8, 4] and lm.memory.pending_keys[1].shape[1] == 1
    lm(**batches[2])  # row 1 starts a new document: its bank (and pending token) is emptied first
    assert lm.memory.num_tokens().tolist() == [8, 4] and lm.memory.pending_keys[1] is None
    assert lm.memory.pending_keys[0].shape[1] == 2


def test_recall_task_puts_facts_far_before_the_questions():
    task = RecallTask(num_facts=4, num_questions=2)
    context, questions, labels = task.long_range_batch(torch.Generator().manual_seed(0), 3, distance=100,
                                                       fact_region=16)
    assert context.shape == (3, 116) and questions.shape == (3, 4)
    is_key = (context >= task.key_start) & (context < task.value_start)
    assert is_key[:, 16:].sum() == 0 and is_key.sum(dim=1).eq(4).all()  # the 4 facts, all in the first 16 tokens
    assert ((context[:, 1::2] >= task.value_start) & (context[:, 1::2] < task.vocab_size)).all()  # pairs throughout
    for row in range(3):  # every question's key is a fact of this document, followed there by the label
        for position in (labels[row] != -100).nonzero().flatten():
            where = (context[row] == questions[row, position - 1]).nonzero().flatten()
            assert len(where) == 1 and context[row, where + 1] == labels[row, position]
    with pytest.raises(ValueError, match="cannot hold 4 two-token facts"):
        task.long_range_batch(torch.Generator(), 1, distance=10, fact_region=6)


def test_recall_benchmark_probe_ranks_the_bank_as_its_search_does():
    """The recall benchmark's probe scores every chunk of the bank itself (a softmax over all of them); its top-1
    per head must be the chunk that `MemoryBank.search` ranks first, and its answer slots the facts' value tokens."""
    bench = load_benchmark("longmem")
    lm = LongMemForCausalLM.from_backbone(tiny_llama(0, vocab_size=bench.TASK.vocab_size),
                                          LongMemConfig(memory_size=1024, chunk_size=1, topk_chunks=1))
    context, questions, labels = bench.TASK.long_range_batch(torch.Generator().manual_seed(0), 3, 256)
    lm.reset_memory(batch_size=3)
    lm.memorize(context, segment_length=64, show_progress=False)
    answers = bench.answer_slots(context, questions, chunk_size=1)
    assert torch.equal(context.gather(1, answers), labels[:, 1::2])
    query = bench.MemoryQuery(lm.sidenet[lm.config.sidenet_memory_layer])
    with torch.no_grad():
        slots, _ = lm.memory.search_heads(bench.question_queries(query, lm, questions), 1)
        searched_first = slots[..., 0]  # (batch, heads, questions)
        log_probs, top1 = bench.answer_log_probs(query, lm, bench.stored_chunk_keys(lm), questions, searched_first)
    assert top1.all() and top1.shape == (3, 4, 4)
    head_dim, group = lm.family.head_dim, lm.family.num_heads // lm.family.num_kv_heads
    with torch.no_grad():
        queries = query(lm.backbone.get_input_embeddings()(questions[:, 0::2]))
    for row, head, asked in itertools.product(range(3), range(4), range(4)):  # one head's softmax at a time
        chunk_keys = lm.memory.chunk_keys[row, head // group, :context.shape[1]]
        scores = chunk_keys @ queries[row, asked, head * head_dim:(head + 1) * head_dim]
        expected = scores.log_softmax(dim=0)[searched_first[row, head, asked]]
        assert torch.allclose(log_probs[row, head, asked], expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ saving
def test_save_pretrained_stores_sidenet_and_backbone_reference_only(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "backbone")
    lm = LongMemForCausalLM.from_backbone(str(tmp_path / "backbone"), LongMemConfig(memory_size=64, topk_chunks=2))
    with torch.no_grad():
        lm.sidenet[0].memory_gate.fill_(1.5)
    lm.memorize(torch.randint(1, 100, (1, 32)))
    lm.save_pretrained(tmp_path / "lm")
    lm.save_memory(tmp_path / "bank")
    from safetensors import safe_open

    with safe_open(tmp_path / "lm" / "model.safetensors", "pt") as f:
        assert not any(k.startswith("backbone.") for k in f.keys())
    assert "LongMem" in (tmp_path / "lm" / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert isinstance(reloaded, LongMemForCausalLM) and reloaded.config.backbone == str(tmp_path / "backbone")
    reloaded.load_memory(tmp_path / "bank")
    ids = torch.randint(1, 100, (1, 6))
    torch.testing.assert_close(reloaded(ids, update_memory=False).logits, lm(ids, update_memory=False).logits)


def test_memory_from_another_backbone_is_refused(tmp_path):
    lm = make_lm(seed=0)
    lm.memorize(torch.randint(1, 100, (1, 16)))
    lm.save_memory(tmp_path)
    other = make_lm(seed=1)
    with pytest.raises(ValueError, match="made for another model or layer.*source"):
        other.load_memory(tmp_path)
    with pytest.raises(ValueError, match="made for another model or layer.*memory_size: saved 64 vs this model 128"):
        make_lm(seed=0, memory_size=128).load_memory(tmp_path)


def test_checkpoint_without_backbone_reference_needs_the_backbone(tmp_path):
    lm = make_lm()
    lm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no backbone reference.*backbone=model"):
        LongMemForCausalLM.from_pretrained(tmp_path)
    reloaded = LongMemForCausalLM.from_pretrained(tmp_path, backbone=tiny_llama())
    ids = torch.randint(1, 100, (1, 6))
    torch.testing.assert_close(reloaded(ids).logits, lm(ids).logits)


def test_push_to_hub_and_reload_backbone_from_the_hub(hub):
    backbone = tiny_gpt2(seed=3)
    backbone.push_to_hub("peft-ext/tiny-gpt2-backbone")
    lm = LongMemForCausalLM.from_backbone("peft-ext/tiny-gpt2-backbone", LongMemConfig(memory_size=64))
    with torch.no_grad():
        lm.sidenet_norm.weight.mul_(1.1)
    lm.push_to_hub("peft-ext/tiny-gpt2-longmem")
    reloaded = LongMemForCausalLM.from_pretrained("peft-ext/tiny-gpt2-longmem")
    assert reloaded.config.backbone == "peft-ext/tiny-gpt2-backbone"
    ids = torch.randint(1, 100, (1, 6))
    torch.testing.assert_close(reloaded(ids).logits, lm(ids).logits)
    assert math.isfinite(reloaded(ids, labels=ids).loss.item())
    assert os.environ["HF_ENDPOINT"] == hub.url


@pytest.mark.slow
def test_tour_stage(tmp_path):
    from peft_ext.models.longmem.tour import run_stage
    from peft_ext.tour import StageProgress

    result = run_stage(tmp_path, lambda total: StageProgress("longmem", total))
    assert result.metrics["backbone bit-identical after adaptation"] == "True"
    assert result.metrics["max |Δlogits| after save/reload (with memory)"] < 1e-5
    assert result.metrics["saved SideNet bytes (backbone not saved)"] < result.metrics["backbone bytes (for comparison)"]
