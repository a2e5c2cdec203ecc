"""NOLA under 2-process data parallel (accelerate launch, gloo on CPU) equals 1-process training."""

import json
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "nola_ddp_train.py"
scale_out = load_benchmark("scale_out")


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    # The launcher of the scale-out benchmark and tests: plain python for 1 process, accelerate launch for 2.
    single = scale_out.launch([str(SCRIPT), str(tmp_path / "one"), "8"], processes=1)
    assert single.returncode == 0, single.stderr[-3000:]
    double = scale_out.launch([str(SCRIPT), str(tmp_path / "two"), "4"], processes=2)
    assert double.returncode == 0, double.stderr[-3000:]

    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # the bases are identical on both ranks, and equal to the single process's
    assert ranks[0]["basis_sha256"] == ranks[1]["basis_sha256"] == one["basis_sha256"]
    # same global batch (8), same data order: same losses and same coefficients
    assert len(one["losses"]) == len(ranks[0]["losses"]) == 8
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(one["losses"]), atol=1e-4, rtol=1e-4)
    assert one["losses"][-1] < one["losses"][0]
    coef_one = load_file(tmp_path / "one" / "coefficients.safetensors")
    coef_two = load_file(tmp_path / "two" / "coefficients.safetensors")
    assert coef_one.keys() == coef_two.keys()
    for name in coef_one:
        torch.testing.assert_close(coef_two[name], coef_one[name], atol=1e-4, rtol=1e-3, msg=name)
    max_diff = max((coef_two[n] - coef_one[n]).abs().max().item() for n in coef_one)
    print(f"\n1 process losses {one['losses'][0]:.4f} -> {one['losses'][-1]:.4f}; 2 processes "
          f"{ranks[0]['losses'][0]:.4f} -> {ranks[0]['losses'][-1]:.4f}; max |Δcoefficient| {max_diff:.2e}")
