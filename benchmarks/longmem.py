"""LongMem on CPU, in one run: long-range recall with and without memory, speed against the bare backbone, and
retrieval exactness and latency.

Part 1, recall (`--part recall`), the training recipe included. The backbone is a tiny Llama-shaped model built from
a config (hidden 64, 2 layers, 4 heads of 16 / 2 key-value heads, 289-token vocabulary) and *pretrained inside this
script* from random weights, on toy data only: a "skip-bigram" language (a token is often a fixed function of the
token two back, which teaches a previous-token head) and in-context associative recall, with and without distractor
pairs between facts and questions (`--pretrain-distractor-tokens`, 192 by default), so that, like a pretrained LM, it
can recall in its local context. It is then frozen. The task (`peft_ext.models.longmem.data.RecallTask`): a document
is a stream of "key value" pairs; 8 facts (keys from their own range) sit in its first 64 tokens, distractor pairs
everywhere else; the questions (4 of the facts' keys, each followed by its value, the label) come after `distance`
more tokens. Values are uniform over 32 tokens (chance 3.1%).

Memory-augmented adaptation trains the SideNet only. Each document is memorized by the frozen backbone (64-token
segments) and the question segment, the only one with labels, is trained on. The recipe is a curriculum on the size
of the bank, which departs from the paper's single pass over a corpus:
  1. reading stage (`--reading-steps`, 300): the facts followed by a few distractor tokens, so that a bank holds at
     most 16 chunks and the retrieval returns all of them: every question trains the read-out;
  2. stages with facts d to 2d+64 tokens back for d in `--curriculum` (64, 256, 1024), of `--stage-steps` (150,
     300, 450) steps, retrieving the top `--train-topk-chunks` (256) chunks per token and head while training, 64
     at evaluation. With 16, a question whose fact is not retrieved gives its query no gradient, and in the
     prototypes the answer loss then lowered the hit rate (results_longmem_run1.md); with 256 the fact is almost
     always among the retrieved ones, and the answer loss contrasts it with the 255 most similar distractors.
     (`--freeze-query-after-reading --train-topk-chunks 16 --chunk-size 4 --stage-steps 150` is run 1's recipe:
     the query frozen after the reading stage instead.)
AdamW lr 3e-3, batches of 8 documents, gate logit initialized at 0 (σ(g) = ½, as in the official code). Evaluation
on unseen documents with facts 4k, 8k, 16k and 32k tokens back (never seen in training); the local window is the
8-token question segment:
  - LongMem with its memory;
  - the same model with memory switched off (`use_memory=False`);
  - the bare backbone on the question segment;
  - the retrieval's own hit rate (is the answer among the pairs retrieved for the question's key?);
  - a retrieval probe (`retrieval_probe`): how often a copy of the memory layer's query, trained for retrieval alone
    on a softmax over the whole bank, makes the answer the top-1 chunk of at least one head. The SideNet's query has
    the same form (a linear map of the normalized embedding of the question's key), so this measures what the frozen
    backbone's cached keys allow: the read-out has to pick the answer among the retrieved pairs, and it does so
    reliably only where its query singles it out.
The LongMem settings are the paper's (64 key/value pairs per token and head, retrieved by their mean key and queried
by the memory layer's own query projection, keys cached before the rotation, a 65,536-token bank per row), except
the chunk size: **chunks of 1 token** (`--chunk-size`; the paper's language-modeling runs use 4 and its
in-context-learning evaluation 2), so retrieval ranks single tokens, as kNN-LM and Memorizing Transformers do. The
official code's k = 64 retrieves k // chunk size chunks (16 of 4, 32 of 2, 64 of 1; `--retrieved-pairs`). Why:
the answer loss pulls the query towards the key of the fact's *value* token (whose value carries the answer) and
away from the fact's key token, so with chunks of 2 the chunk mean that retrieval ranks by, half of it the key
token's key, trains against the reading; with chunks of 1 the ranking score and the attention score are the same
q·k. Measured (results_longmem_run4.md): with chunks of 2 the answer is among the retrieved pairs for 85% of the
questions at 4k and 61% at 32k, with chunks of 1 for about 95% and 89%.
The outcome depends on the backbone's pretraining seed (`--seed`; results_longmem_run7.md): with memory, at 4k, 84.8%
for seed 0, 31.6% for seed 1 (whose memory-layer keys separate the facts poorly) and 79.3% for seed 2.

Part 2, speed (`--part speed`): a SmolLM2-135M-shaped Llama (random weights: speed does not depend on them), 1k-token
segments; tokens/s of LongMem streaming segments into a 65,536-token bank (filled to capacity with random keys and
values first, so every step retrieves from 16,384 chunks, writes and evicts) as a ratio to the bare backbone's full
forward; and the time of retrieval itself (memory search, gather and memory
attention) per 1k tokens as a share of one backbone forward of the same 1k tokens.

Part 3, retrieval (`--part retrieval`): the torch backend's top-k against a brute-force loop on random banks; faiss
flat against torch; latency per 1k query tokens (one head, head_dim 64, top-16 chunks of 4) as the bank grows from
16k to 1M tokens, torch vs faiss IVF and HNSW, with their recall@16 against the exact top-16.

    OMP_NUM_THREADS=2 flock /tmp/peft-ext-heavy.lock python benchmarks/longmem.py            # all parts
    python benchmarks/longmem.py --part recall [--reading-steps 300 --curriculum 64 256 1024]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

from peft_ext.models.longmem import LongMemConfig, LongMemForCausalLM, MemoryBank, MemoryBankSpec
from peft_ext.models.longmem.data import RecallTask, answer_accuracy

logging.set_verbosity_error()


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------- recall
TASK = RecallTask(num_distractors=128, num_keys=128, num_values=32, num_facts=8, num_questions=4)
MEMORIZE_SEGMENT, FACT_REGION = 64, 64
READING_CHUNKS = 16  # the reading stage's banks hold at most this many chunks: a retrieval of 16+ returns all


def skip_bigram_batch(generator: torch.Generator, batch: int, length: int = 32):
    """A toy language in which a token is, 70% of the time, a fixed function of the token two places back:
    predicting it needs a look at the previous token, the first half of in-context recall."""
    vocab = TASK.vocab_size
    rule = torch.randperm(vocab - 1, generator=torch.Generator().manual_seed(5)) + 1
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    follows = torch.rand(batch, length, generator=generator) < 0.7
    for t in range(2, length):
        ids[:, t] = torch.where(follows[:, t], rule[ids[:, t - 2] - 1], ids[:, t])
    labels = ids.masked_fill(~follows, -100)
    labels[:, :2] = -100
    return ids, labels


def backbone_config(args) -> LlamaConfig:
    return LlamaConfig(hidden_size=args.backbone_hidden, intermediate_size=2 * args.backbone_hidden,
                       num_hidden_layers=args.backbone_layers, num_attention_heads=args.backbone_heads,
                       num_key_value_heads=args.backbone_kv_heads, head_dim=args.backbone_head_dim,
                       vocab_size=TASK.vocab_size, max_position_embeddings=4096, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0)


def pretrain_backbone(args) -> tuple[LlamaForCausalLM, float]:
    """A tiny Llama trained from scratch on three toy sources at once: the skip-bigram language, in-context
    associative recall (8 facts, then all 8 keys again, each followed by its value), and the same with
    `--pretrain-distractor-tokens` of distractor pairs between facts and questions."""
    torch.manual_seed(args.seed)
    backbone = LlamaForCausalLM(backbone_config(args))
    recall = dataclasses.replace(TASK, num_questions=TASK.num_facts)
    distractor_tokens = args.pretrain_distractor_tokens

    def with_distractors(generator, batch):
        context, questions, labels = recall.long_range_batch(generator, batch, distractor_tokens, fact_region=16)
        return torch.cat([context, questions], 1), torch.cat([torch.full_like(context, -100), labels], 1)

    optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.pretrain_steps):
        batches = (skip_bigram_batch(generator, 16), recall.in_context_batch(generator, 32),
                   with_distractors(generator, args.pretrain_distractor_batch))
        loss = sum(backbone(input_ids=ids, labels=labels).loss for ids, labels in batches)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    backbone.eval()
    with torch.no_grad():
        ids, labels = with_distractors(torch.Generator().manual_seed(args.seed + 1), 256)
        in_context = answer_accuracy(backbone(ids).logits, labels)
    return backbone, in_context


def answer_slots(context: torch.Tensor, questions: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(batch, num_questions) bank chunk of each question's answer: the fact's value token, right after its key."""
    keys = questions[:, 0::2]
    positions = (context[:, None, :] == keys[:, :, None]).float().argmax(dim=-1) + 1
    return positions // chunk_size


class MemoryQuery(torch.nn.Module):
    """The memory layer's query: its input norm, then the query part of its Q/K/V projection."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.norm, self.qkv = layer.norm1, layer.qkv

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.qkv(self.norm(hidden))[0]


def question_queries(query: MemoryQuery, lm: LongMemForCausalLM, questions: torch.Tensor) -> torch.Tensor:
    """(batch, heads, num_questions, head_dim): the memory queries of the questions' keys, as
    `MemoryBank.search_heads` takes them. The memory layer is the SideNet's first (as with this script's 2-layer
    backbone), so its input is the embeddings."""
    keys = questions[:, 0::2]
    queries = query(lm.backbone.get_input_embeddings()(keys)).view(*keys.shape, lm.family.num_heads, -1)
    return queries.transpose(1, 2)


def answer_retrieved(lm: LongMemForCausalLM, questions: torch.Tensor, answers: torch.Tensor) -> float:
    """Share of questions whose answer chunk (`answer_slots`: the fact's value token in the bank) is among the chunks
    that at least one head of the memory layer retrieves for the question's key: the retrieval's own hit rate."""
    query = MemoryQuery(lm.sidenet[lm.config.sidenet_memory_layer])
    with torch.no_grad():
        slots, _ = lm.memory.search_heads(question_queries(query, lm, questions), lm.config.topk_chunks)
    return (slots == answers[:, None, :, None]).any(-1).any(1).float().mean().item()


def stored_chunk_keys(lm: LongMemForCausalLM) -> torch.Tensor:
    """(batch, kv_heads, chunks, head_dim): the banks' chunk keys (every row memorized a context of one length)."""
    return lm.memory.chunk_keys[:, :, :int(lm.memory.num_chunks.max())]


def answer_log_probs(query: MemoryQuery, lm: LongMemForCausalLM, chunk_keys: torch.Tensor, questions: torch.Tensor,
                     answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, heads, num_questions) log-probability of the answer's chunk under a softmax over every chunk in the
    bank, per head, and whether it is that head's top-1 chunk (same shape). answers: (batch, num_questions) chunk
    indices, or (batch, heads, num_questions)."""
    queries = question_queries(query, lm, questions)
    batch, heads, asked, head_dim = queries.shape
    # Query head h reads key/value head h // group, as in `MemoryBank.search_heads`: one matmul per key/value head.
    grouped = queries.reshape(batch, chunk_keys.shape[1], -1, head_dim) @ chunk_keys.transpose(-1, -2)
    scores = grouped.reshape(batch, heads, asked, -1)
    index = answers.reshape(batch, -1, asked, 1).expand(-1, heads, -1, -1)
    top1 = scores.argmax(dim=-1, keepdim=True) == index
    return scores.log_softmax(dim=-1).gather(-1, index).squeeze(-1), top1.squeeze(-1)


def retrieval_probe(lm: LongMemForCausalLM, args) -> MemoryQuery:
    """What the frozen backbone's cached keys allow at best: a copy of the memory layer's query trained for retrieval
    alone, by cross-entropy of a softmax over every chunk in the bank with the answer's chunk the target (its
    log-probability summed over the heads: one head finding it is enough), on 128 documents with the facts
    4,096–4,160 tokens back, Adam lr 3e-3, 30 epochs. The SideNet's query has the same form, so on unseen
    documents the probe's top-1 rate estimates how often a query of that form can single out the answer."""
    probe = copy.deepcopy(MemoryQuery(lm.sidenet[lm.config.sidenet_memory_layer])).requires_grad_(True)
    generator = torch.Generator().manual_seed(args.seed + 4)
    documents = []
    with torch.no_grad():
        for _ in range(128 // 32):
            context, questions, _ = TASK.long_range_batch(generator, 32, 4096, FACT_REGION)
            lm.reset_memory(batch_size=32)
            lm.memorize(context, segment_length=MEMORIZE_SEGMENT, show_progress=False)
            documents.append((stored_chunk_keys(lm).clone(), questions,
                              answer_slots(context, questions, lm.config.chunk_size)))
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3)
    for _ in range(30):
        for chunk_keys, questions, answers in documents:
            log_probs, _ = answer_log_probs(probe, lm, chunk_keys, questions, answers)
            (-log_probs.logsumexp(dim=1).mean()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return probe.requires_grad_(False)


def long_range_accuracy(lm: LongMemForCausalLM, probe: MemoryQuery, distance: int, documents: int, seed: int,
                        batch: int = 32):
    """Accuracy on the answers with memory, with memory off, and of the bare backbone on the questions; the
    retrieval's hit rate, and the probe's top-1 rate (`retrieval_probe`)."""
    generator = torch.Generator().manual_seed(seed)
    hits = {"memory": [], "no memory": [], "backbone": [], "retrieved": [], "probe top-1": []}
    with torch.no_grad():
        for _ in range(documents // batch):
            context, questions, labels = TASK.long_range_batch(generator, batch, distance, FACT_REGION)
            lm.reset_memory(batch_size=batch)
            lm.memorize(context, segment_length=MEMORIZE_SEGMENT, show_progress=False)
            hits["memory"].append(answer_accuracy(lm(questions, update_memory=False).logits, labels))
            hits["no memory"].append(
                answer_accuracy(lm(questions, use_memory=False, update_memory=False).logits, labels))
            hits["backbone"].append(answer_accuracy(lm.backbone(questions).logits, labels))
            answers = answer_slots(context, questions, lm.config.chunk_size)
            hits["retrieved"].append(answer_retrieved(lm, questions, answers))
            _, top1 = answer_log_probs(probe, lm, stored_chunk_keys(lm), questions, answers)
            hits["probe top-1"].append(top1.any(dim=1).float().mean().item())
    return {k: statistics.mean(v) for k, v in hits.items()}


def reading_distractor_tokens(chunk_size: int) -> int:
    return READING_CHUNKS * chunk_size - 2 * TASK.num_facts


def adaptation_batch(generator: torch.Generator, batch: int, distance: int, chunk_size: int):
    """One step's documents. Distance 0 is the reading stage: the 8 facts fill a 16-token region followed by a few
    distractor tokens, so a row's bank holds at most 16 chunks and the retrieval returns all of them (the
    answer is always among the retrieved pairs, every question trains the reading). Otherwise the facts are
    `distance`–`2·distance` tokens before the questions (drawn per step), in a bank of far more than 16 chunks."""
    if distance == 0:
        most = reading_distractor_tokens(chunk_size)
        span = 2 * int(torch.randint(0, most // 2 + 1, (1,), generator=generator))
        return TASK.long_range_batch(generator, batch, span, fact_region=2 * TASK.num_facts)
    span = int(torch.randint(distance, 2 * distance + 1, (1,), generator=generator))
    return TASK.long_range_batch(generator, batch, span, FACT_REGION)


def adapt(lm: LongMemForCausalLM, stages: list[tuple[int, int]], args) -> None:
    """Memory-augmented adaptation of the SideNet, stage by stage: (distance, steps) pairs (see `adaptation_batch`).
    Every document is memorized by the frozen backbone in 64-token segments; the question segment, the only one with
    labels, is the one trained on. Prints the mean answer loss of each stage's last 50 steps."""
    trainable = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.adapt_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 2)
    memory_layer = lm.sidenet[lm.config.sidenet_memory_layer]
    evaluation_topk = lm.config.topk_chunks
    lm.train()
    for distance, steps in stages:
        # Wider retrieval while training on large banks (see the module docstring); the reading stage's banks are
        # retrieved whole anyway.
        lm.config.topk_chunks = args.train_topk_chunks if distance > 0 else evaluation_topk
        if distance > 0 and args.freeze_query_after_reading:
            # On larger banks the answer loss reaches the query only through the retrieved pairs, and in the
            # prototypes its gradient lowered the hit rate (see the results' notes): keep the query the reading stage
            # learned, and train the rest of the SideNet (read-out, gate) on banks of realistic size.
            memory_layer.norm1.requires_grad_(False)
            memory_layer.qkv.q_proj.requires_grad_(False)
        losses = []
        for _ in range(steps):
            context, questions, labels = adaptation_batch(generator, args.adapt_batch, distance, args.chunk_size)
            lm.reset_memory(batch_size=args.adapt_batch)  # a new document in every row
            lm.memorize(context, segment_length=MEMORIZE_SEGMENT, show_progress=False)
            loss = lm(questions, labels=labels, update_memory=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        where = "reading stage" if distance == 0 else f"facts {distance:,}–{2 * distance + FACT_REGION:,} tokens back"
        print(f"  adaptation, {where}: {steps} steps, answer loss {statistics.mean(losses[-50:]):.3f} (chance "
              f"{math.log(TASK.num_values):.3f})", flush=True)
    lm.config.topk_chunks = evaluation_topk
    lm.eval()


def recall_part(args) -> None:
    part_start = start = time.perf_counter()
    backbone, in_context = pretrain_backbone(args)
    pretrain_seconds = time.perf_counter() - start
    topk_chunks = args.retrieved_pairs // args.chunk_size
    lm = LongMemForCausalLM.from_backbone(backbone, LongMemConfig(memory_size=65536, chunk_size=args.chunk_size,
                                                                  topk_chunks=topk_chunks, gate_init=args.gate_init))
    stages = [(0, args.reading_steps)] * (args.reading_steps > 0) + list(zip(args.curriculum, args.stage_steps))
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    start = time.perf_counter()
    adapt(lm, stages, args)
    adapt_seconds = time.perf_counter() - start
    # The reading, with retrieval taken out of the way: the facts alone in the bank (every chunk is retrieved).
    with torch.no_grad():
        generator = torch.Generator().manual_seed(args.seed + 3)
        keys, values = TASK.facts(generator, 64)
        questions, labels = TASK.questions(generator, keys, values)
        lm.reset_memory(batch_size=64)
        lm.memorize(TASK.pairs(keys, values), show_progress=False)
        facts_only = answer_accuracy(lm(questions, update_memory=False).logits, labels)
    start = time.perf_counter()
    probe = retrieval_probe(lm, args)
    probe_seconds = time.perf_counter() - start
    frozen = sum(p.numel() for p in lm.backbone.parameters())
    curriculum = ", then ".join(
        [f"{args.reading_steps} reading steps (facts + 0–{reading_distractor_tokens(args.chunk_size)} distractor "
         f"tokens: bank ≤ {READING_CHUNKS} chunks, all retrieved)"] * (args.reading_steps > 0)
        + [f"{n} steps with facts {d:,}–{2 * d + FACT_REGION:,} tokens back" for d, n in zip(args.curriculum,
                                                                                           args.stage_steps)])
    if args.curriculum:
        curriculum += (f" (top-{args.train_topk_chunks} chunks retrieved while training on these, top-{topk_chunks} "
                       "at evaluation)")
    if args.freeze_query_after_reading and args.curriculum:
        curriculum += " (memory layer's query projection and its norm frozen after the reading stage)"
    print("\n## Long-range recall (facts far outside the local window)\n")
    print(f"backbone: tiny Llama ({args.backbone_layers} layers, hidden {args.backbone_hidden}, {args.backbone_heads} "
          f"heads of {args.backbone_head_dim} / {args.backbone_kv_heads} key-value heads, {frozen:,} parameters, "
          f"frozen), pretrained here for {args.pretrain_steps} steps ({pretrain_seconds:.0f} s); its in-context "
          f"recall (facts, {args.pretrain_distractor_tokens} distractor tokens and questions in one window): "
          f"{in_context:.1%}")
    print(f"adaptation: SideNet only ({trainable:,} parameters), {args.adapt_batch} documents per step: {curriculum}; "
          f"AdamW lr {args.adapt_lr}, gate init {args.gate_init} ({adapt_seconds:.0f} s)")
    print(f"reading check: with only the 8 facts in the bank (retrieval cannot miss), accuracy {facts_only:.1%}")
    print(f"chance: {TASK.chance:.1%} (uniform over {TASK.num_values} values); the questions are read as one "
          f"{TASK.question_length}-token segment (the local window); the context was memorized in "
          f"{MEMORIZE_SEGMENT}-token segments; bank 65,536 tokens per row, chunks of {args.chunk_size}, "
          f"top-{topk_chunks} chunks ({args.retrieved_pairs} key/value pairs) per token and head")
    print(f"retrieval probe: a copy of the memory layer's query trained for retrieval alone (softmax over the whole "
          f"bank, 128 documents with facts 4k back, {probe_seconds:.0f} s); its top-1 rate on the same documents as "
          f"below is about the most often that a query of the SideNet's form can single out the answer with these "
          f"frozen keys\n")
    print("| facts this many tokens before the questions | LongMem with memory | memory off | bare backbone "
          "| answer among the retrieved pairs (any head) | probe: answer is the top-1 chunk (any head) |")
    print("|---|---|---|---|---|---|")
    for i, distance in enumerate(args.distances):
        acc = long_range_accuracy(lm, probe, distance, args.eval_documents, seed=args.seed + 100 + i)
        span = f"{distance:,}–{distance + FACT_REGION:,}"
        print(f"| {span} | {acc['memory']:.1%} | {acc['no memory']:.1%} | {acc['backbone']:.1%} "
              f"| {acc['retrieved']:.1%} | {acc['probe top-1']:.1%} |", flush=True)
    print(f"\nrecall part: {time.perf_counter() - part_start:.0f} s")


# ---------------------------------------------------------------------------------------------------- speed
def smollm2_shaped() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def speed_part(args) -> None:
    from peft_ext.models.longmem import modeling_longmem

    backbone = smollm2_shaped()
    bank_tokens = args.speed_bank_tokens
    config = LongMemConfig(memory_size=bank_tokens, chunk_size=4, topk_chunks=16)
    lm = LongMemForCausalLM.from_backbone(backbone, config).eval()
    segment_length = 1024
    generator = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 49152, (1, bank_tokens + segment_length * (args.speed_repeats + 2)), generator=generator)
    with torch.no_grad():
        # Fill the bank to capacity with keys/values of the right shape: retrieval costs the same whatever they are,
        # and this skips 64 backbone forwards.
        lm.reset_memory(batch_size=1)
        shape = (1, bank_tokens, lm.family.num_kv_heads, lm.family.head_dim)
        lm.memory.write(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
        position = [bank_tokens]

        def next_segment():
            segment = stream[:, position[0]:position[0] + segment_length]
            position[0] = bank_tokens + (position[0] - bank_tokens + segment_length) % (segment_length * args.speed_repeats)
            return segment

        probe = stream[:, :segment_length]
        backbone_seconds, longmem_seconds = [], []
        for _ in range(args.speed_repeats + 1):  # interleaved, so machine drift hits both alike
            start = time.perf_counter()
            backbone(probe)
            backbone_seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
            lm(next_segment())  # retrieves from the full bank, then writes (and evicts)
            longmem_seconds.append(time.perf_counter() - start)
        backbone_time = statistics.median(backbone_seconds[1:])
        longmem_time = statistics.median(longmem_seconds[1:])

        # Retrieval alone: the memory layer's queries for one segment, then search + gather + memory attention.
        layer = lm.sidenet[lm.config.sidenet_memory_layer]
        family = lm.family
        hidden = torch.randn(1, segment_length, 576)
        queries = layer.qkv(layer.norm1(hidden))[0].view(1, segment_length, family.num_heads, -1).transpose(1, 2)
        retrieval_time = median_seconds(
            lambda: modeling_longmem.memory_attention(queries, lm.memory, 16, family.scaling), args.speed_repeats)
        search_time = median_seconds(
            lambda: lm.memory.search(queries.reshape(1, family.num_kv_heads, -1, queries.shape[-1]), 16),
            args.speed_repeats)
    tokens = segment_length
    print(f"\n## Speed: SmolLM2-135M-shaped Llama (random weights), 1k-token segments, {bank_tokens:,}-token bank (full)\n")
    print("| | seconds / 1k-token segment (median) | tokens/s | ratio to backbone |")
    print("|---|---|---|---|")
    print(f"| bare backbone forward | {backbone_time:.3f} | {tokens / backbone_time:,.0f} | 1.00 |")
    print(f"| LongMem forward (backbone + SideNet + retrieval + write) | {longmem_time:.3f} | "
          f"{tokens / longmem_time:,.0f} | {backbone_time / longmem_time:.2f} (target ≥ 0.6) |")
    print(f"\nretrieval (search + gather + memory attention) per 1k tokens: {retrieval_time:.3f} s = "
          f"{retrieval_time / backbone_time:.1%} of one backbone forward (paper: about 55%; target ≤ 25%); "
          f"of which top-k search {search_time:.3f} s")


# ---------------------------------------------------------------------------------------------------- retrieval
def exactness_checks() -> None:
    torch.manual_seed(0)
    spec = MemoryBankSpec(source="random", layer=1, num_kv_heads=2, head_dim=32, chunk_size=4, memory_size=4096)
    banks = {backend: MemoryBank(spec, 2, backend=backend) for backend in ("torch", "faiss-flat")}
    keys, values = torch.randn(2, 2048, 2, 32), torch.randn(2, 2048, 2, 32)
    for bank in banks.values():
        bank.write(keys, values)
    queries = torch.randn(2, 2, 64, 32)
    slots, _ = banks["torch"].search(queries, 16)
    chunk_keys = keys.view(2, 512, 4, 2, 32).mean(2).permute(0, 2, 1, 3)  # (streams, heads, chunks, dim)
    brute = torch.empty_like(slots)
    for s in range(2):
        for h in range(2):
            for t in range(64):
                scores = [float(queries[s, h, t] @ chunk_keys[s, h, c]) for c in range(512)]
                brute[s, h, t] = torch.tensor(sorted(range(512), key=lambda c: -scores[c])[:16])
    faiss_slots, _ = banks["faiss-flat"].search(queries, 16)
    print("\n## Retrieval exactness (2 streams × 2 heads × 64 queries, 512 chunks, top-16)\n")
    print(f"- torch top-k equals the brute-force loop: {torch.equal(slots, brute)}")
    print(f"- faiss flat equals torch: {torch.equal(faiss_slots, slots)}")


def retrieval_part(args) -> None:
    exactness_checks()
    dim, chunk, k, queries_per_step = 64, 4, 16, 1024
    print("\n## Retrieval latency per 1k query tokens (one head, head_dim 64, top-16 chunks of 4)\n")
    print("| bank tokens | chunks | torch exact (s) | faiss IVF (s) | IVF recall@16 | faiss HNSW (s) | HNSW recall@16 "
          "| IVF / HNSW build (s) |")
    print("|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for tokens in args.bank_tokens:
        spec = MemoryBankSpec(source="random", layer=1, num_kv_heads=1, head_dim=dim, chunk_size=chunk,
                              memory_size=tokens)
        # Clustered keys (real keys are far from isotropic), queries near them.
        centers = torch.randn(256, dim, generator=generator)
        keys = centers[torch.randint(256, (tokens,), generator=generator)] + 0.5 * torch.randn(tokens, dim,
                                                                                                generator=generator)
        queries = keys[torch.randint(tokens, (queries_per_step,), generator=generator)] + 0.5 * torch.randn(
            queries_per_step, dim, generator=generator)
        query_block = queries[None, None]  # (one stream, one head, 1k tokens, dim)
        row = [f"{tokens:,}", f"{tokens // chunk:,}"]
        exact = None
        builds = []
        for backend in ("torch", "faiss-ivf", "faiss-hnsw"):
            bank = MemoryBank(spec, 1, backend=backend)
            bank.write(keys[None, :, None], keys[None, :, None])
            start = time.perf_counter()
            if backend != "torch":
                bank._faiss_index(0, 0)
                builds.append(time.perf_counter() - start)
            seconds = median_seconds(lambda bank=bank, block=query_block: bank.search(block, k), args.retrieval_repeats)
            slots, _ = bank.search(query_block, k)
            row.append(f"{seconds:.4f}")
            if exact is None:
                exact = slots[0, 0]
            else:
                found = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(slots[0, 0], exact))
                row.append(f"{found / exact.numel():.3f}")
        row.append(" / ".join(f"{b:.1f}" for b in builds))
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "recall", "speed", "retrieval"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=2400,
                        help="longer pretraining sharpens the keys the memory retrieves by (results_longmem_run6.md)")
    parser.add_argument("--pretrain-distractor-tokens", type=int, default=192)
    parser.add_argument("--pretrain-distractor-batch", type=int, default=32)
    parser.add_argument("--backbone-hidden", type=int, default=64)
    parser.add_argument("--backbone-layers", type=int, default=2)
    parser.add_argument("--backbone-heads", type=int, default=4)
    parser.add_argument("--backbone-kv-heads", type=int, default=2)
    parser.add_argument("--backbone-head-dim", type=int, default=16)
    parser.add_argument("--reading-steps", type=int, default=300)
    parser.add_argument("--curriculum", type=int, nargs="*", default=[64, 256, 1024],
                        help="distances of the stages after the reading stage (facts d–2d tokens back)")
    parser.add_argument("--stage-steps", type=int, nargs="+", default=[150, 300, 450],
                        help="steps of each curriculum stage (one value: every stage)")
    parser.add_argument("--chunk-size", type=int, default=1, help="the recall part's LongMem chunk size")
    parser.add_argument("--retrieved-pairs", type=int, default=64,
                        help="key/value pairs retrieved per token and head at evaluation (the official k): "
                             "k // chunk size chunks")
    parser.add_argument("--train-topk-chunks", type=int, default=256,
                        help="chunks retrieved per token and head in the stages after the reading stage")
    parser.add_argument("--freeze-query-after-reading", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--adapt-batch", type=int, default=8)
    parser.add_argument("--adapt-lr", type=float, default=3e-3)
    parser.add_argument("--gate-init", type=float, default=0.0)
    parser.add_argument("--eval-documents", type=int, default=64)
    parser.add_argument("--distances", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--speed-bank-tokens", type=int, default=65536)
    parser.add_argument("--retrieval-repeats", type=int, default=3)
    parser.add_argument("--bank-tokens", type=int, nargs="+", default=[16384, 65536, 262144, 1048576])
    args = parser.parse_args()
    # Checked before any work: the recall part pretrains for minutes before it builds the LongMem model.
    if len(args.stage_steps) == 1:
        args.stage_steps = args.stage_steps * len(args.curriculum)
    if len(args.stage_steps) != len(args.curriculum):
        parser.error(f"--stage-steps takes one value or one per --curriculum stage ({len(args.curriculum)}), got "
                     f"{args.stage_steps}")
    if args.retrieved_pairs // args.chunk_size < READING_CHUNKS:
        parser.error(f"--retrieved-pairs {args.retrieved_pairs} gives {args.retrieved_pairs // args.chunk_size} chunks "
                     f"of {args.chunk_size}; the reading stage needs at least {READING_CHUNKS} to retrieve its bank")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    if args.part in ("all", "recall"):
        recall_part(args)
    if args.part in ("all", "speed"):
        speed_part(args)
    if args.part in ("all", "retrieval"):
        retrieval_part(args)
    print(f"\ntotal: {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
