"""Tour stage: Mixture-of-Transformers vs the dense Llama of the same active size, both trained from scratch on
a real interleaved text/image corpus (gensim's news articles as bytes, scikit-learn's 8×8 digits as image
tokens), evaluated per modality, saved, and reloaded."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

HIDDEN, LAYERS, HEADS, SEQ_LEN = 128, 2, 2, 256
STEPS, BATCH, EVAL_EVERY, EVAL_BLOCKS, LR, WARMUP = 160, 16, 20, 64, 3e-3, 20


def run_stage(out_dir: Path, make_progress):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()

    from peft_ext import MoTConfig, MoTForCausalLM
    from peft_ext.models.mot.corpus import (
        MODALITY_NAMES,
        InterleavedCorpus,
        build_interleaved_corpus,
        count_parameters,
        model_shape,
        validation_loss_by_modality,
    )
    from peft_ext.tour import StageResult

    corpus = build_interleaved_corpus(seq_len=SEQ_LEN)
    validation = corpus.validation[:EVAL_BLOCKS]
    shape = model_shape(HIDDEN, LAYERS, HEADS, SEQ_LEN)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**shape, **InterleavedCorpus.config_kwargs()))
    torch.manual_seed(0)
    mot = MoTForCausalLM(MoTConfig(**shape, **InterleavedCorpus.config_kwargs(), **InterleavedCorpus.mot_kwargs()))

    # Same data in the same order, same optimizer and schedule for both.
    order = torch.randperm(len(corpus.train), generator=torch.Generator().manual_seed(0))
    progress = make_progress(2 * STEPS)
    curves, seconds = {}, {}
    for name, model in (("dense", dense), ("MoT", mot)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
        curves[name] = []
        start = time.perf_counter()
        for step in range(1, STEPS + 1):
            index = order[(step - 1) * BATCH % len(order):][:BATCH]
            ids = corpus.train[index]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % EVAL_EVERY == 0:
                curves[name].append((step, validation_loss_by_modality(model, validation)))
            progress.update(model=name, loss=f"{loss.item():.3f}")
        seconds[name] = time.perf_counter() - start
    progress.close()

    dense.eval()
    mot.eval()
    probe = validation[:4]
    with torch.no_grad():
        # MoT's own per-modality loss on the probe, next to the one computed from the logits
        own = mot(input_ids=probe, labels=probe).loss_per_modality
        check = validation_loss_by_modality(mot, probe)
        upcycled = MoTForCausalLM.from_dense(dense, **InterleavedCorpus.mot_kwargs()).eval()
        upcycle_diff = (upcycled(input_ids=probe).logits - dense(input_ids=probe).logits).abs().max().item()
        with tempfile.TemporaryDirectory() as tmp:
            mot.save_pretrained(tmp)
            weight_bytes = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
            reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
            reload_diff = (reloaded(input_ids=probe).logits - mot(input_ids=probe).logits).abs().max().item()
        if not isinstance(reloaded, MoTForCausalLM):
            raise RuntimeError(f"AutoModelForCausalLM loaded a {type(reloaded).__name__}, not a MoTForCausalLM.")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for m, (ax, modality) in enumerate(zip(axes, MODALITY_NAMES)):
        for name, style in (("dense", "--"), ("MoT", "-")):
            ax.plot([s for s, _ in curves[name]], [losses[m].item() for _, losses in curves[name]], style, label=name)
        ax.set(title=f"{modality} validation loss", xlabel="step")
        ax.legend()
    fig.suptitle(f"MoT vs dense (hidden {HIDDEN}, {LAYERS} layers, same active size)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "mot_loss.png", dpi=100)
    plt.close(fig)

    dense_total, _ = count_parameters(dense)
    mot_total, mot_active = count_parameters(mot)
    metrics: dict[str, float | int | str] = {
        "dense parameters": dense_total,
        "MoT parameters (all)": mot_total,
        "MoT parameters active per token": mot_active,
    }
    for m, modality in enumerate(MODALITY_NAMES):
        dense_final = curves["dense"][-1][1][m].item()
        mot_final = curves["MoT"][-1][1][m].item()
        reached = next((step for step, losses in curves["MoT"] if losses[m].item() <= dense_final), None)
        metrics[f"{modality} val loss, dense"] = dense_final
        metrics[f"{modality} val loss, MoT"] = mot_final
        metrics[f"{modality}: MoT reaches dense's final loss at step"] = (
            f"{reached} of {STEPS}" if reached else "not reached")
    metrics.update({
        "train time dense (s)": seconds["dense"],
        "train time MoT (s)": seconds["MoT"],
        "max |loss_per_modality − loss from logits|": (own - check).abs().max().item(),
        "from_dense: max |Δlogits| vs dense": upcycle_diff,
        "MoT weights file bytes": weight_bytes,
        "max |Δlogits| after save/reload": reload_diff,
    })
    return StageResult(
        title="MoT: Mixture-of-Transformers vs dense, interleaved text and images",
        summary=(f"A dense Llama and a MoT of the same shape (hidden {HIDDEN}, {LAYERS} layers, so the same FLOPs "
                 f"per token) trained from scratch, {STEPS} steps of {BATCH}×{SEQ_LEN} tokens each, same data order, "
                 "on news text (UTF-8 bytes, gensim) interleaved with 8×8 handwritten digits (16-level image tokens, "
                 "scikit-learn). MoT unties projections, FFNs and norms by modality; attention stays global. "
                 f"Validation loss per modality on {EVAL_BLOCKS} held-out blocks. Then: `from_dense` upcycling of "
                 "the trained dense model, and a save/`AutoModelForCausalLM.from_pretrained` round trip."),
        metrics=metrics,
        figures=["mot_loss.png"],
    )
