"""NOLA vs LoRA (r=1, r=8) vs VeRA, side by side in one run, on CPU.

Part 1, cost (a GPT-2-small-shaped model, 124M parameters, random init, batch 8 × 256 tokens, adapters on
`c_attn`): trainable parameters, adapter file bytes, train-step time (median of --steps steps after one
warm-up) as a ratio to LoRA r=8, peak memory (max RSS of the process that ran it: each method runs in a fresh
subprocess), and merged inference time as a ratio to the base model (medians, interleaved).

Part 2, quality at equal budget: the real all-MiniLM-L6-v2 encoder on real review sentences (gensim's Pang &
Lee test data, 160 train / 40 test, --seeds splits), LoRA r=1 vs NOLA with half of LoRA r=1's adapter parameters,
and the head alone for reference; mean test loss and accuracy.

    python benchmarks/nola.py               # both parts (about 15 minutes on 2 cores)
    python benchmarks/nola.py --part cost   # or --part quality
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

COST_METHODS = ["lora_r1", "lora_r8", "vera", "nola_cached", "nola_chunked"]


def adapter_config(method: str):
    from peft import LoraConfig, VeraConfig

    from peft_ext import NolaConfig

    target = ["c_attn"]
    if method == "lora_r1":
        return LoraConfig(r=1, target_modules=target, fan_in_fan_out=True)
    if method == "lora_r8":
        return LoraConfig(r=8, target_modules=target, fan_in_fan_out=True)
    if method == "vera":
        return VeraConfig(r=256, target_modules=target, fan_in_fan_out=True, save_projection=False)
    mode = method.removeprefix("nola_")
    return NolaConfig(r=8, num_basis_A=1024, num_basis_B=1024, nola_alpha=8, target_modules=target,
                      fan_in_fan_out=True, basis_mode=mode)


def cost_worker(method: str, steps: int, batch: int, seq: int) -> dict:
    """Runs in its own process, so that its max RSS is its own peak memory."""
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_positions=seq)).eval()  # GPT-2 small shapes
    ids = torch.randint(0, base.config.vocab_size, (batch, seq))
    model = get_peft_model(base, adapter_config(method))
    trainable, _ = model.get_nb_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    step_times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocators and caches
            step_times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        file_bytes = (Path(tmp) / "adapter_model.safetensors").stat().st_size

    # merged inference vs the base model, interleaved so drift hits both alike
    model.eval()
    merged = model.merge_and_unload()
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config(n_positions=seq)).eval()
    infer_ids = ids[:2]
    base_times, merged_times = [], []
    with torch.no_grad():
        for _ in range(steps + 1):
            for net, times in ((reference, base_times), (merged, merged_times)):
                start = time.perf_counter()
                net(infer_ids)
                times.append(time.perf_counter() - start)
    return {
        "method": method,
        "trainable": trainable,
        "file_bytes": file_bytes,
        "step_s": statistics.median(step_times),
        "peak_mib": peak_mib,
        "infer_ratio": statistics.median(merged_times[1:]) / statistics.median(base_times[1:]),
    }


def run_cost(args) -> None:
    rows = []
    for method in COST_METHODS:
        cmd = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  measured {method}", file=sys.stderr)
    lora8 = next(r for r in rows if r["method"] == "lora_r8")["step_s"]
    print(f"\n## Cost: GPT-2 small shapes, batch {args.batch} × {args.seq}, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps\n")
    print("| method | trainable params | file bytes | bytes − 4·params | step s | step / LoRA r=8 | peak MiB | merged inference / base |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable']:,} | {r['file_bytes']:,} | {r['file_bytes'] - 4 * r['trainable']:,} | "
              f"{r['step_s']:.2f} | {r['step_s'] / lora8:.3f} | {r['peak_mib']:.0f} | {r['infer_ratio']:.3f} |")


def run_quality(args) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peft_ext import NolaConfig
    from peft_ext.embedded import encode_labelled, minilm_path, polarity_sentences

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    pairs = polarity_sentences()

    def encode(batch):
        return encode_labelled(tokenizer, batch)

    lora_r1_params = 6 * 2 * (384 + 384)  # 6 layers × (query, value) × r·(in + out)
    per_module = lora_r1_params // 2 // 12  # half of LoRA r=1, split over 12 modules into k + l
    configs = {
        "head only": None,
        "LoRA r=1": (LoraConfig(r=1, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]), 5e-3),
        "NOLA (½ LoRA r=1)": (NolaConfig(r=8, num_basis_A=per_module // 2, num_basis_B=per_module // 2, nola_alpha=8,
                                         target_modules=["query", "value"], modules_to_save=["classifier"]), 1e-2),
    }
    results = {name: [] for name in configs}
    params = {}
    for seed in range(args.seeds):
        split = random.Random(seed).sample(pairs, len(pairs))
        train, test = split[:160], split[160:]
        for name, spec in configs.items():
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
            if spec is None:
                for n, p in model.named_parameters():
                    p.requires_grad = n.startswith("classifier")
                adapter_lr = None
            else:
                model = get_peft_model(model, spec[0])
                adapter_lr = spec[1]
            head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
            adapter = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
            params[name] = sum(p.numel() for p in adapter)
            groups = [{"params": head, "lr": 2e-3}] + ([{"params": adapter, "lr": adapter_lr}] if adapter else [])
            optimizer = torch.optim.AdamW(groups)
            for epoch in range(args.epochs):
                model.train()
                order = random.Random(100 * seed + epoch).sample(train, len(train))
                for i in range(0, len(order), 16):
                    model(**encode(order[i:i + 16])).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
            model.eval()
            with torch.no_grad():
                out = model(**encode(test))
            accuracy = (out.logits.argmax(-1) == torch.tensor([y for _, y in test])).float().mean().item()
            results[name].append((out.loss.item(), accuracy))
            print(f"  seed {seed} {name}: loss {out.loss.item():.4f} acc {accuracy:.3f}", file=sys.stderr)
    print(f"\n## Quality at equal budget: all-MiniLM-L6-v2, Pang & Lee sentences, {args.epochs} epochs, "
          f"mean ± sd over {args.seeds} splits\n")
    print("| adapter | adapter params (head: 770 in all) | test loss | test accuracy |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        losses, accs = [r[0] for r in runs], [r[1] for r in runs]
        print(f"| {name} | {params[name]:,} | {statistics.mean(losses):.4f} ± {sd(losses):.4f} | "
              f"{statistics.mean(accs):.3f} ± {sd(accs):.3f} |")


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cost", "quality", "all"], default="all")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--worker", choices=COST_METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(cost_worker(args.worker, args.steps, args.batch, args.seq)))
        return
    import peft_ext  # noqa: F401  (registers NOLA in this process too)

    if args.part in ("cost", "all"):
        run_cost(args)
    if args.part in ("quality", "all"):
        run_quality(args)


if __name__ == "__main__":
    main()
