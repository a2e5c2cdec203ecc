"""Train a tiny MoT for a few steps, alone or sharded with PyTorch FSDP2 (`fully_shard`) over gloo on CPU.

    python mot_fsdp_train.py OUT                                   # 1 process, no sharding: the reference
    torchrun --standalone --nproc_per_node 2 mot_fsdp_train.py OUT  # 2 processes, one FSDP unit per decoder layer

The wrap policy is the model's own `_no_split_modules` (one unit per `MoTDecoderLayer`), so the modality towers of
a layer are sharded, gathered and freed together. Both runs see the same global batch of 4 sequences (each of the
2 processes takes 2). Rank 0 writes OUT/weights.safetensors (full tensors) and OUT/report.json.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule, fully_shard

from peft_ext import MoTConfig, MoTForCausalLM

out = Path(sys.argv[1])
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

torch.manual_seed(0)
model = MoTForCausalLM(MoTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                                 num_modalities=2, modality_vocab_ranges=[[0, 50], [50, 100]], use_cache=False))
generator = torch.Generator().manual_seed(1)
input_ids = torch.randint(0, 100, (4, 16), generator=generator)

units = []
if distributed:
    layer_classes = tuple(type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules)
    units = [m for m in model.modules() if isinstance(m, layer_classes)]
    for unit in units:
        fully_shard(unit)
    fully_shard(model)  # the root unit: embeddings, final norm, head

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
rows = input_ids.chunk(world)[rank]
losses = []
for _ in range(3):
    loss = model(input_ids=rows, labels=rows).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())

state = {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().contiguous()
         for name, t in model.state_dict().items()}
if rank == 0:
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "weights.safetensors")
    # Which parameters each FSDP unit manages: a layer's towers must all be in that layer's unit.
    units_params = [sorted(n for n, _ in unit.named_parameters()) for unit in units]
    (out / "report.json").write_text(json.dumps({
        "world_size": world, "losses": losses, "units": [type(u).__name__ for u in units],
        "sharded": all(isinstance(u, FSDPModule) for u in units), "unit_parameters": units_params,
    }))
if distributed:
    dist.destroy_process_group()
