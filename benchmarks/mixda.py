"""MixDA benchmark: few-shot accuracy against head-only, a bottleneck adapter and LoRA, and inference time.

All measured in one run on the real all-MiniLM-L6-v2 encoder (2 CPU cores here):

1. Stage 1 (once, shared by the seeds): a "news" and a "wiki" domain adapter on layers 2 and 5
   (see peft_ext/tuners/mixda/tour.py for the data and the MLM head).
2. For each seed: 16 labelled sentences per class (Pang & Lee polarity, gensim's test data), the other 168 for
   testing; four methods from the same seeded head, same steps, same learning rates:
   head-only; a Pfeiffer bottleneck adapter (hidden → hidden/16 → hidden, ReLU) after the FFN of the same two
   layers; LoRA r=8 on query/value of every layer (peft); MixDA (both domain adapters frozen + sequence gate +
   task adapter). Trainable parameters include the head.
3. Inference time of MixDA with 1, 2 and 4 domain adapters on the 2 layers, as a ratio to the base model: each
   repeat times every model back to back on the same batch; the ratio is the median over repeats.

Usage: OMP_NUM_THREADS=2 python benchmarks/mixda.py [--seeds 0 1 2] [--domain-steps 30] [--epochs 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn
from transformers import AutoTokenizer
from transformers.utils import logging

from peft_ext.embedded import encode_labelled, minilm_path
from peft_ext.tuners.mixda import MixDAModel
from peft_ext.tuners.mixda.tour import (
    MINILM_LAYERS,
    domain_corpora,
    evaluate,
    few_shot_split,
    load_classifier,
    train_classifier,
    train_domain_adapter,
)


class FFNWithBottleneckAdapter(nn.Module):
    """The baseline: a Pfeiffer adapter y + W_up ReLU(W_down y) after an FFN down projection (W_up zero-init)."""

    def __init__(self, dense: nn.Linear, reduction: int = 16):
        super().__init__()
        self.dense = dense
        hidden = dense.out_features
        self.down = nn.Linear(hidden, hidden // reduction)
        self.up = nn.Linear(hidden // reduction, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        y = self.dense(x)
        return y + self.up(torch.relu(self.down(y)))


def head_only(seed, domains):
    model = load_classifier(seed)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model


def bottleneck_adapter(seed, domains):
    model = head_only(seed, domains)
    for index in MINILM_LAYERS:
        output = model.bert.encoder.layer[index].output
        output.dense = FFNWithBottleneckAdapter(output.dense)
    return model


def lora(seed, domains):
    return get_peft_model(load_classifier(seed), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                            task_type=TaskType.SEQ_CLS))


def mixda(seed, domains):
    return MixDAModel.for_task(load_classifier(seed), domains, gate_granularity="sequence")


METHODS = {"head only": head_only, "bottleneck adapter (Pfeiffer, 2 layers)": bottleneck_adapter,
           "LoRA r=8 (q, v, 6 layers)": lora, "MixDA (2 domain adapters + gate + task adapter)": mixda}


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def time_inference(models: dict, batch: dict, repeats: int, calls: int = 3) -> dict[str, float]:
    """Median over repeats of (time of a model / time of "base" in the same repeat)."""
    for model in models.values():
        model.eval()
        model(**batch)  # warm-up
    ratios = {name: [] for name in models}
    for _ in range(repeats):
        times = {}
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(calls):
                model(**batch)
            times[name] = time.perf_counter() - start
        for name in models:
            ratios[name].append(times[name] / times["base"])
    return {name: statistics.median(values) for name, values in ratios.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--domain-steps", type=int, default=30)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per stage-1 paragraph")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--timing-repeats", type=int, default=9)
    args = parser.parse_args()
    start = time.perf_counter()
    logging.set_verbosity_error()  # the new heads' "newly initialized" reports are expected
    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    corpora = domain_corpora()
    print(f"# MixDA benchmark (all-MiniLM-L6-v2, {torch.get_num_threads()} threads, seeds {args.seeds})\n")
    with tempfile.TemporaryDirectory() as tmp:
        domain_root = Path(tmp) / "domains"
        print("## Stage 1 (domain adapters, shared by the seeds)\n")
        print("| domain | general text | steps | MLM first → last (mean of 5) | L2 last (mean of 5) |")
        print("|---|---|---|---|---|")
        for name, other in (("news", "wiki"), ("wiki", "news")):
            model, history = train_domain_adapter(tokenizer, corpora[name], corpora[other], name,
                                                  steps=args.domain_steps, max_length=args.max_length)
            model.save_pretrained(domain_root)
            first = statistics.mean(h[1] for h in history[:5])
            last = statistics.mean(h[1] for h in history[-5:])
            print(f"| {name} | {other} | {args.domain_steps} | {first:.3f} → {last:.3f} | "
                  f"{statistics.mean(h[2] for h in history[-5:]):.2e} |", flush=True)
        domains = {name: domain_root / name for name in ("news", "wiki")}

        results = {name: [] for name in METHODS}
        params = {}
        for seed in args.seeds:
            train, test = few_shot_split(seed)
            for name, build in METHODS.items():
                model = build(seed, domains)
                params[name] = trainable_parameters(model)
                train_classifier(model, tokenizer, train, epochs=args.epochs, lr=args.lr, seed=seed)
                results[name].append(evaluate(model, tokenizer, test)[1])
                print(f"seed {seed}: {name}: test accuracy {results[name][-1]:.3f}", flush=True)

        print(f"\n## Few-shot sentiment: 16 labels per class, {len(test)} test sentences, {args.epochs} epochs\n")
        print("| method | trainable params | accuracy mean ± std | median | per seed |")
        print("|---|---|---|---|---|")
        for name, accs in results.items():
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"| {name} | {params[name]:,} | {statistics.mean(accs):.3f} ± {spread:.3f} | "
                  f"{statistics.median(accs):.3f} | {', '.join(f'{a:.3f}' for a in accs)} |")

        _, test = few_shot_split(0)
        batch = encode_labelled(tokenizer, test[:32])
        batch.pop("labels")
        four = {"news": domains["news"], "wiki": domains["wiki"], "news_b": domains["news"], "wiki_b": domains["wiki"]}
        # a reference for the cost of peft's wrapper and of this machine's noise: LoRA adds < 1% of the FLOPs
        models = {"base": load_classifier(0), "LoRA r=8 (reference)": lora(0, None)}
        for k, chosen in ((1, {"news": domains["news"]}), (2, domains), (4, four)):
            models[f"MixDA K={k}"] = MixDAModel.for_task(load_classifier(0), chosen, gate_granularity="sequence")
        ratios = time_inference(models, dict(batch), repeats=args.timing_repeats)
        print(f"\n## Inference time / base (batch 32 × {batch['input_ids'].shape[1]} tokens, adapters on layers "
              f"{MINILM_LAYERS}, median of {args.timing_repeats} repeats of 3 forwards)\n")
        print("| model | time / base |")
        print("|---|---|")
        for name, ratio in ratios.items():
            print(f"| {name} | {ratio:.3f} |")
        print(f"\ntotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
