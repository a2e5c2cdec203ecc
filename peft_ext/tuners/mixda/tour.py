"""Tour stage: MixDA's two stages on the real all-MiniLM-L6-v2 encoder with real text from gensim's test data.

Stage 1 trains one domain adapter per domain: "news" (the Lee background corpus) and "wiki" (English Wikipedia
articles); the general text of the knowledge-retention term is the other corpus (no third corpus ships). Stage 2
combines both, frozen, with a gate and a task adapter for few-shot sentiment classification of review sentences
(Pang & Lee): 16 labels per class, like the paper's few-shot setting.

all-MiniLM-L6-v2 is a `BertModel` without an MLM head. `BertForMaskedLM` ties the head's decoder to the word
embeddings (frozen, as in BERT) and initializes its transform (dense + GELU + LayerNorm) fresh; stage 1 trains
that transform with the domain adapter (`modules_to_save`), so it is saved in the domain adapter's file and
unused in stage 2. The functions here are shared with `benchmarks/mixda.py`, the example and the notebook.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import torch

from peft_ext.embedded import (
    encode_labelled,
    minilm_path,
    news_paragraphs,
    polarity_sentences,
    wikipedia_paragraphs,
)

MINILM_LAYERS = [2, 5]  # the paper adapts 2 of RoBERTa-large's 24 layers (7 and 11); here a middle and the last
MLM_HEAD_TRANSFORM = "cls.predictions.transform"


def domain_corpora(num_paragraphs: int = 240) -> dict[str, list[str]]:
    """The two domains' paragraphs (same count each, in file order)."""
    return {"news": news_paragraphs()[:num_paragraphs], "wiki": wikipedia_paragraphs(num_paragraphs)}


def few_shot_split(seed: int, shots_per_class: int = 16) -> tuple[list, list]:
    """`shots_per_class` labelled sentences per class for training (drawn with `seed`), the rest for testing."""
    pairs = polarity_sentences()
    rng = random.Random(seed)
    train = []
    for label in (0, 1):
        train += rng.sample([p for p in pairs if p[1] == label], shots_per_class)
    chosen = set(map(id, train))
    rng.shuffle(train)
    return train, [p for p in pairs if id(p) not in chosen]


def train_domain_adapter(tokenizer, domain_text: list[str], general_text: list[str], name: str, *, steps: int,
                         batch_size: int = 8, max_length: int = 64, bottleneck_size: int = 64, lr: float = 1e-3,
                         seed: int = 0, layers=MINILM_LAYERS, on_step=None):
    """Stage 1 on MiniLM: a `PeftModel` whose adapter `name` was trained with `mixda_domain_loss` for `steps`
    steps. Returns (model, history of (loss, MLM, L2) per step)."""
    from peft import get_peft_model
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

    from . import MixDAConfig, mixda_domain_loss

    torch.manual_seed(seed)
    base = BertForMaskedLM.from_pretrained(minilm_path())
    config = MixDAConfig(stage="domain", bottleneck_size=bottleneck_size, layers_to_transform=list(layers),
                         modules_to_save=[MLM_HEAD_TRANSFORM])
    model = get_peft_model(base, config, adapter_name=name)
    masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    history = []
    model.train()
    for _ in range(steps):
        def encode(texts):
            return tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")

        domain = encode(rng.sample(domain_text, batch_size))
        domain = masker([{k: domain[k][i] for k in domain} for i in range(batch_size)])
        general = encode(rng.sample(general_text, batch_size))
        loss, mlm, retention = mixda_domain_loss(model, dict(domain), dict(general))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((loss.item(), mlm.item(), retention.item()))
        if on_step is not None:
            on_step(history[-1])
    return model.eval(), history


def load_classifier(seed: int):
    """MiniLM with a new 2-way head, seeded so every method starts from the same head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def train_classifier(model, tokenizer, train, *, epochs: int, batch_size: int = 8, lr: float = 1e-3,
                     head_lr: float = 2e-3, seed: int = 0, on_step=None) -> list[float]:
    """Train the parameters of `model` that require grad (the head at `head_lr`, the rest at `lr`) on the labelled
    pairs `train`; returns the losses."""
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    groups = [{"params": head, "lr": head_lr}] + ([{"params": rest, "lr": lr}] if rest else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        order = rng.sample(train, len(train))
        for i in range(0, len(order), batch_size):
            loss = model(**encode_labelled(tokenizer, order[i:i + batch_size])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if on_step is not None:
                on_step(losses[-1])
    return losses


@torch.no_grad()
def evaluate(model, tokenizer, pairs, batch_size: int = 64) -> tuple[float, float]:
    """(mean loss, accuracy) on labelled pairs."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        out = model(**encode_labelled(tokenizer, pairs[i:i + batch_size]))
        labels = torch.tensor([y for _, y in pairs[i:i + batch_size]])
        loss_sum += out.loss.item() * len(labels)
        correct += (out.logits.argmax(-1) == labels).sum().item()
    return loss_sum / len(pairs), correct / len(pairs)


def run_stage(out_dir: Path, make_progress):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from peft import PeftModel
    from transformers import AutoTokenizer

    from peft_ext.tour import StageResult

    from . import MixDAModel

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    corpora = domain_corpora()
    domain_steps, epochs = 8, 10
    train, test = few_shot_split(seed=0)
    progress = make_progress(2 * domain_steps + epochs * len(train) // 8)
    histories = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, other in (("news", "wiki"), ("wiki", "news")):
            model, histories[name] = train_domain_adapter(
                tokenizer, corpora[name], corpora[other], name, steps=domain_steps, max_length=32,
                on_step=lambda h: progress.update(loss=f"{h[0]:.3f}"))
            model.save_pretrained(tmp / "domains")  # → domains/<name>
        domain_bytes = (tmp / "domains" / "news" / "adapter_model.safetensors").stat().st_size

        clf = MixDAModel.for_task(load_classifier(seed=0), {n: tmp / "domains" / n for n in ("news", "wiki")},
                                  gate_granularity="sequence")
        trainable, _ = clf.get_nb_trainable_parameters()
        loss_before, acc_before = evaluate(clf, tokenizer, test)
        frozen = {n: b.clone() for n, b in clf.named_buffers() if "mixda_domains" in n}
        task_losses = train_classifier(clf, tokenizer, train, epochs=epochs,
                                       on_step=lambda loss: progress.update(loss=f"{loss:.3f}"))
        progress.close()
        loss_after, acc_after = evaluate(clf, tokenizer, test)
        domains_unchanged = all(torch.equal(b, frozen[n]) for n, b in clf.named_buffers() if n in frozen)

        clf.save_pretrained(tmp / "task")
        task_bytes = (tmp / "task" / "adapter_model.safetensors").stat().st_size
        reloaded = PeftModel.from_pretrained(load_classifier(seed=1), tmp / "task").eval()
        probe = encode_labelled(tokenizer, test[:16])
        probe.pop("labels")
        with torch.no_grad():
            reload_diff = (reloaded(**probe).logits - clf.eval()(**probe).logits).abs().max().item()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for name, history in histories.items():
        axes[0].plot([h[1] for h in history], label=f"{name}: MLM")
        axes[0].plot([h[2] * 100 for h in history], linestyle="--", label=f"{name}: L2 × 100")
    axes[0].set(xlabel="step", title="stage 1: domain adapters")
    axes[0].legend(fontsize=7)
    axes[1].plot(task_losses)
    axes[1].set(xlabel="step", ylabel="train loss", title="stage 2: 16-shot sentiment")
    fig.tight_layout()
    fig.savefig(out_dir / "mixda_stages.png", dpi=100)
    plt.close(fig)

    return StageResult(
        title="MixDA: MiniLM-L6 domain adapters (news, Wikipedia) → few-shot sentiment",
        summary=(f"Stage 1: one domain adapter (1536 → 64 → 384 on layers {MINILM_LAYERS}) per domain, {domain_steps} "
                 "steps of 0.5 · MLM on the domain + L2 to the frozen FFN on the other corpus. MiniLM has no MLM "
                 "head: the decoder is tied to the word embeddings, the transform is new and trains with the "
                 "adapter. Stage 2: both adapters frozen, a sequence-level softmax gate, a task adapter and the head, "
                 f"trained on {len(train)} labelled sentences (16 per class), tested on {len(test)}. "
                 f"Stage time {time.perf_counter() - start:.0f} s."),
        metrics={
            "stage-1 news MLM loss first → last": f"{histories['news'][0][1]:.3f} → {histories['news'][-1][1]:.3f}",
            "stage-1 wiki MLM loss first → last": f"{histories['wiki'][0][1]:.3f} → {histories['wiki'][-1][1]:.3f}",
            "domain adapter file bytes": domain_bytes,
            "stage-2 trainable parameters": trainable,
            "task adapter file bytes (with the frozen domain copies)": task_bytes,
            "test loss before": loss_before,
            "test loss after": loss_after,
            "test accuracy before": acc_before,
            "test accuracy after": acc_after,
            "domain adapters bit-identical after stage 2": str(domains_unchanged),
            "max |Δlogits| after save/reload": reload_diff,
        },
        figures=["mixda_stages.png"],
    )
