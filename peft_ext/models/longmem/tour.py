"""Tour stage: LongMem on real news text. A tiny byte-level Llama is briefly pretrained on gensim's news articles
(it has no pretrained weights to download), frozen, and wrapped with LongMem; the SideNet is adapted on articles
streamed in 64-byte segments (each row's bank holds its article's past); the held-out articles' loss is measured with
memory, with memory off, and for the bare backbone (all three see the same 64-byte local window); then the SideNet
is saved, reloaded through `AutoModelForCausalLM` (which reloads the backbone from its saved reference) and compared."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

HIDDEN, LAYERS, SEGMENT, STREAMS = 64, 4, 64, 8
PRETRAIN_STEPS, ADAPT_STEPS, HELD_OUT = 100, 80, 16
VOCAB = 257  # bytes + padding (256)


def run_stage(out_dir: Path, make_progress):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()

    from peft_ext.embedded import news_paragraphs
    from peft_ext.models.longmem import LongMemConfig, LongMemForCausalLM
    from peft_ext.models.longmem.data import DocumentStreams
    from peft_ext.tour import StageResult

    documents = [torch.tensor(list(text.encode("utf-8"))) for text in news_paragraphs()]
    held_out, train = documents[:HELD_OUT], documents[HELD_OUT:]
    progress = make_progress(PRETRAIN_STEPS + ADAPT_STEPS)

    # 1. A tiny backbone, briefly pretrained on 128-byte windows of the training articles.
    torch.manual_seed(0)
    backbone = LlamaForCausalLM(LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=256, eos_token_id=256,
        pad_token_id=256))
    windows = torch.cat(train).unfold(0, 128, 128)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(PRETRAIN_STEPS):
        batch = windows[torch.randint(len(windows), (16,), generator=generator)]
        loss = backbone(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(stage="pretrain backbone", loss=f"{loss.item():.3f}")
    pretrain_seconds = time.perf_counter() - start
    backbone.eval()

    with tempfile.TemporaryDirectory() as tmp:
        backbone.save_pretrained(f"{tmp}/backbone")  # the reference the SideNet checkpoint will point to
        lm = LongMemForCausalLM.from_backbone(f"{tmp}/backbone", LongMemConfig(memory_size=4096, chunk_size=4,
                                                                               topk_chunks=8))
        backbone = lm.backbone
        before = {k: v.clone() for k, v in backbone.state_dict().items()}

        # 2. Memory-augmented adaptation: articles streamed segment by segment, banks reset at article boundaries.
        trainable = [p for p in lm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=2e-3)
        stream = iter(DocumentStreams(train, batch_size=STREAMS, segment_length=SEGMENT, pad_token_id=256))
        lm.train()
        start = time.perf_counter()
        for _ in range(ADAPT_STEPS):
            loss = lm(**next(stream)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update(stage="adapt SideNet", loss=f"{loss.item():.3f}")
        adapt_seconds = time.perf_counter() - start
        progress.close()
        lm.eval()
        untouched = all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())

        # 3. Held-out articles, each streamed into a fresh bank.
        losses = {"with memory": [0.0, 0], "memory off": [0.0, 0], "bare backbone": [0.0, 0]}
        with torch.no_grad():
            for document in held_out:
                lm.reset_memory(batch_size=1)
                for begin in range(0, len(document) - 1, SEGMENT):
                    segment = document[begin:begin + SEGMENT][None]
                    if segment.shape[1] < 2 or begin == 0:  # the first segment has no past: skip it for all three
                        if segment.shape[1] >= 2:
                            lm(segment)
                        continue
                    tokens = segment.shape[1] - 1
                    for name, value in (("memory off", lm(segment, labels=segment, use_memory=False,
                                                          update_memory=False).loss),
                                        ("bare backbone", backbone(segment, labels=segment).loss),
                                        ("with memory", lm(segment, labels=segment).loss)):
                        losses[name][0] += value.item() * tokens
                        losses[name][1] += tokens
            mean = {name: total / count for name, (total, count) in losses.items()}

            # 4. Save (SideNet + reference) and reload through the Auto class; memory saved and reloaded too.
            probe = held_out[0][:SEGMENT][None]
            lm.save_pretrained(f"{tmp}/longmem")
            lm.save_memory(f"{tmp}/bank")
            saved_bytes = sum(p.stat().st_size for p in Path(f"{tmp}/longmem").glob("*.safetensors"))
            reloaded = AutoModelForCausalLM.from_pretrained(f"{tmp}/longmem")
            reloaded.load_memory(f"{tmp}/bank")
            reload_diff = (reloaded(probe, update_memory=False).logits
                           - lm(probe, update_memory=False).logits).abs().max().item()
        if not isinstance(reloaded, LongMemForCausalLM):
            raise RuntimeError(f"AutoModelForCausalLM loaded a {type(reloaded).__name__}, not a LongMemForCausalLM.")

    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters())
    metrics: dict[str, float | int | str] = {
        "held-out loss (nats/byte), LongMem with memory": mean["with memory"],
        "held-out loss, LongMem with memory off": mean["memory off"],
        "held-out loss, bare backbone": mean["bare backbone"],
        "SideNet parameters (trained)": sum(p.numel() for p in trainable),
        "backbone parameters (frozen)": sum(p.numel() for p in backbone.parameters()),
        "backbone bit-identical after adaptation": str(untouched),
        "pretrain time (s)": pretrain_seconds,
        "adaptation time (s)": adapt_seconds,
        "saved SideNet bytes (backbone not saved)": saved_bytes,
        "backbone bytes (for comparison)": backbone_bytes,
        "max |Δlogits| after save/reload (with memory)": reload_diff,
    }
    return StageResult(
        title="LongMem: frozen backbone + memory bank + SideNet, on news articles",
        summary=(f"A byte-level Llama (hidden {HIDDEN}, {LAYERS} layers) pretrained for {PRETRAIN_STEPS} steps on "
                 "gensim's news articles, then frozen as LongMem's memory encoder (bank of 4,096 tokens per row, "
                 f"chunks of 4, top-8). The SideNet ({LAYERS // 2} layers, from blocks 1 and 3) is adapted for "
                 f"{ADAPT_STEPS} steps on articles streamed in {SEGMENT}-byte segments on {STREAMS} rows, each row's "
                 f"bank holding its article's past. Loss on {HELD_OUT} held-out articles (all segments after the "
                 "first, same local window for the three models). Articles are short (about 1.2k bytes), so the "
                 "memory holds at most ~20 segments: this stage shows the mechanics on real text; "
                 "`benchmarks/longmem.py` measures long-range recall."),
        metrics=metrics,
    )
