"""The Trainer example scripts run end to end on tiny local models."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from peft_ext.embedded import minilm_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_causal_lm_dir(tmp_path_factory):
    """A tiny Llama with a real (MiniLM's WordPiece) tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["nola", "lora"])
def test_nola_finetune_script(method, tiny_causal_lm_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "examples" / "nola_finetune.py"), "--model_name_or_path", str(tiny_causal_lm_dir),
           "--method", method, "--r", "2", "--num_basis", "64", "--block_size", "32", "--output_dir", str(out),
           "--max_steps", "4", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
           "--learning_rate", "0.01", "--use_cpu", "--report_to", "none", "--save_strategy", "no"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = map(float, re.search(r"eval loss: ([\d.]+) -> ([\d.]+)", result.stdout).groups())
    assert after < before
    config = (out / "adapter_config.json").read_text()
    assert ('"peft_type": "NOLA"' in config) == (method == "nola")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), out)
    assert any(("nola_coef_" if method == "nola" else "lora_") in n for n, _ in model.named_parameters())


def test_nola_finetune_rejects_unknown_method(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "nola_finetune.py"), "--method", "dora", "--output_dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "`method` must be 'nola' or 'lora', got 'dora'" in result.stderr
