"""The Trainer example scripts run end to end on tiny local models."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from peft_ext import MoTForCausalLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["nola", "lora"])
def test_nola_finetune_script(method, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "examples" / "nola_finetune.py"), "--model_name_or_path", str(tiny_llama_dir),
           "--method", method, "--r", "2", "--num_basis", "64", "--block_size", "32", "--output_dir", str(out),
           "--max_steps", "6", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
           "--learning_rate", "0.05", "--use_cpu", "--report_to", "none", "--save_strategy", "no"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = map(float, re.search(r"eval loss: ([\d.]+) -> ([\d.]+)", result.stdout).groups())
    assert after < before
    config = (out / "adapter_config.json").read_text()
    assert ('"peft_type": "NOLA"' in config) == (method == "nola")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out)
    assert any(("nola_coef_" if method == "nola" else "lora_") in n for n, _ in model.named_parameters())


def test_nola_finetune_rejects_unknown_method(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "nola_finetune.py"), "--method", "dora", "--output_dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "`method` must be 'nola' or 'lora', got 'dora'" in result.stderr


# ----------------------------------------------------------------------------------------------------------
# mot_pretrain.py
# ----------------------------------------------------------------------------------------------------------

MOT_SCRIPT = ROOT / "examples" / "mot_pretrain.py"


def tiny_pretrain_args(learning_rate: str = "3e-3") -> list[str]:
    return ["--hidden_size", "32", "--num_layers", "2", "--seq_len", "128", "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "32", "--learning_rate", learning_rate,
            "--use_cpu", "--report_to", "none", "--save_strategy", "no"]


def run_mot_pretrain(*args: str) -> subprocess.CompletedProcess:
    # One thread: a tiny model gains nothing from more, and loses a lot when other processes share the cores.
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(MOT_SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env)


def printed_val_losses(stdout: str) -> tuple[float, float]:
    match = re.search(r"val loss text ([\d.]+) image ([\d.]+)", stdout)
    assert match, stdout[-3000:]
    return float(match[1]), float(match[2])


@pytest.mark.parametrize("architecture, model_class", [("mot", MoTForCausalLM), ("dense", LlamaForCausalLM)])
def test_mot_pretrain_script(architecture, model_class, tmp_path):
    out = tmp_path / "out"
    result = run_mot_pretrain("--architecture", architecture, "--output_dir", str(out), *tiny_pretrain_args())
    assert result.returncode == 0, result.stderr[-3000:]
    text_loss, image_loss = printed_val_losses(result.stdout)
    # From scratch, 4 steps: finite, and already below the uniform guess over the 276 token ids.
    for loss in (text_loss, image_loss):
        assert 0 < loss < math.log(276)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is model_class
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    if architecture == "mot":
        assert model.config.modality_names == ["text", "image"]
        assert model.config.untie_attention and model.config.untie_ffn and model.config.untie_norms


def test_mot_pretrain_upcycles_a_saved_llama(tmp_path):
    """--from_dense: the upcycled MoT starts as the dense Llama (learning rate 0 keeps it there)."""
    from peft_ext.models.mot.corpus import InterleavedCorpus, build_interleaved_corpus

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=128,
                                         **InterleavedCorpus.config_kwargs())).eval()
    dense.save_pretrained(tmp_path / "dense")
    out = tmp_path / "out"
    result = run_mot_pretrain("--from_dense", str(tmp_path / "dense"), "--untie_ffn", "false",
                              "--output_dir", str(out), *tiny_pretrain_args(learning_rate="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "upcycled from" in result.stdout
    printed_val_losses(result.stdout)
    mot = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(mot) is MoTForCausalLM
    assert not mot.config.untie_ffn and mot.config.untie_attention
    ids = build_interleaved_corpus(seq_len=128).validation[:2]
    with torch.no_grad():
        torch.testing.assert_close(mot(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_mot_pretrain_rejects_bad_arguments(tmp_path):
    result = run_mot_pretrain("--architecture", "moe", "--output_dir", str(tmp_path))
    assert result.returncode != 0
    assert "`architecture` must be 'mot' or 'dense', got 'moe'" in result.stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"norm_placement": "post"}, "`norm_placement` must be one of ('pre', 'post_branch'), got 'post'"),
    ({"seq_len": 64}, "`seq_len` must be at least 80"),
    ({"hidden_size": 48, "num_attention_heads": 5}, "`num_attention_heads` must be a positive divisor of `hidden_size`"),
    ({"architecture": "dense", "from_dense": "some/llama"}, "`from_dense` upcycles a dense model into MoT"),
    ({"architecture": "dense", "untie_ffn": False}, "`untie_ffn` apply to `architecture` 'mot' only"),
    ({"architecture": "dense", "norm_placement": "post_branch"}, "needs `architecture` 'mot'"),
    ({"from_dense": "some/llama", "norm_placement": "post_branch"}, "`norm_placement` must be 'pre' with `from_dense`"),
], ids=["norm_placement", "seq_len", "heads", "dense_from_dense", "dense_untie", "dense_norm", "from_dense_norm"])
def test_mot_pretrain_argument_checks(kwargs, message, monkeypatch):
    """The checks of ScriptArguments, in process (the test above runs one through the command line)."""
    spec = importlib.util.spec_from_file_location("mot_pretrain", MOT_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mot_pretrain", script)  # dataclasses look their module up there
    spec.loader.exec_module(script)
    with pytest.raises(ValueError, match=re.escape(message)):
        script.ScriptArguments(**kwargs)
