"""Mixture-of-Transformers vs the dense model of the same active size, side by side in one run, on CPU.

Part 1, speed: train-step time (forward + backward + fused AdamW step, and forward + backward alone: the
optimizer step grows with MoT's K× parameters; gradients are zeroed in place, see `run_speed`), median of --steps
after one warm-up, of MoT with 2 and 3 modalities as a ratio to the dense Llama of the same shape (hidden 512,
seq 1024), at 1 and at 4 sequences per step (--batches); the models take turns step by step, so machine drift
hits every model alike, in an order flipped every step. For contrast, a naive MoT that runs every tower on
every token and keeps each token's own result. MoT runs its projections as Llama does, one matmul each (per
tower); the K=1 row, with no routing at all, shows the size of the machine's noise. Under each table, the floor
that any MoT running one matmul per modality pays on this machine before routing costs anything: the layers'
projection matmuls (forward and both backward products) on the tokens split by modality, timed against the same
matmuls on all tokens at once, plus the optimizer step and gradient zeroing on K× parameters (from the table's
run).

Part 2, quality: dense and MoT (2 modalities: text bytes of gensim's news and Wikipedia paragraphs and 8×8 digit
images, `peft_ext.models.mot.corpus`; the default 600 steps read 57% of the training blocks once, as the paper's
runs see their data once) trained on the same data, in the same order, for the same steps, at the same active
size; per-modality validation loss curves (PNG), and the fraction of dense's steps at which MoT first reaches
dense's final validation loss, per modality (the paper's anchor: 55.8% at 7B, Chameleon setting). The curves do
not depend on the device: `--quality-device cuda` gives the same experiment in seconds.

    python benchmarks/mot.py                 # both parts
    python benchmarks/mot.py --part speed    # or --part quality [--quality-steps 2000 --quality-device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peft_ext
from peft_ext.models.mot import modeling_mot
from peft_ext.models.mot.corpus import (
    InterleavedCorpus,
    build_interleaved_corpus,
    model_shape,
    validation_loss_by_modality,
)


class NaiveAllTowersRouter(modeling_mot.ModalityRouter):
    """The contrast: every tower computes on every token, then each token keeps its own tower's output (also the
    reference the routed model is tested against, tests/test_mot.py)."""

    def __init__(self, modality_ids, num_modalities):
        super().__init__(modality_ids, num_modalities)
        flat = modality_ids.reshape(-1)
        self.masks = [(flat == m).unsqueeze(-1) for m in range(num_modalities)]

    def dispatch(self, x):
        flat = x.reshape(self.num_tokens, *x.shape[len(self.batch_shape):])
        return [flat for _ in range(self.num_modalities)]

    def combine(self, blocks):
        out = torch.zeros_like(blocks[0])
        for mask, block in zip(self.masks, blocks):
            out = torch.where(mask.reshape(-1, *[1] * (block.dim() - 1)), block, out)
        return out.reshape(*self.batch_shape, *out.shape[1:])


def interleaved_modalities(batch: int, seq: int, num_modalities: int, generator: torch.Generator) -> torch.Tensor:
    """Spans like real interleaved data: text runs of 32-160 tokens, then a 66-token span of another modality."""
    ids = torch.zeros(batch, seq, dtype=torch.long)
    for row in range(batch):
        pos = 0
        while pos < seq:
            pos += int(torch.randint(32, 160, (1,), generator=generator))
            other = int(torch.randint(1, num_modalities, (1,), generator=generator)) if num_modalities > 1 else 0
            ids[row, pos:pos + 66] = other
            pos += 66
    return ids


def run_speed(args, batch: int) -> None:
    vocab = 1024
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, args.seq), generator=gen)
    dense_cfg = LlamaConfig(vocab_size=vocab, **model_shape(args.hidden, args.layers, args.hidden // 64, 4096))
    torch.manual_seed(0)
    dense = LlamaForCausalLM(dense_cfg)
    models = {"dense": (dense, None, modeling_mot.ModalityRouter)}
    for k in (1, 2, 3):
        mot = peft_ext.MoTForCausalLM.from_dense(dense, num_modalities=k)
        modality_ids = interleaved_modalities(batch, args.seq, k, gen)
        models[f"MoT K={k}"] = (mot, modality_ids, modeling_mot.ModalityRouter)
        if k > 1:
            models[f"naive all-towers K={k}"] = (mot, modality_ids, NaiveAllTowersRouter)
    # The fused AdamW kernel (one pass over each tensor) for every model: the optimizer step is the one part of
    # a train step that grows with MoT's K× parameters.
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                  for name, (model, _, _) in models.items()}
    times = {name: [] for name in models}
    fwd_bwd = {name: [] for name in models}
    names = list(models)
    for step in range(args.steps + 1):
        # The order flips every step: a model's time can depend on what ran just before it (caches, allocator).
        for name in names if step % 2 == 0 else names[::-1]:
            model, modality_ids, router = models[name]
            modeling_mot.ModalityRouter = router  # MoTModel.forward builds its router from this name
            extra = {} if modality_ids is None else {"modality_ids": modality_ids}
            start = time.perf_counter()
            model(input_ids=input_ids, labels=input_ids, **extra).loss.backward()
            backward_done = time.perf_counter()
            optimizers[name].step()
            # Zeroed in place, not freed: on CPU, glibc hands large freed blocks back to the OS, so reallocating
            # the K× gradient memory every step costs page faults that GPU caching allocators never pay.
            optimizers[name].zero_grad(set_to_none=False)
            if step:
                times[name].append(time.perf_counter() - start)
                fwd_bwd[name].append(backward_done - start)
    modeling_mot.ModalityRouter = models["dense"][2]
    dense_s = statistics.median(times["dense"])
    dense_fb = statistics.median(fwd_bwd["dense"])
    split_matmuls = projection_matmul_seconds(
        dense.model.layers[0], {k: models[f"MoT K={k}"][1] for k in (1, 2, 3)}, repeats=args.floor_repeats)
    print(f"\n## Speed: hidden {args.hidden}, {args.layers} layers, batch {batch} × seq {args.seq}, CPU, "
          f"{torch.get_num_threads()} threads, median of {args.steps} train steps\n")
    print("| model | non-embedding params | step s | step / dense | forward+backward / dense |")
    print("|---|---|---|---|---|")
    for name, (model, _, _) in models.items():
        params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
        s = statistics.median(times[name])
        fb = statistics.median(fwd_bwd[name])
        print(f"| {name} | {params / 1e6:.1f}M | {s:.2f} | {s / dense_s:.3f} | {fb / dense_fb:.3f} |")
    print("\n| floor (no routing cost) | projection matmuls split by modality / on all tokens | extra optimizer step "
          "and zeroing, ms | floor of step / dense |")
    print("|---|---|---|---|")
    dense_optimizer = dense_s - dense_fb
    for k in (2, 3):
        name = f"MoT K={k}"
        extra_matmul = args.layers * (split_matmuls[k] - split_matmuls[1])
        extra_optimizer = statistics.median(times[name]) - statistics.median(fwd_bwd[name]) - dense_optimizer
        print(f"| {name} | {split_matmuls[k] / split_matmuls[1]:.3f} | {1e3 * extra_optimizer:.0f} | "
              f"{1 + (extra_matmul + extra_optimizer) / dense_s:.3f} |")


def projection_matmul_seconds(layer: torch.nn.Module, modality_ids: dict[int, torch.Tensor], repeats: int) -> dict:
    """Median seconds of the projection matmuls of `layer` (Q, K, V, O, gate, up, down of a dense decoder layer),
    forward (x Wᵀ) and backward (g W, gᵀ x), with the rows split into one matmul per modality as `modality_ids[k]`
    splits them (k=1: all tokens in one matmul). The splits take turns, in an order flipped every repeat."""
    shapes = [(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    work = {}
    for k, ids in modality_ids.items():
        rows = [count for count in torch.bincount(ids.reshape(-1), minlength=k).tolist() if count]
        # One weight per modality, as MoT's towers have: K× the weights to read, like the model.
        work[k] = [([torch.randn(r, i) for r in rows], [torch.randn(o, i) for _ in rows],
                    [torch.randn(r, o) for r in rows]) for i, o in shapes]

    def run_split(k: int) -> None:
        for xs, weights, grads in work[k]:
            for x, weight, grad in zip(xs, weights, grads):
                x @ weight.t(), grad @ weight, grad.t() @ x

    seconds = {k: [] for k in work}
    for repeat in range(repeats + 1):
        for k in list(work) if repeat % 2 else list(work)[::-1]:
            start = time.perf_counter()
            run_split(k)
            if repeat:
                seconds[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in seconds.items()}


def run_quality(args) -> None:
    corpus = build_interleaved_corpus(seq_len=args.quality_seq, text_sources=tuple(args.quality_text))
    device = torch.device(args.quality_device)
    shape = model_shape(args.quality_hidden, args.quality_layers, args.quality_hidden // 64, 4096)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**shape, **InterleavedCorpus.config_kwargs()))
    torch.manual_seed(0)
    mot = peft_ext.MoTForCausalLM(peft_ext.MoTConfig(**shape, **InterleavedCorpus.config_kwargs(),
                                                     **InterleavedCorpus.mot_kwargs()))
    validation = corpus.validation[: args.quality_eval_blocks]
    epochs = args.quality_steps * args.quality_batch / len(corpus.train)
    order = torch.randperm(len(corpus.train), generator=torch.Generator().manual_seed(0))
    curves = {"dense": [], "MoT": []}
    for name, model in (("dense", dense), ("MoT", mot)):
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.quality_lr, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
        start = time.perf_counter()
        for step in range(1, args.quality_steps + 1):
            index = order[(step - 1) * args.quality_batch % len(order):][: args.quality_batch]
            ids = corpus.train[index].to(device)
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % args.quality_eval_every == 0:
                curves[name].append((step, validation_loss_by_modality(model, validation, args.quality_batch)))
        print(f"  trained {name} in {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\n## Quality: dense vs MoT, hidden {args.quality_hidden}, {args.quality_layers} layers, seq "
          f"{args.quality_seq}, batch {args.quality_batch}, {args.quality_steps} steps, same data and order\n")
    print(f"text: {' + '.join(args.quality_text)}; {len(corpus.train):,} training blocks of {args.quality_seq} tokens, "
          f"read {epochs:.2f} times; device {device}\n")
    print("| modality | dense final val loss | MoT final val loss | MoT reaches dense's final loss at | share of dense's steps |")
    print("|---|---|---|---|---|")
    for m, modality in enumerate(["text", "image"]):
        dense_final = curves["dense"][-1][1][m].item()
        reached = next((step for step, losses in curves["MoT"] if losses[m].item() <= dense_final), None)
        share = f"{reached / args.quality_steps:.1%}" if reached else "not reached"
        print(f"| {modality} | {dense_final:.4f} | {curves['MoT'][-1][1][m].item():.4f} | "
              f"{reached if reached else '-'} | {share} |")
    plot_curves(curves, Path(args.plot))
    print(f"\nper-modality validation curves: {args.plot}")


def plot_curves(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for m, (ax, modality) in enumerate(zip(axes, ["text", "image"])):
        for name, style in (("dense", "--"), ("MoT", "-")):
            ax.plot([s for s, _ in curves[name]], [losses[m].item() for _, losses in curves[name]], style, label=name)
        ax.set(title=f"{modality} validation loss", xlabel="step")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["speed", "quality", "all"], default="all")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4],
                        help="sequences per train step, one speed table each: MoT's extra cost is per parameter (K× "
                             "weights read, gradients and optimizer state), so its share falls as tokens per step grow")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--floor-repeats", type=int, default=15,
                        help="timings of one layer's projection matmuls per split, for the floor under each table")
    parser.add_argument("--quality-hidden", type=int, default=128)
    parser.add_argument("--quality-layers", type=int, default=4)
    parser.add_argument("--quality-seq", type=int, default=256)
    parser.add_argument("--quality-batch", type=int, default=16)
    parser.add_argument("--quality-steps", type=int, default=600)
    parser.add_argument("--quality-eval-every", type=int, default=50)
    parser.add_argument("--quality-eval-blocks", type=int, default=128)
    parser.add_argument("--quality-lr", type=float, default=3e-3)
    parser.add_argument("--quality-text", nargs="+", default=["news", "wikipedia"], choices=["news", "wikipedia"],
                        help="text sources of the corpus (both: under one pass over the data at the defaults)")
    parser.add_argument("--quality-device", default="cpu", help="e.g. cuda: the curves do not depend on it")
    parser.add_argument("--plot", default="benchmarks/mot_quality.png")
    args = parser.parse_args()
    if args.part in ("speed", "all"):
        for batch in args.batches:
            run_speed(args, batch)
    if args.part in ("quality", "all"):
        run_quality(args)


if __name__ == "__main__":
    main()
