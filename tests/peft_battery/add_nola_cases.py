"""Add NOLA cases to peft's own generic battery, tests/test_custom_models.py of the peft sdist.

    python add_nola_cases.py BATTERY_DIR     (BATTERY_DIR/tests/test_custom_models.py is rewritten in place)

Idempotent: the pristine file is kept beside it as test_custom_models.py.orig.
"""
import os
import shutil
import sys
from pathlib import Path

here = Path(sys.argv[1]) / "tests"
if not (here / "test_custom_models.py.orig").exists():
    shutil.copy(here / "test_custom_models.py", here / "test_custom_models.py.orig")
src = (here / "test_custom_models.py.orig").read_text()

K = '"r": 4, "num_basis_A": 16, "num_basis_B": 16'

# 1) import peft_ext (registers PeftType.NOLA) right after the peft imports
anchor = "from .testing_common import ("
assert src.count(anchor) == 1
src = src.replace(anchor, "import peft_ext  # noqa: F401  registers PeftType.NOLA\nfrom peft_ext import NolaConfig\n\n" + anchor)

# 2) single-adapter cases, inserted before the TinyLoRA block
nola_cases = f'''    ########
    # NOLA #
    ########
    ("Vanilla MLP 1 NOLA", "MLP", NolaConfig, {{"target_modules": "lin0", {K}}}),
    ("Vanilla MLP 2 NOLA", "MLP", NolaConfig, {{"target_modules": ["lin0"], {K}}}),
    ("Vanilla MLP 3 NOLA", "MLP", NolaConfig, {{"target_modules": ["lin1"], {K}}}),
    ("Vanilla MLP 4 NOLA", "MLP", NolaConfig, {{"target_modules": ["lin0", "lin1"], {K}}}),
    ("Vanilla MLP 5 NOLA", "MLP", NolaConfig, {{"target_modules": ["lin0"], "modules_to_save": ["lin1"], {K}}}),
    ("Vanilla MLP 6 NOLA", "MLP", NolaConfig, {{"target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"], {K}}}),
    ("Vanilla MLP 7 NOLA", "MLP", NolaConfig, {{"target_modules": ["lin0"], "nola_alpha": 4, "nola_dropout": 0.1, {K}}}),
    ("Vanilla MLP 8 NOLA bias nola_only", "MLP", NolaConfig, {{"target_modules": ["lin0"], "bias": "nola_only", {K}}}),
    ("Vanilla MLP 9 NOLA bias all", "MLP", NolaConfig, {{"target_modules": ["lin0"], "bias": "all", {K}}}),
    ("Vanilla MLP 10 NOLA chunked", "MLP", NolaConfig, {{"target_modules": ["lin0", "lin1"], "basis_mode": "chunked", {K}}}),
    ("Vanilla MLP 11 NOLA cached", "MLP", NolaConfig, {{"target_modules": ["lin0", "lin1"], "basis_mode": "cached", {K}}}),
    ("Vanilla MLP 12 NOLA chunked >64 bases", "MLP", NolaConfig, {{"target_modules": ["lin0"], "basis_mode": "chunked", "r": 2, "num_basis_A": 70, "num_basis_B": 130}}),
    ("Vanilla MLP 13 NOLA exclude", "MLP", NolaConfig, {{"target_modules": ["lin0", "lin1"], "exclude_modules": ["lin1"], {K}}}),
    ("Embedding + transformers Conv1D 1 NOLA", "EmbConv1D", NolaConfig, {{"target_modules": ["conv1d"], {K}}}),
    ("Embedding + transformers Conv1D 2 NOLA", "EmbConv1D", NolaConfig, {{"target_modules": ["emb"], {K}}}),
    ("Embedding + transformers Conv1D 3 NOLA", "EmbConv1D", NolaConfig, {{"target_modules": ["emb", "conv1d"], {K}}}),
    ("Embedding + transformers Conv1D 4 NOLA chunked", "EmbConv1D", NolaConfig, {{"target_modules": ["emb", "conv1d"], "basis_mode": "chunked", {K}}}),
'''
anchor = "    ############\n    # TinyLoRA #\n"
assert src.count(anchor) == 1
src = src.replace(anchor, nola_cases + anchor)

# 3) multiple-active-adapter cases, inserted before the FRoD Same entry
multi = f'''    (
        "NOLA Same",
        "nola",
        NolaConfig,
        {{"target_modules": ["lin0"], "init_weights": False, {K}}},
        {{"target_modules": ["lin0"], "init_weights": False, {K}}},
    ),
    (
        "NOLA Different",
        "nola",
        NolaConfig,
        {{"target_modules": ["lin0"], "init_weights": False, {K}}},
        {{"target_modules": ["lin1"], "init_weights": False, {K}}},
    ),
    (
        "NOLA Same chunked",
        "nola",
        NolaConfig,
        {{"target_modules": ["lin0"], "init_weights": False, "basis_mode": "chunked", {K}}},
        {{"target_modules": ["lin0"], "init_weights": False, "basis_mode": "chunked", {K}}},
    ),
'''
anchor = '    (\n        "FRoD Same",\n'
assert src.count(anchor) == 1, src.count(anchor)
src = src.replace(anchor, multi + anchor)

# 4) optional comparison cases (LoRA / VeRA with trained biases), only with NOLA_BATTERY_COMPARE=1
if os.environ.get("NOLA_BATTERY_COMPARE") == "1":
    cmp_cases = '''    ("Vanilla MLP CMP LoRA bias lora_only", "MLP", LoraConfig, {"target_modules": ["lin0"], "bias": "lora_only"}),
    ("Vanilla MLP CMP LoRA bias all", "MLP", LoraConfig, {"target_modules": ["lin0"], "bias": "all"}),
    ("Vanilla MLP CMP VeRA bias vera_only", "MLP", VeraConfig, {"target_modules": ["lin0"], "bias": "vera_only"}),
    ("Vanilla MLP CMP VeRA bias all", "MLP", VeraConfig, {"target_modules": ["lin0"], "bias": "all"}),
'''
    src = src.replace(nola_cases, nola_cases + cmp_cases)

(here / "test_custom_models.py").write_text(src)
print("patched", here / "test_custom_models.py")
