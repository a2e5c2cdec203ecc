"""Tour stage: NOLA on the real all-MiniLM-L6-v2 encoder, sentiment classification of real review
sentences (gensim's Pang & Lee test data), trained briefly, evaluated, saved, and reloaded."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch

from peft_ext.embedded import encode_labelled, minilm_path, polarity_sentences


def run_stage(out_dir: Path, make_progress):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new head's "newly initialized" report is expected

    from peft_ext import NolaConfig
    from peft_ext.tour import StageResult

    torch.manual_seed(0)
    pairs = polarity_sentences()
    random.Random(0).shuffle(pairs)
    train, test = pairs[:160], pairs[160:]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def encode(batch):
        return encode_labelled(tokenizer, batch)

    def load_base():
        torch.manual_seed(0)  # the classifier head is new: seed it the same way every time
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)

    config = NolaConfig(r=4, num_basis_A=256, num_basis_B=256, nola_alpha=8,
                        target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(load_base(), config)
    trainable, _ = model.get_nb_trainable_parameters()
    # the new head needs a gentler step than the coefficients
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    coefficients = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    optimizer = torch.optim.AdamW([{"params": head, "lr": 2e-3}, {"params": coefficients, "lr": 1e-2}])

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        out = m(**encode(test))
        return out.loss.item(), (out.logits.argmax(-1) == torch.tensor([y for _, y in test])).float().mean().item()

    loss_before, acc_before = evaluate(model)
    epochs, batch_size = 5, 16
    progress = make_progress(epochs * len(train) // batch_size)
    losses = []
    for epoch in range(epochs):
        model.train()
        order = random.Random(epoch).sample(train, len(train))
        for i in range(0, len(order), batch_size):
            loss = model(**encode(order[i:i + batch_size])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            progress.update(loss=f"{loss.item():.3f}")
    progress.close()
    loss_after, acc_after = evaluate(model)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        adapter_bytes = (Path(tmp) / "adapter_model.safetensors").stat().st_size
        reloaded = PeftModel.from_pretrained(load_base(), tmp).eval()
        probe = encode(test[:8])
        probe.pop("labels")
        with torch.no_grad():
            reload_diff = (reloaded(**probe).logits - model(**probe).logits).abs().max().item()

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses)
    ax.set(xlabel="step", ylabel="train loss", title="NOLA on all-MiniLM-L6-v2 (sentiment)")
    fig.tight_layout()
    fig.savefig(out_dir / "nola_loss.png", dpi=100)
    plt.close(fig)

    return StageResult(
        title="NOLA: MiniLM-L6 sentiment classification",
        summary=("NOLA (r=4, k=l=256) on the query/value projections of the real all-MiniLM-L6-v2 encoder; "
                 f"{len(train)} training and {len(test)} test sentences (Pang & Lee, from gensim's test data). "
                 "The classifier head is new and trains fully; the adapter file holds the coefficients and the head."),
        metrics={
            "trainable parameters": trainable,
            "adapter file bytes": adapter_bytes,
            "test loss before": loss_before,
            "test loss after": loss_after,
            "test accuracy before": acc_before,
            "test accuracy after": acc_after,
            "max |Δlogits| after save/reload": reload_diff,
        },
        figures=["nola_loss.png"],
    )
