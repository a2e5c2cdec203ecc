"""Scale-out: every example Trainer script trains the same under 2 processes as under 1, on the same global batch.

Each case runs one example three or four ways on CPU and compares the trained weights it saved:
  - 1 process, per-device batch 4 (the reference);
  - `accelerate launch --multi_gpu --num_processes 2` (DDP over gloo), per-device batch 2;
  - the same under DeepSpeed ZeRO-2 and ZeRO-3 (`examples/configs/zero{2,3}.json`), where deepspeed is installed
    (`pip install --no-build-isolation deepspeed`).
Same seed, same data order, same global batch: the weights agree up to float32 reduction order.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# The example commands and the launcher are the scale-out benchmark's, so the two cannot drift apart.
scale_out = load_benchmark("scale_out")


def run(command: list[str], processes: int, engine: str | None = None) -> None:
    result = scale_out.launch(command, processes, engine)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("engine", scale_out.ENGINES)
@pytest.mark.parametrize("method", list(scale_out.EXAMPLE_CASES))
def test_two_processes_train_like_one(method, engine, tiny_llama_dir, tmp_path_factory):
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install --no-build-isolation deepspeed)")
    case = scale_out.EXAMPLE_CASES[method]
    base = tmp_path_factory.getbasetemp()
    reference, untrained = base / f"scale-out-{method}-one-process", base / f"scale-out-{method}-untrained"
    if not (reference / case.weights_file).exists():  # one reference per method, shared by the engines
        run(case.command(reference, 4, tiny_llama_dir), processes=1)
        # ... and the same run at learning rate 0, to show that training moved the weights far more than the
        # engines differ
        run(case.command(untrained, 4, tiny_llama_dir) + ["--learning_rate", "0"], processes=1)
    out = tmp_path_factory.mktemp(f"{method}-{engine}")
    run(case.command(out, 2, tiny_llama_dir), processes=2, engine=engine)

    expected, got = load_file(reference / case.weights_file), load_file(out / case.weights_file)
    start = load_file(untrained / case.weights_file)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    engine_diff = max((got[n] - expected[n]).abs().max().item() for n in expected)
    training_moved = max((expected[n] - start[n]).abs().max().item() for n in expected)
    assert training_moved > 100 * max(engine_diff, 1e-7)
    print(f"\n{method} {engine}: {len(expected)} tensors, max |2 processes - 1 process| {engine_diff:.2e}, "
          f"max |trained - initial| {training_moved:.2e}")


@pytest.mark.slow
def test_mot_fully_shard_per_decoder_layer_trains_like_one_process(tmp_path):
    """PyTorch FSDP2 on 2 CPU processes, one unit per `_no_split_modules` layer: every tower of a layer is in
    that layer's unit, and 3 steps give the weights of unsharded 1-process training on the same global batch."""
    script = str(ROOT / "tests" / "scripts" / "mot_fsdp_train.py")
    env = scale_out.launch_env()
    one = subprocess.run([sys.executable, script, str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", script, str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]

    one_losses = json.loads((tmp_path / "one" / "report.json").read_text())["losses"]
    assert one_losses[-1] < one_losses[0]  # the steps do train
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["world_size"] == 2 and report["sharded"]
    assert report["units"] == ["FSDPMoTDecoderLayer", "FSDPMoTDecoderLayer"]  # fully_shard renames the class
    for names in report["unit_parameters"]:
        for module in ("self_attn.q_proj", "self_attn.o_proj", "mlp", "input_layernorm"):
            towers = {name.split(".")[len(module.split("."))] for name in names if name.startswith(module + ".")}
            assert towers == {"0", "1"}, (module, names)

    expected = load_file(tmp_path / "one" / "weights.safetensors")
    got = load_file(tmp_path / "two" / "weights.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
