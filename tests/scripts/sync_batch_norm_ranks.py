"""DistributedBatchNorm2d on each process's share of a batch, for tests/test_scale_out.py (run with torchrun, gloo).

    torchrun --standalone --nproc_per_node 2 tests/scripts/sync_batch_norm_ranks.py OUT_DIR

Every process builds the same full batches (seeded) and keeps its rows: in the first step process 0 holds 3
images and process 1 one, in the second the reverse, so that a layer that weighted the processes' statistics
equally instead of by their counts would show. Each step's loss on a process is Σ y · w over its rows, w fixed
and random, so the sum of the processes' losses is the full batch's. Writes `rank<r>.safetensors`: each step's
output and input gradient (its rows), weight and bias gradients, and the running statistics after both steps.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from peft_ext.models.leyolo import DistributedBatchNorm2d

BATCH, CHANNELS, HEIGHT, WIDTH = 4, 3, 5, 6
SHARES = ((3, 1), (1, 3))  # images per process, per step


def full_batches():
    """The inputs (channel means far from 0, to exercise the variance's precision) and the loss weights."""
    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([100.0, -3.0, 0.5])[None, :, None, None]
    inputs = [torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH, generator=generator) * 2 + offsets for _ in SHARES]
    weights = [torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH, generator=generator) for _ in SHARES]
    affine = torch.randn(2, CHANNELS, generator=generator)
    return inputs, weights, affine


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs, weights, affine = full_batches()
    layer = DistributedBatchNorm2d(CHANNELS, momentum=0.1)
    with torch.no_grad():
        layer.weight.copy_(affine[0])
        layer.bias.copy_(affine[1])
    record = {}
    for step, (x, w, shares) in enumerate(zip(inputs, weights, SHARES)):
        start = sum(shares[:rank])
        rows = slice(start, start + shares[rank])
        x = x[rows].clone().requires_grad_()
        layer.zero_grad()
        output = layer(x)
        (output * w[rows]).sum().backward()
        record |= {f"output_{step}": output.detach(), f"input_grad_{step}": x.grad,
                   f"weight_grad_{step}": layer.weight.grad.clone(), f"bias_grad_{step}": layer.bias.grad.clone()}
    record |= {"running_mean": layer.running_mean, "running_var": layer.running_var,
               "num_batches_tracked": layer.num_batches_tracked}
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in record.items()}, out / f"rank{rank}.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
