"""examples/longmem_adapt.py runs end to end with Trainer on a tiny local backbone and saves a reloadable SideNet."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from peft_ext.embedded import minilm_path
from peft_ext.models.longmem import LongMemForCausalLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a Trainer run in a subprocess: about a minute on a quiet 2-core machine
def test_longmem_adapt_script(tmp_path):
    backbone_dir = tmp_path / "backbone"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None)
    backbone = LlamaForCausalLM(config)
    backbone.save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "examples" / "longmem_adapt.py"), "--backbone", str(backbone_dir),
           "--streams", "2", "--segment_length", "32", "--memory_size", "256", "--topk_chunks", "4",
           "--eval_documents", "2", "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "1",
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
    assert all(torch.equal(a, b) for a, b in zip(reloaded.backbone.parameters(), backbone.parameters()))


def test_longmem_adapt_refuses_batches_of_streams(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "longmem_adapt.py"), "--output_dir", str(tmp_path),
           "--per_device_train_batch_size", "4", "--max_steps", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Keep `--per_device_train_batch_size 1`" in result.stderr
