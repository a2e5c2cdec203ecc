"""The PeftType extension and peft/transformers registration in peft_ext.registry."""

import importlib
import pickle

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_ext
from peft_ext.registry import add_peft_type, register_peft_tuner


def test_nola_is_a_real_peft_type_member():
    member = PeftType.NOLA
    assert member is PeftType("NOLA") is PeftType["NOLA"]
    assert member.value == "NOLA" and member.name == "NOLA"
    assert member == "NOLA" and isinstance(member, str)
    assert member in list(PeftType)
    assert list(PeftType).count(member) == 1
    assert "NOLA" in PeftType.__members__
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is peft_ext.NolaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is peft_ext.NolaModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "nola_coef_"


def test_member_pickles_and_json_round_trips():
    assert pickle.loads(pickle.dumps(PeftType.NOLA)) is PeftType.NOLA
    config = peft_ext.NolaConfig(target_modules=["q"])
    assert pickle.loads(pickle.dumps(config)).peft_type is PeftType.NOLA
    restored = PeftConfig.from_peft_type(**config.to_dict())
    assert type(restored) is peft_ext.NolaConfig and restored.peft_type is PeftType.NOLA


def test_new_member_keeps_enum_invariants():
    before = list(PeftType)
    member = add_peft_type("PEFTEXT_TEST_ONLY")
    assert list(PeftType) == [*before, member]
    assert PeftType("PEFTEXT_TEST_ONLY") is member is PeftType.PEFTEXT_TEST_ONLY
    assert add_peft_type("PEFTEXT_TEST_ONLY") is member  # idempotent
    assert len(PeftType) == len(before) + 1
    with pytest.raises(AttributeError, match="reassign"):
        PeftType.PEFTEXT_TEST_ONLY = "x"


def test_add_peft_type_rejects_bad_names():
    with pytest.raises(ValueError, match="upper-case identifier"):
        add_peft_type("nola")
    with pytest.raises(ValueError, match="upper-case identifier"):
        add_peft_type("NO LA")


def test_registration_is_idempotent_on_reimport():
    import peft_ext.tuners.nola as nola_pkg

    size = len(PEFT_TYPE_TO_CONFIG_MAPPING)
    importlib.reload(importlib.import_module("peft_ext.tuners.nola"))
    importlib.reload(nola_pkg)
    assert len(PEFT_TYPE_TO_CONFIG_MAPPING) == size
    assert list(PeftType).count(PeftType.NOLA) == 1
    # registering the same classes again is a no-op
    register_peft_tuner("nola", nola_pkg.NolaConfig, nola_pkg.NolaModel, prefix="nola_coef_", card_template="nola")
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.NOLA] is nola_pkg.NolaConfig


def test_clash_with_another_method_raises():
    from peft import LoraConfig, LoraModel

    with pytest.raises(ValueError, match="peft already has a method of that name"):
        register_peft_tuner("nola", LoraConfig, LoraModel, prefix="nola_coef_", card_template="nola")
    with pytest.raises(ValueError, match="peft already has a method of that name"):
        register_peft_tuner("lora", peft_ext.NolaConfig, peft_ext.NolaModel, prefix="lora_", card_template="nola")
    with pytest.raises(ValueError, match="prefix 'lora_' is already used by LORA"):
        register_peft_tuner("peftext_prefix_clash", peft_ext.NolaConfig, peft_ext.NolaModel, prefix="lora_",
                            card_template="nola")


def test_get_peft_model_dispatches_to_nola(input_ids):
    from conftest import tiny_llama
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), peft_ext.NolaConfig(r=2, num_basis_A=8, num_basis_B=8))
    assert type(model.base_model) is peft_ext.NolaModel
    # LoRA's default targets for Llama are q_proj and v_proj
    assert sorted({n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "nola_coef_A")}) == ["q_proj", "v_proj"]
