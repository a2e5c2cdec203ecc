"""Train with examples/longmem_adapt.py's `Trainer` and record, per process, what its rows read and its banks hold.

    [accelerate launch ...] longmem_rank_banks.py <the example's arguments>   (see tests/test_longmem_scale_out.py)

Writes, in `--output_dir`, per process p:
  rank<p>.json         world size, memory layer, and per training step the real tokens of each row, its
                       `new_document` flag and the tokens its bank holds after the step (stored + pending);
  rank<p>.safetensors  each row's bank keys at the end of training, in the order they were written
                       (`bank_row<b>`: kv_heads × tokens × head_dim, pending tokens included), the SideNet weights
                       (`sidenet.<name>`) and the backbone weights (`backbone.<name>`), whole even under ZeRO-3.
"""

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "longmem_adapt.py"
spec = importlib.util.spec_from_file_location("longmem_adapt", EXAMPLE)
example = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = example  # dataclasses look their module up while a class is built
spec.loader.exec_module(example)


def bank_keys(bank, row: int) -> torch.Tensor:
    """(kv_heads, tokens, head_dim): the row's stored keys in writing order, then its pending ones."""
    if int(bank.evicted_tokens[row]):
        raise RuntimeError("The bank evicted tokens: give the test run a larger --memory_size.")
    stored = bank.keys[row][:, :int(bank.num_chunks[row])].flatten(1, 2)  # no eviction: the ring has not wrapped
    pending = bank.pending_keys[row]
    return stored if pending is None else torch.cat([stored, pending], dim=1)


def whole(parameters):
    """Gather ZeRO-3 partitioned parameters for reading; a no-op otherwise."""
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(parameters))


def main() -> None:
    args, training_args = HfArgumentParser((example.ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    trainer, _, _ = example.build_trainer(args, training_args)
    model = trainer.model
    steps = []

    def record_inputs(module, _, kwargs):
        if module.training:
            mask = kwargs["attention_mask"].bool()
            steps.append({"rows": [ids[m].tolist() for ids, m in zip(kwargs["input_ids"], mask)],
                          "new_document": kwargs["new_document"].tolist()})

    def record_bank(module, *_):
        if module.training:
            bank = module.memory
            steps[-1]["bank_tokens"] = [bank_keys(bank, b).shape[1] for b in range(bank.num_streams)]

    model.register_forward_pre_hook(record_inputs, with_kwargs=True)
    model.register_forward_hook(record_bank)

    class FinalState(TrainerCallback):
        tensors: dict[str, torch.Tensor] = {}

        def on_train_end(self, *_, **__):
            bank = model.memory
            self.tensors.update({f"bank_row{b}": bank_keys(bank, b) for b in range(bank.num_streams)})
            for prefix, module in (("sidenet.", model.sidenet), ("sidenet_norm.", model.sidenet_norm),
                                   ("backbone.", model.backbone)):
                with whole(module.parameters()):
                    self.tensors.update({prefix + n: p.detach().clone() for n, p in module.named_parameters()})

    trainer.add_callback(FinalState())
    trainer.train()

    out, rank = Path(trainer.args.output_dir), trainer.args.process_index
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": trainer.args.world_size,
                                                      "memory_layer": model.config.memory_layer, "steps": steps}))
    save_file({k: v.contiguous() for k, v in FinalState.tensors.items()}, out / f"rank{rank}.safetensors")


if __name__ == "__main__":
    main()
