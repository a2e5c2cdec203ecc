"""BatchNorm statistics of the global batch under data-parallel training, on CPU (gloo) as on GPU.

With data parallelism each process normalizes its share of the batch with that share's statistics: at 2 images
per process a detector's BatchNorms see noisy means and variances, in training and in the running statistics
that inference uses. Synchronized BatchNorm normalizes with the statistics of the whole (global) batch instead.
PyTorch's `nn.SyncBatchNorm` does so only for CUDA tensors: on CPU it raises "SyncBatchNorm expected input
tensor to be on GPU", so a CPU run over gloo needs `DistributedBatchNorm2d` below; `convert_sync_batch_norm`
picks torch's layer on CUDA (fused kernels) and this one elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Σ over the processes of `tensor`, differentiable: every process's loss depends on every process's
    input through the sum, so the input's gradient is the Σ over the processes of the sum's gradients.
    (`torch.distributed.nn.functional.all_reduce` does this but is deprecated, and the functional collectives
    that replace it have no gradient.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training statistics are those of the batch across all processes of
    `process_group`, with collectives that every backend runs (gloo included).

    In training, with x the local (N, C, H, W) share of each of the P processes (Ioffe & Szegedy, 2015, Alg. 1,
    over the global batch):

        n = Σ_p N_p·H·W,   μ = Σ_p Σ x / n,   σ² = Σ_p Σ (x − μ)² / n
        y = (x − μ) / sqrt(σ² + eps) · weight + bias
        running_mean ← (1 − m)·running_mean + m·μ,   running_var ← (1 − m)·running_var + m·σ²·n / (n − 1)

    with m the momentum (or 1 / num_batches_tracked when it is None), as `nn.BatchNorm2d` updates them: the
    running variance is the unbiased one. The variance is summed in a second pass around the global mean, not
    as E[x²] − μ², which cancels catastrophically in float32 when |μ| ≫ σ. The sums are all-reduced
    differentiably: the all-reduce's backward sums, over the processes, the gradients of their losses with
    respect to μ and σ², so each process's input gradient holds what every process's loss owes to the shared
    statistics, the gradient `nn.SyncBatchNorm` computes. With data parallelism averaging the parameter
    gradients, training is then that of one process on the global batch (for a loss that is a mean over it).

    Outside training, and in a single process, this is `nn.BatchNorm2d`. The state dict is the same, so a
    checkpoint loads into either.
    """

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _world_size(self) -> int:
        if not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self._world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        channels = input.shape[1]
        reduce_dims = (0, 2, 3)
        local_count = input.numel() // channels
        # one collective for the sums and the count
        sums = torch.cat((input.sum(reduce_dims, dtype=torch.float32), input.new_full((1,), local_count, dtype=torch.float32)))
        sums = _AllReduceSum.apply(sums, group)
        count = sums[channels].detach()
        mean = sums[:channels] / count
        centered = input - mean.to(input.dtype)[None, :, None, None]
        squares = centered.pow(2).sum(reduce_dims, dtype=torch.float32)
        var = _AllReduceSum.apply(squares, group) / count

        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)

        output = centered * torch.rsqrt(var + self.eps).to(input.dtype)[None, :, None, None]
        if self.affine:
            output = output * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return output


def convert_sync_batch_norm(
    module: nn.Module, device: torch.device | str | None = None, process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """`module` with every `nn.BatchNorm2d` normalizing over the global batch of data-parallel training.

    Where training runs on CUDA (`device`), this is `nn.SyncBatchNorm.convert_sync_batchnorm`; elsewhere each
    BatchNorm2d becomes a `DistributedBatchNorm2d` (torch's layer refuses CPU tensors). The new layers share
    the old ones' parameters and buffers and keep their train / eval mode. Call it before the model is wrapped
    for data parallelism (`Trainer` does that in `train()`).
    """
    if device is not None and torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, DistributedBatchNorm2d):
        converted = DistributedBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                           module.track_running_stats, process_group=process_group)
        # the new layer takes over the old one's tensors (and with them their device and dtype)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batch_norm(child, device, process_group))
    return module
