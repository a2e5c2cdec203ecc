"""Out-of-tree registration of peft-ext's methods with peft and transformers.

This is the one place where peft-ext touches the two libraries' registries:

* PEFT tuner types. peft's own `register_peft_method` only accepts a name that already is a
  member of the `PeftType` str-enum, and a plugin cannot declare enum members after the class
  is created. `add_peft_type` adds the member the way `enum` itself does when it builds a class
  (the name map, the value map, the ordered member names and the class attribute), so that
  `PeftType("NOLA")`, `PeftType.NOLA`, `list(PeftType)`, pickling and `.value` all behave like
  a built-in member; `register_peft_tuner` then calls peft's `register_peft_method`.
* transformers Auto classes (`AutoConfig`, `AutoModel*`, `AutoImageProcessor`) for our
  architectures, through their public `register` methods.
* Model cards: `PeftModel.save_pretrained` writes peft's generic card and `push_to_hub` a generic
  transformers one; for an adapter of one of our tuner types, both write the card rendered from our
  template instead (see `peft_ext.hub`).

Every function is idempotent (importing `peft_ext` twice, or reloading a module, is a no-op)
and raises when a *different* method already holds the name.
"""

from __future__ import annotations

import enum

from peft.utils import PeftType, register_peft_method

# peft type name -> hub_cards template name, for the tuners registered here.
PEFT_TYPE_TO_CARD: dict[str, str] = {}


def _qualified_name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def add_peft_type(name: str) -> PeftType:
    """Add `name` (upper case, e.g. "NOLA") as a member of peft's `PeftType` enum and return it.

    Returns the existing member when the name is already there.
    """
    if not name.isidentifier() or name.upper() != name:
        raise ValueError(f"`name` must be an upper-case identifier such as 'NOLA', got {name!r}.")
    if name in PeftType.__members__:
        return PeftType[name]
    if name in PeftType._value2member_map_:
        raise ValueError(f"The value {name!r} already belongs to PeftType.{PeftType(name).name}.")

    # Build the member the way EnumType.__new__ does for a str mixin: the str value is the
    # object itself, and enum's bookkeeping attributes are set on it.
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    member.__init__(name)
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13 has one helper for all tables
        PeftType._add_member_(name, member)
    else:
        PeftType._member_map_[name] = member
        PeftType._member_names_.append(name)
        type.__setattr__(PeftType, name, member)
    PeftType._value2member_map_[name] = member
    return member


def register_peft_tuner(
    name: str, config_cls: type, model_cls: type, prefix: str, card_template: str
) -> PeftType:
    """Register a tuner (e.g. name="nola") with peft so `get_peft_model` and
    `PeftModel.from_pretrained` handle it like a built-in method.

    Idempotent for the same classes; a different method already registered under `name` or
    `prefix` raises a `ValueError` that names it.
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    peft_type = add_peft_type(name.upper())
    existing_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if existing_config is not None:
        existing_model = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
        same = _qualified_name(existing_config) == _qualified_name(config_cls) and (
            existing_model is not None and _qualified_name(existing_model) == _qualified_name(model_cls)
        )
        if not same:
            raise ValueError(
                f"Cannot register PEFT method {name!r}: peft already has a method of that name "
                f"({_qualified_name(existing_config)}). Choose another name."
            )
        # A reload of the same module: point peft at the fresh classes.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    else:
        holder = next((t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix), None)
        if holder is not None:
            raise ValueError(
                f"Cannot register PEFT method {name!r}: the parameter prefix {prefix!r} is already "
                f"used by {holder.value}. Choose another prefix."
            )
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    PEFT_TYPE_TO_CARD[peft_type.value] = card_template
    _install_peft_card_hooks()
    return peft_type


def register_auto_classes(
    model_type: str,
    config_cls: type,
    model_classes: dict[str, type] | None = None,
    image_processor_cls: type | None = None,
) -> None:
    """Register a transformers architecture with the Auto classes.

    `model_classes` maps an Auto class name (e.g. "AutoModelForCausalLM") to our model class.
    Idempotent for the same classes; a different architecture already registered under
    `model_type` raises a `ValueError`.
    """
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        existing = CONFIG_MAPPING[model_type]
        if _qualified_name(existing) != _qualified_name(config_cls):
            raise ValueError(
                f"Cannot register model_type {model_type!r}: transformers already maps it to "
                f"{_qualified_name(existing)}."
            )
    else:
        AutoConfig.register(model_type, config_cls)
    for auto_name, model_cls in (model_classes or {}).items():
        auto_cls = getattr(transformers, auto_name, None)
        if auto_cls is None:
            raise ValueError(f"Unknown Auto class {auto_name!r} for model_type {model_type!r}.")
        auto_cls.register(config_cls, model_cls, exist_ok=True)
        # pipelines check support against the Auto class's name table, which `register` leaves alone.
        names = getattr(getattr(auto_cls, "_model_mapping", None), "_model_mapping", None)
        if isinstance(names, dict):
            names.setdefault(model_type, model_cls.__name__)
    if image_processor_cls is not None:
        # Our processors work on torch tensors and PIL images without torchvision: the "pil" backend, the one
        # transformers picks where torchvision is not installed.
        transformers.AutoImageProcessor.register(
            config_cls, image_processor_classes={"pil": image_processor_cls}, exist_ok=True
        )


def _our_card_template(peft_model) -> str | None:
    for config in peft_model.peft_config.values():
        peft_type = config.peft_type.value if isinstance(config.peft_type, enum.Enum) else config.peft_type
        if peft_type in PEFT_TYPE_TO_CARD:
            return PEFT_TYPE_TO_CARD[peft_type]
    return None


def _install_peft_card_hooks() -> None:
    """Make `PeftModel.save_pretrained` and `push_to_hub` write our card for our tuner types.

    `save_pretrained` asks `create_or_update_model_card` for the card; transformers' `push_to_hub`
    (which PeftModel inherits) then overwrites it with the remote or a generic card, so for our tuners
    the saved folder is uploaded as it is. Other tuner types keep peft's behaviour.
    """
    from peft import PeftModel

    if getattr(PeftModel.create_or_update_model_card, "_peft_ext_hook", False):
        return
    original_card = PeftModel.create_or_update_model_card
    original_push = PeftModel.push_to_hub

    def create_or_update_model_card(self, output_dir: str):
        from peft_ext.hub import write_peft_model_card

        template = _our_card_template(self)
        if template is None:
            return original_card(self, output_dir)
        return write_peft_model_card(self, output_dir, template)

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        from peft_ext.hub import push_folder_to_hub

        if _our_card_template(self) is None or args:
            return original_push(self, repo_id, *args, **kwargs)
        return push_folder_to_hub(self.save_pretrained, repo_id, **kwargs)

    create_or_update_model_card._peft_ext_hook = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.push_to_hub = push_to_hub
