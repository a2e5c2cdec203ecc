"""examples/longmem_adapt.py runs end to end with Trainer on a tiny local backbone and saves a reloadable SideNet."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from peft_ext.models.longmem import LongMemForCausalLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a Trainer run in a subprocess: about a minute on a quiet 2-core machine
def test_longmem_adapt_script(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "examples" / "longmem_adapt.py"), "--backbone", str(tiny_llama_dir),
           "--segment_length", "32", "--memory_size", "256", "--topk_chunks", "4", "--eval_documents", "2",
           "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "2",
           "--learning_rate", "0.01", "--use_cpu", "--report_to", "none", "--save_strategy", "no"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with_memory, without_memory = map(float, re.search(r"with memory ([\d.]+), without memory ([\d.]+)",
                                                       result.stdout).groups())
    assert with_memory > 0 and without_memory > 0
    with safe_open(out / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and not any(n.startswith("backbone.") for n in names)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(reloaded, LongMemForCausalLM)
    backbone = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.backbone.parameters(), backbone.parameters()))
    assert AutoTokenizer.from_pretrained(out).vocab_size == AutoTokenizer.from_pretrained(tiny_llama_dir).vocab_size


def load_example():
    spec = importlib.util.spec_from_file_location("longmem_adapt", ROOT / "examples" / "longmem_adapt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while a class is built
    spec.loader.exec_module(module)
    return module


def test_longmem_adapt_reads_one_stream_per_row_and_refuses_settings_that_break_the_streams(tmp_path):
    example = load_example()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, use_cpu=True)
    streams, trainer_args = example.stream_training_arguments(args)
    # the rows are streams; each item of DocumentStreams is a whole batch, built on every process
    assert streams == 4 and trainer_args.per_device_train_batch_size == 1 and trainer_args.max_steps == 3
    assert trainer_args.accelerator_config.dispatch_batches is False
    with pytest.raises(ValueError, match="Set `--max_steps`: the document stream is endless"):
        example.stream_training_arguments(TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    split = TrainingArguments(output_dir=str(tmp_path), max_steps=3, use_cpu=True,
                              accelerator_config={"split_batches": True})
    with pytest.raises(ValueError, match="`split_batches=True` would split each process's batch of streams"):
        example.stream_training_arguments(split)
