"""Train a tiny Llama with NOLA through Trainer; run alone or under `accelerate launch` (see test_nola_ddp.py).

    python nola_ddp_train.py OUT_DIR PER_DEVICE_BATCH
Writes OUT_DIR/rank<i>.json (basis hash, losses) per process and OUT_DIR/coefficients.safetensors (rank 0).
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import peft_ext

out, per_device = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, use_cache=False)
model = get_peft_model(LlamaForCausalLM(config), peft_ext.NolaConfig(r=4, num_basis_A=96, num_basis_B=96))
# 8 distinct sequences, repeated: learnable in a few steps, so convergence is visible
ids = torch.randint(1, 100, (8, 16), generator=torch.Generator().manual_seed(1)).repeat(8, 1)
data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


class RecordLoss(TrainerCallback):
    losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=per_device, max_steps=8, learning_rate=0.2,
                         use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RecordLoss()])
trainer.train()

bases = [buf for name, buf in model.named_buffers() if "nola_basis" in name or "nola_A0" in name]
digest = hashlib.sha256(b"".join(b.cpu().numpy().tobytes() for b in bases)).hexdigest()
out.mkdir(parents=True, exist_ok=True)
rank = trainer.args.process_index
(out / f"rank{rank}.json").write_text(json.dumps({"basis_sha256": digest, "losses": RecordLoss.losses,
                                                   "world_size": trainer.args.world_size}))
if rank == 0:
    coefficients = {n: p.detach().contiguous() for n, p in model.named_parameters() if "nola_coef_" in n}
    save_file(coefficients, out / "coefficients.safetensors")
