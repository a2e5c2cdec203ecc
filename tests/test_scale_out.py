"""Scale-out: every example Trainer script trains the same under 2 processes as under 1, on the same global batch.

Each case runs one example three or four ways on CPU and compares the trained weights it saved:
  - 1 process, per-device batch 4 (the reference);
  - `accelerate launch --multi_gpu --num_processes 2` (DDP over gloo), per-device batch 2;
  - the same under DeepSpeed ZeRO-2 and ZeRO-3 (`examples/configs/zero{2,3}.json`), where deepspeed is installed
    (`pip install --no-build-isolation deepspeed`).
Same seed, same data order, same global batch: the weights agree up to float32 reduction order, and so does the
training loss `Trainer` reports.

MixDA trains stage 2 on stage-1 adapters saved beforehand; its domain adapters must come out bit for bit as they
went in, and DDP must synchronize only the gate, the task adapter and the head. LeYOLO trains with synchronized
BatchNorm (`--sync_batch_norm`); its loss is normalized per process, so its 1-process reference averages the
losses of the processes' shares (tests/scripts/leyolo_loss_per_process.py) while its BatchNorms see the whole
batch, and a control shows that per-process BatchNorm does not give the same weights.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark
from safetensors.torch import load_file

from peft_ext.models.leyolo import DistributedBatchNorm2d, convert_sync_batch_norm

ROOT = Path(__file__).resolve().parents[1]
# The example commands and the launcher are the scale-out benchmark's, so the two cannot drift apart.
scale_out = load_benchmark("scale_out")


# Where the 1-process reference is not the example itself (see the module docstring): a launcher that runs it
ONE_PROCESS_REFERENCE = {"leyolo": [str(ROOT / "tests" / "scripts" / "leyolo_loss_per_process.py"), "2"]}
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
# Trainer's final `train_loss` averages the processes' losses only at logging steps: the steps after the last
# log count the main process's loss alone. Logging every step makes it the global batch's on any engine.
LOG_EVERY_STEP = ["--logging_steps", "1"]


def run(command: list[str], processes: int, engine: str | None = None) -> subprocess.CompletedProcess:
    result = scale_out.launch(command, processes, engine)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_script(script: str, *args: str, processes: int = 1) -> None:
    """A test script on 1 process (plain python) or on `processes` under torchrun (plain torch.distributed)."""
    if processes == 1:
        command = [sys.executable, script, *args]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        command = [torchrun, "--standalone", "--nproc_per_node", str(processes), script, *args]
    result = subprocess.run(command, env=scale_out.launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="session")
def example_folders(tiny_llama_dir, tmp_path_factory):
    """case -> the local folders its arguments name, each built once per session."""
    built = {"tiny_llama": tiny_llama_dir}
    root = tmp_path_factory.mktemp("example-folders")
    return lambda case: scale_out.build_folders(case.folders, root, built)


def one_process_reference(method: str, example_folders, tmp_path_factory) -> tuple[Path, Path, float]:
    """The folders of the 1-process run at per-device batch 4 and of the same run at learning rate 0 (to show that
    training moved the weights far more than the engines differ), and the former's training loss; once per
    method, shared by the engines."""
    case = scale_out.EXAMPLE_CASES[method]
    base = tmp_path_factory.getbasetemp()
    reference, untrained = base / f"scale-out-{method}-one-process", base / f"scale-out-{method}-untrained"
    loss_file = reference / "train_loss.txt"
    if not loss_file.exists():
        launcher = ONE_PROCESS_REFERENCE.get(method)

        def run_one_process(out: Path, *extra: str) -> subprocess.CompletedProcess:
            command = case.command(out, 4, example_folders(case)) + list(extra)
            return run(command if launcher is None else [*launcher, *command[1:]], processes=1)

        run_one_process(untrained, "--learning_rate", "0")
        loss_file.write_text(str(scale_out.trainer_metric(run_one_process(reference, *LOG_EVERY_STEP), "train_loss")))
    return reference, untrained, float(loss_file.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("engine", scale_out.ENGINES)
@pytest.mark.parametrize("method", list(scale_out.EXAMPLE_CASES))
def test_two_processes_train_like_one(method, engine, example_folders, tmp_path_factory):
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install --no-build-isolation deepspeed)")
    case = scale_out.EXAMPLE_CASES[method]
    reference, untrained, reference_loss = one_process_reference(method, example_folders, tmp_path_factory)
    out = tmp_path_factory.mktemp(f"{method}-{engine}")
    result = run(case.command(out, 2, example_folders(case)) + LOG_EVERY_STEP, processes=2, engine=engine)

    expected, got = load_file(reference / case.weights_file), load_file(out / case.weights_file)
    start = load_file(untrained / case.weights_file)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
    engine_diff = max((got[n] - expected[n]).abs().max().item() for n in expected)
    training_moved = max((expected[n] - start[n]).abs().max().item() for n in expected)
    assert training_moved > 100 * max(engine_diff, 1e-7)
    # Trainer prints 4 significant digits; a loss scaled by the number of processes would be far off
    assert scale_out.trainer_metric(result, "train_loss") == pytest.approx(reference_loss, rel=1e-3)
    if method == "mixda":
        assert_domain_adapters_unchanged(got, example_folders(case)["mixda_domains"])
    print(f"\n{method} {engine}: {len(expected)} tensors, max |2 processes - 1 process| {engine_diff:.2e}, "
          f"max |trained - initial| {training_moved:.2e}")


def assert_domain_adapters_unchanged(task_weights: dict, domains: Path) -> None:
    """The frozen stage-1 adapters in a trained MixDA task file are bit for bit those stage 1 saved."""
    pattern = re.compile(r"(.*)\.mixda_domains\.default\.(\w+)\.(down|up)_(weight|bias)$")
    stage_one = {domain: load_file(domains / domain / "adapter_model.safetensors") for domain in ("news", "wiki")}
    compared = 0
    for name, tensor in task_weights.items():
        if match := pattern.match(name):
            prefix, domain, projection, kind = match.groups()
            saved = stage_one[domain][f"{prefix}.mixda_{projection}.{kind}"]
            assert torch.equal(tensor, saved) and saved.abs().sum() > 0, name
            compared += 1
    assert compared == 2 * 2 * 4  # 2 layers x 2 domains x (down, up) x (weight, bias)


@pytest.mark.slow
def test_mixda_ddp_synchronizes_only_gate_task_adapter_and_head(example_folders, tmp_path):
    """Stage 2 under 2-process DDP: the wrapper's synchronized parameters are the gate, its scale, the task
    adapter and the head, at each adapted layer; the domain adapters are buffers, not parameters at all."""
    case = scale_out.EXAMPLE_CASES["mixda"]
    command = case.command(tmp_path, 2, example_folders(case))
    run([str(ROOT / "tests" / "scripts" / "mixda_wrapped_parameters.py"), *command[1:]], processes=2)
    report = json.loads((tmp_path / "wrapped.json").read_text())
    assert report["wrapper"] == "DistributedDataParallel"
    trainable = re.compile(r"base_model\.model\.(bert\.encoder\.layer\.[02]\.output\.dense\.mixda_(gate|gate_scale|"
                           r"task_down|task_up)|classifier\.modules_to_save)\.default(\.weight|\.bias)?$")
    assert all(trainable.match(name) for name in report["synchronized"]), report["synchronized"]
    # per adapted layer: the gate's weight and bias, its scale, the task adapter's 2 weights and 2 biases
    per_layer = {re.sub(r"layer\.\d", "layer.N", name) for name in report["synchronized"] if ".layer." in name}
    assert len(per_layer) == 7 and len(report["synchronized"]) == 2 * 7 + 2
    assert not [name for name in report["parameters"] if "mixda_domains" in name]
    assert len([name for name in report["buffers"] if ".mixda_domains." in name]) == 2 * 2 * 4


@pytest.mark.slow
def test_leyolo_per_process_batch_norm_trains_differently(example_folders, tmp_path_factory):
    """The control for LeYOLO's sync-BatchNorm case: without `--sync_batch_norm` each process normalizes its 2
    images with their own statistics, and the running statistics and weights leave the 1-process reference."""
    case = scale_out.EXAMPLE_CASES["leyolo"]
    reference, _, _ = one_process_reference("leyolo", example_folders, tmp_path_factory)
    out = tmp_path_factory.mktemp("leyolo-per-process-bn")
    run(case.command(out, 2, example_folders(case)) + ["--sync_batch_norm", "False"], processes=2)
    expected, got = load_file(reference / case.weights_file), load_file(out / case.weights_file)
    differ = {kind: max((got[n] - expected[n]).abs().max().item() for n in expected if ("running" in n) == (kind == "stats"))
              for kind in ("stats", "weights")}  # fmt: skip
    print(f"\nleyolo ddp without sync BN: max |2 processes - 1 process| running stats {differ['stats']:.2e}, "
          f"weights {differ['weights']:.2e}")
    assert differ["stats"] > 100 * TOLERANCE["atol"] and differ["weights"] > 10 * TOLERANCE["atol"]


@pytest.mark.slow
def test_distributed_batch_norm_on_two_gloo_processes_is_batch_norm_on_the_full_batch(tmp_path):
    """DistributedBatchNorm2d on 2 CPU processes holding 3 + 1 then 1 + 3 images of a batch equals nn.BatchNorm2d
    on the whole batch: outputs, input gradients, summed weight and bias gradients, running statistics."""
    spec = importlib.util.spec_from_file_location("sync_batch_norm_ranks", ROOT / "tests" / "scripts" / "sync_batch_norm_ranks.py")
    ranks_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ranks_script)
    run_script(str(ROOT / "tests" / "scripts" / "sync_batch_norm_ranks.py"), str(tmp_path), processes=2)
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    inputs, weights, affine = ranks_script.full_batches()
    reference = torch.nn.BatchNorm2d(ranks_script.CHANNELS, momentum=0.1)
    with torch.no_grad():
        reference.weight.copy_(affine[0])
        reference.bias.copy_(affine[1])
    for step, (x, w) in enumerate(zip(inputs, weights)):
        x = x.clone().requires_grad_()
        reference.zero_grad()
        output = reference(x)
        (output * w).sum().backward()
        torch.testing.assert_close(torch.cat([r[f"output_{step}"] for r in ranks]), output, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([r[f"input_grad_{step}"] for r in ranks]), x.grad, rtol=1e-5, atol=1e-5)
        for name, parameter in (("weight", reference.weight), ("bias", reference.bias)):
            torch.testing.assert_close(sum(r[f"{name}_grad_{step}"] for r in ranks), parameter.grad, rtol=1e-5, atol=1e-5)
    for rank in ranks:
        torch.testing.assert_close(rank["running_mean"], reference.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["running_var"], reference.running_var, rtol=1e-5, atol=1e-5)
        assert rank["num_batches_tracked"].item() == 2


def test_distributed_batch_norm_is_batch_norm_in_one_process():
    """Without a process group (and in eval mode) the layer is nn.BatchNorm2d: same outputs and statistics."""
    torch.manual_seed(0)
    plain, distributed = torch.nn.BatchNorm2d(3, momentum=None), DistributedBatchNorm2d(3, momentum=None)
    for _ in range(2):
        x = torch.randn(4, 3, 5, 5) * 3 + 7
        torch.testing.assert_close(distributed(x), plain(x))
    torch.testing.assert_close(distributed.running_var, plain.running_var)
    distributed.eval(), plain.eval()
    torch.testing.assert_close(distributed(x), plain(x))


def test_convert_sync_batch_norm_swaps_every_batch_norm_and_keeps_the_weights():
    from peft_ext.models.leyolo import LeYoloConfig, LeYoloForObjectDetection

    model = LeYoloForObjectDetection(LeYoloConfig.from_variant("nano")).eval()
    pixels = torch.rand(1, 3, 64, 64)
    before, state = model(pixels).logits, model.state_dict()
    norms = [name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
    converted = convert_sync_batch_norm(model, "cpu")
    assert [n for n, m in converted.named_modules() if type(m) is DistributedBatchNorm2d] == norms
    assert converted.state_dict().keys() == state.keys()
    # the same tensors, not copies
    assert all(converted.state_dict()[name].data_ptr() == tensor.data_ptr() for name, tensor in state.items())
    torch.testing.assert_close(converted(pixels).logits, before, rtol=0, atol=0)
    assert not converted.training
    on_cuda = convert_sync_batch_norm(LeYoloForObjectDetection(LeYoloConfig.from_variant("nano")), "cuda")
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in on_cuda.modules()) == len(norms)


@pytest.mark.slow
def test_mot_fully_shard_per_decoder_layer_trains_like_one_process(tmp_path):
    """PyTorch FSDP2 on 2 CPU processes, one unit per `_no_split_modules` layer: every tower of a layer is in
    that layer's unit, and 3 steps give the weights of unsharded 1-process training on the same global batch."""
    script = str(ROOT / "tests" / "scripts" / "mot_fsdp_train.py")
    run_script(script, str(tmp_path / "one"))
    run_script(script, str(tmp_path / "two"), processes=2)

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
