"""LongMem scale-out: each process's banks hold only its own documents, read in order; the SideNet trains in sync.

The fast tests check `DocumentStreams(num_processes=...)` through accelerate's own sharding of an iterable dataset.
The slow test trains examples/longmem_adapt.py's `Trainer` on 2 CPU processes (DDP over gloo, and DeepSpeed
ZeRO-2/3 where installed) through tests/scripts/longmem_rank_banks.py, which records what each process's rows read
and its banks' keys, and checks them against documents and keys computed here, independently.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import IterableDatasetShard
from conftest import load_benchmark, tiny_llama
from safetensors.torch import load_file

from peft_ext.embedded import news_paragraphs
from peft_ext.models.longmem import LongMemConfig, LongMemForCausalLM
from peft_ext.models.longmem.data import DocumentStreams

ROOT = Path(__file__).resolve().parents[1]
SEGMENT = 16


def documents_of_lengths(*lengths: int) -> list[torch.Tensor]:
    """Documents with disjoint token ranges: document i holds the tokens 100·i + 1, 100·i + 2, ..."""
    return [torch.arange(1, n + 1) + 100 * i for i, n in enumerate(lengths)]


def rows_read(batches: list[dict[str, torch.Tensor]]) -> list[list[list[int]]]:
    """Per row, the documents it read (as token lists), split at `new_document`, padding dropped."""
    rows = [[] for _ in range(batches[0]["input_ids"].shape[0])]
    for batch in batches:
        for b, (ids, mask, first) in enumerate(zip(batch["input_ids"], batch["attention_mask"], batch["new_document"])):
            if first:
                rows[b].append([])
            rows[b][-1] += ids[mask.bool()].tolist()
    return rows


def test_accelerate_sharding_hands_each_process_its_own_streams_in_order():
    documents = documents_of_lengths(10, 5, 7, 12, 3, 9, 6)
    stream = DocumentStreams(documents, batch_size=2, segment_length=4, num_processes=2)
    owned = [stream.process_documents(p) for p in range(2)]
    assert owned == [[[0, 6], [2, 5]], [[1, 4], [3]]]  # dealt by fewest segments, the processes' first rows first
    assert not {i for row in owned[0] for i in row} & {i for row in owned[1] for i in row}
    for p in range(2):
        # exactly what Trainer's data loader does to an iterable dataset on process p of 2 (dispatch_batches=False)
        shard = iter(IterableDatasetShard(stream, batch_size=1, num_processes=2, process_index=p))
        batches = [next(shard) for _ in range(6)]
        assert all(batch["input_ids"].shape == (2, 4) for batch in batches)
        for row, documents_read in zip(owned[p], rows_read(batches)):
            # whole documents, in order (then the row's first document again), the last one read so far
            expected = [documents[i].tolist() for i in row] * 3
            *whole, current = documents_read
            assert len(whole) >= 1 and whole == expected[:len(whole)]
            assert current == expected[len(whole)][:len(current)]


def test_two_processes_read_the_global_batch_of_one():
    """1 process × 4 rows and 2 processes × 2 rows read the same rows at every step (so train on the same batch)."""
    documents = documents_of_lengths(10, 5, 7, 12, 3, 9, 6, 8, 4)
    one = iter(DocumentStreams(documents, batch_size=4, segment_length=4))
    two = iter(DocumentStreams(documents, batch_size=2, segment_length=4, num_processes=2))
    for _ in range(8):
        single = next(one)
        split = [next(two), next(two)]
        for key in single:
            rows = torch.cat([batch[key] for batch in split])
            assert torch.equal(rows[[0, 2, 1, 3]], single[key]), key  # stream s of 1 process is row π(s) of 2


def test_document_streams_reject_processes_without_documents():
    with pytest.raises(ValueError, match="at least one document per process"):
        DocumentStreams(documents_of_lengths(4, 4), batch_size=1, segment_length=4, num_processes=3)
    with pytest.raises(ValueError, match="`num_processes` must be >= 1, got 0"):
        DocumentStreams(documents_of_lengths(4), batch_size=1, segment_length=4, num_processes=0)
    with pytest.raises(ValueError, match=r"`process_index` must be in \[0, 2\), got 2"):
        DocumentStreams(documents_of_lengths(4, 4), batch_size=1, segment_length=4, num_processes=2).process_documents(2)


def streamed_lm_and_batch() -> tuple[LongMemForCausalLM, dict[str, torch.Tensor]]:
    lm = LongMemForCausalLM.from_backbone(tiny_llama(), LongMemConfig(memory_size=64, chunk_size=4, topk_chunks=3))
    stream = DocumentStreams([torch.arange(1, 13), torch.arange(50, 57)], batch_size=2, segment_length=8)
    return lm.train(), next(iter(stream))  # the first batch: every row starts a document, every bank is empty


def test_every_sidenet_parameter_gets_a_gradient_even_when_the_banks_are_empty():
    """DeepSpeed reduces gradients by bucket, all parameters in order: a process whose banks are all empty (every
    row starting a document) must still produce the memory gate's gradient (zero), or the processes' buckets differ
    ("Received data size doesn't match expected size" from gloo, or silently misaligned gradients)."""
    lm, batch = streamed_lm_and_batch()
    lm(**batch).loss.backward()
    gate = lm.sidenet[lm.config.sidenet_memory_layer].memory_gate
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)
    assert torch.equal(gate.grad, torch.zeros_like(gate))


def test_loss_is_normalized_by_the_labelled_tokens_of_the_global_batch():
    """`Trainer` passes `num_items_in_batch` (the labelled tokens of all processes' batches) and multiplies the loss by
    the number of processes: the model must then return its tokens' loss sum over that count, so that N processes
    average to the loss of the global batch (the same training as 1 process), rows of any length."""
    lm, batch = streamed_lm_and_batch()
    batch["attention_mask"][1, 5:] = 0  # rows with different numbers of labelled tokens
    batch["labels"][1, 5:] = -100
    mean = lm(**batch).loss
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    global_count = torch.tensor(3 * labelled)  # as if two other processes' rows held twice as many tokens
    torch.testing.assert_close(lm(**batch, num_items_in_batch=global_count).loss, mean * labelled / global_count)


def memory_layer_keys(backbone, layer: int, segments: list[list[int]]) -> torch.Tensor:
    """(kv_heads, tokens, head_dim): the backbone's `k_proj` outputs at `layer`, each segment read on its own."""
    config = backbone.config
    outputs = []
    handle = backbone.model.layers[layer].self_attn.k_proj.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        with torch.no_grad():
            for segment in segments:
                backbone.model(input_ids=torch.tensor([segment]))
    finally:
        handle.remove()
    keys = torch.cat(outputs, dim=1)[0]
    return keys.view(keys.shape[0], config.num_key_value_heads, config.head_dim).transpose(0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_each_process_banks_hold_only_its_own_documents(engine, tiny_llama_dir, tmp_path):
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install --no-build-isolation deepspeed)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Short documents (sentences of news articles, 2 to 4 segments each), so that rows cross document boundaries.
    sentences = [s for p in news_paragraphs()[:10] for s in re.split(r"(?<=[.!?]) ", p.strip()) if len(s.split()) > 3]
    text_file = tmp_path / "documents.txt"
    text_file.write_text("\n".join(sentences[:24]) + "\n", encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    held_out = 2
    documents = [tokenizer(s)["input_ids"] for s in sentences[:24]][held_out:]
    out = tmp_path / "out"
    command = [str(ROOT / "tests" / "scripts" / "longmem_rank_banks.py"), "--backbone", str(tiny_llama_dir),
               "--text_file", str(text_file), "--eval_documents", str(held_out), "--segment_length", str(SEGMENT),
               "--memory_size", "1024", "--topk_chunks", "4", "--max_steps", "8", "--learning_rate", "0.01",
               "--per_device_train_batch_size", "2", "--output_dir", str(out), "--use_cpu", "--report_to", "none",
               "--save_strategy", "no", "--seed", "0"]
    result = load_benchmark("scale_out").launch(command, 2, engine)
    assert result.returncode == 0, result.stderr[-4000:]

    backbone = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    initial = load_file(tiny_llama_dir / "model.safetensors")
    read_by, final, key_error = [], [], 0.0
    for rank in range(2):
        record = json.loads((out / f"rank{rank}.json").read_text())
        tensors = load_file(out / f"rank{rank}.safetensors")
        final.append(tensors)
        assert record["world_size"] == 2 and len(record["steps"]) == 8
        documents_read = set()
        for row in range(2):
            runs = []  # per document read by this row: (its index, the segments read)
            for step in record["steps"]:
                segment, first = step["rows"][row], step["new_document"][row]
                if first:
                    runs.append((None, []))
                runs[-1][1].append(segment)
                tokens = [t for s in runs[-1][1] for t in s]
                # segments in order: what the row read of this document so far is a prefix of exactly one document
                matches = [i for i, d in enumerate(documents) if d[:len(tokens)] == tokens]
                assert len(matches) == 1, (rank, row, tokens)
                runs[-1] = (matches[0], runs[-1][1])
                assert all(len(s) == SEGMENT for s in runs[-1][1][:-1])
                # the bank holds this document's past only: emptied at its start, then every token read
                assert step["bank_tokens"][row] == len(tokens)
            for index, segments in runs[:-1]:  # a document the row left was read to its end
                assert sum(map(len, segments)) == len(documents[index])
            assert len(runs) >= 2  # the run crossed document boundaries
            documents_read |= {index for index, _ in runs}
            # the bank's keys are the memory layer's keys of the current document's tokens, computed here
            expected = memory_layer_keys(backbone, record["memory_layer"], runs[-1][1])
            torch.testing.assert_close(tensors[f"bank_row{row}"], expected, rtol=1e-5, atol=1e-5)
            key_error = max(key_error, (tensors[f"bank_row{row}"] - expected).abs().max().item())
        read_by.append(documents_read)
        for name, weight in initial.items():
            assert torch.equal(tensors[f"backbone.{name}"], weight), name  # frozen: bit-identical
    assert not read_by[0] & read_by[1]  # no document is read by both processes
    assert len(read_by[0]) >= 4 and len(read_by[1]) >= 4

    sidenet = [name for name in final[0] if name.startswith("sidenet")]
    assert sidenet and sidenet == [name for name in final[1] if name.startswith("sidenet")]
    for name in sidenet:
        assert torch.equal(final[0][name], final[1][name]), name  # gradients all-reduced: the same update
    # trained: SideNet layer 0 started as a copy of backbone block 1
    assert not torch.equal(final[0]["sidenet.0.mlp.up_proj.weight"], initial["model.layers.1.mlp.up_proj.weight"])
    print(f"\nlongmem {engine}: documents read by process 0 {sorted(read_by[0])}, by process 1 {sorted(read_by[1])}; "
          f"max |bank key - backbone key| {key_error:.1e}; SideNet equal on both, backbone bit-identical")
