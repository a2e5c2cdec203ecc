"""examples/mixda_two_stage.py runs both stages end to end on a tiny local BERT, and its outputs reload."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForMaskedLM

from peft_ext.embedded import minilm_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "mixda_two_stage.py"


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny BERT with MiniLM's WordPiece tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_two_stage_script(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--model_name_or_path", str(tiny_bert_dir), "--output_dir", str(out),
           "--layers", "0,2", "--bottleneck_size", "8", "--domain_steps", "3", "--max_length", "32",
           "--max_steps", "4", "--per_device_train_batch_size", "8", "--learning_rate", "0.01", "--use_cpu",
           "--report_to", "none", "--save_strategy", "no"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("news", "wiki"):
        assert re.search(rf"stage 1 {name}: loss [\d.]+ -> [\d.]+", result.stdout)
        assert '"stage": "domain"' in (out / "domains" / name / "adapter_config.json").read_text()
    assert re.search(r"stage 2 eval accuracy: [\d.]+ -> [\d.]+", result.stdout)
    task = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2),
                                     out / "task")
    assert task.peft_config["default"].domain_adapters == {"news": 8, "wiki": 8}
    # the task folder holds the stage-1 adapters bit for bit
    domain = PeftModel.from_pretrained(BertForMaskedLM.from_pretrained(tiny_bert_dir), out / "domains" / "news")
    saved = dict(domain.named_parameters())["base_model.model.bert.encoder.layer.2.output.dense.mixda_up.default.weight"]
    copied = dict(task.named_buffers())["base_model.model.bert.encoder.layer.2.output.dense.mixda_domains.default.news.up_weight"]
    assert torch.equal(saved, copied) and saved.abs().sum() > 0


def test_two_stage_script_rejects_unknown_domain(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--domains", "news,law", "--output_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "`domains` must be a comma-separated subset of ('news', 'wiki'), got 'news,law'" in result.stderr
