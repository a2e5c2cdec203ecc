"""Convert an official LeYOLO checkpoint (Ultralytics 8.1 format) to a `LeYoloForObjectDetection` folder.

    python -m peft_ext.models.leyolo.convert_leyolo_original_to_hf --checkpoint LeYOLONano.pt --output leyolo-nano

The official `.pt` files are torch zip pickles of Ultralytics classes. Unpickling them with `torch.load` would
import and run Ultralytics code (and `weights_only=True` rejects them), so `load_original_state_dict` reads them
with a restricted unpickler: the only real objects it builds are tensors (its own tensor rebuild over the
archive's raw storages), `OrderedDict`, `set` and `torch.Size`; every other class, `torch.nn` ones included,
becomes an inert stub that only records the state it is given. No foreign code runs. The stubs' `_modules`,
`_parameters` and `_buffers` are then walked to recover the state dict, which is cast from the stored fp16 to
float32 and renamed to this implementation's module names.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import zipfile
from pathlib import Path

import torch

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "BoolStorage": torch.bool,
    "ByteStorage": torch.uint8,
}


class _InertStub:
    """Stands in for any class the unpickler does not trust: accepts any construction and only stores state."""

    def __init__(self, *args, **kwargs):
        self._stub_args = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._stub_state = state


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("A tensor's storage must be one of the archive's raw data files.")
    return torch.as_strided(storage, tuple(size), tuple(stride), storage_offset).clone()


def _rebuild_parameter(data, *unused_args):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    _TRUSTED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): tuple,
        ("builtins", "set"): set,
    }

    def __init__(self, file, archive: zipfile.ZipFile, data_prefix: str):
        super().__init__(file)
        self._archive = archive
        self._data_prefix = data_prefix
        self._storages: dict[str, torch.Tensor] = {}
        self._stub_classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in self._TRUSTED:
            return self._TRUSTED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        # One stub class per foreign name, so that stubs keep a readable type name in error messages.
        key = (module, name)
        if key not in self._stub_classes:
            self._stub_classes[key] = type(name, (_InertStub,), {"__module__": f"stub:{module}"})
        return self._stub_classes[key]

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"Unsupported persistent id {pid!r} in the checkpoint.")
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._data_prefix}{key}"))
            self._storages[key] = torch.frombuffer(raw, dtype=dtype)[:numel] if numel else torch.empty(0, dtype=dtype)
        return self._storages[key]


def load_original_checkpoint(path: str | Path) -> dict:
    """Unpickle an Ultralytics checkpoint without running any of its code (see the module docstring)."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path} is not a torch zip checkpoint (found {len(pickles)} data.pkl entries).")
        prefix = pickles[0][: -len("data.pkl")] + "data/"
        with archive.open(pickles[0]) as handle:
            checkpoint = _RestrictedUnpickler(handle, archive, prefix).load()
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path} has no 'model' entry: not an Ultralytics checkpoint.")
    return checkpoint


def _module_tensors(module, prefix: str = ""):
    for table in ("_parameters", "_buffers"):
        for name, tensor in (getattr(module, table, None) or {}).items():
            if isinstance(tensor, torch.Tensor):
                yield prefix + name, tensor
    for name, child in (getattr(module, "_modules", None) or {}).items():
        if child is not None:
            yield from _module_tensors(child, f"{prefix}{name}.")


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The official state dict (Ultralytics names), cast to float32 (floating tensors only)."""
    checkpoint = load_original_checkpoint(path)
    model = checkpoint.get("ema") or checkpoint["model"]
    return {
        name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in _module_tensors(model)
    }


def _official_name_map(model) -> dict[str, str]:
    """Our module path for each official module path prefix, derived from the model's own structure."""
    from .modeling_leyolo import LeYoloConvNormAct, LeYoloInvertedBottleneck, LeYoloSPPF

    names = {}
    for index, layer in enumerate(model.model.layers):
        official, ours = f"model.{index}", f"model.layers.{index}"
        if isinstance(layer, LeYoloConvNormAct):
            names |= {f"{official}.c": f"{ours}.conv", f"{official}.bn": f"{ours}.norm"}
        elif isinstance(layer, LeYoloInvertedBottleneck):
            parts = (["expand"] if layer.expand is not None else []) + ["depthwise", "project", "project_norm"]
            for position, part in enumerate(parts):
                if part in ("expand", "depthwise"):
                    names |= {f"{official}.layers.{position}.c": f"{ours}.{part}.conv",
                              f"{official}.layers.{position}.bn": f"{ours}.{part}.norm"}  # fmt: skip
                else:
                    names[f"{official}.layers.{position}"] = f"{ours}.{part}"
        elif isinstance(layer, LeYoloSPPF):
            for official_part, part in (("cv1", "reduce"), ("cv2", "expand")):
                names |= {f"{official}.{official_part}.conv": f"{ours}.{part}.conv",
                          f"{official}.{official_part}.bn": f"{ours}.{part}.norm"}  # fmt: skip
    detect = f"model.{len(model.model.layers)}"
    for official_branch, branch in (("cv2", "box_branches"), ("cv3", "class_branches")):
        for level in range(len(model.head.box_branches)):
            ours = f"head.{branch}.{level}"
            for position, part in enumerate(("pointwise", "depthwise1", "depthwise2")):
                names |= {f"{detect}.{official_branch}.{level}.{position}.conv": f"{ours}.{part}.conv",
                          f"{detect}.{official_branch}.{level}.{position}.bn": f"{ours}.{part}.norm"}  # fmt: skip
            names[f"{detect}.{official_branch}.{level}.3"] = f"{ours}.output"
    return names


def convert_state_dict(original: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Rename an official state dict to `model`'s names; every tensor must find its place, and fill all of them."""
    prefixes = _official_name_map(model)
    detect = f"model.{len(model.model.layers)}"
    converted = {}
    for name, tensor in original.items():
        if name == f"{detect}.dfl.conv.weight":
            converted["head.distribution_bins"] = tensor.reshape(-1)
            continue
        prefix, _, leaf = name.rpartition(".")
        if prefix not in prefixes:
            raise ValueError(f"The checkpoint tensor {name!r} has no counterpart in {type(model).__name__}.")
        converted[f"{prefixes[prefix]}.{leaf}"] = tensor
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ValueError(f"The checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:3]}.")
    for name, tensor in converted.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(expected[name].shape)}.")
    return converted


def config_from_checkpoint(checkpoint: dict, variant: str | None = None):
    """The `LeYoloConfig` of an official checkpoint: the layer table from its layer count, the width from its
    stored YAML, the class names from its `names`. `variant="large"` marks a Medium-table model as Large (the
    same network evaluated at 768)."""
    from .configuration_leyolo import VARIANTS, LeYoloConfig
    from .modeling_leyolo import LAYER_TABLES

    model = checkpoint["model"]
    yaml = getattr(model, "yaml", None) or {}
    num_layers = len(yaml.get("backbone", [])) + len(yaml.get("head", [])) - 1
    architectures = {len(rows): name for name, (rows, _) in LAYER_TABLES.items()}
    if num_layers not in architectures:
        raise ValueError(f"The checkpoint has {num_layers} layers before its head; LeYOLO has {sorted(architectures)}.")
    _depth, width, max_channels = next(iter(yaml["scales"].values()))
    names = getattr(model, "names", None) or {index: f"LABEL_{index}" for index in range(yaml["nc"])}
    settings = {"architecture": architectures[num_layers], "width_multiple": width, "max_channels": max_channels}
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {tuple(VARIANTS)}, got {variant!r}.")
        if VARIANTS[variant]["architecture"] != settings["architecture"]:
            raise ValueError(f"The checkpoint has the {settings['architecture']} layer table, not {variant}'s.")
        settings["image_size"] = VARIANTS[variant]["image_size"]
    return LeYoloConfig(**settings, id2label={int(index): name for index, name in names.items()})


def convert_checkpoint(checkpoint_path: str | Path, output_dir: str | Path | None = None, variant: str | None = None):
    """Load an official checkpoint into a float32 `LeYoloForObjectDetection` (saved to `output_dir` if given)."""
    from .modeling_leyolo import LeYoloForObjectDetection

    checkpoint = load_original_checkpoint(checkpoint_path)
    config = config_from_checkpoint(checkpoint, variant)
    model = LeYoloForObjectDetection(config)
    source = checkpoint.get("ema") or checkpoint["model"]
    original = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in _module_tensors(source)}
    model.load_state_dict(convert_state_dict(original, model), strict=True)
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="official LeYOLO .pt file (Ultralytics format)")
    parser.add_argument("--output", required=True, help="folder to write the transformers model to")
    parser.add_argument("--variant", choices=("nano", "small", "medium", "large"), default=None,
                        help="set the evaluation size of a variant (needed only for 'large')")  # fmt: skip
    parser.add_argument("--image-processor", action="store_true", help="also save a LeYoloImageProcessor")
    args = parser.parse_args(argv)
    model = convert_checkpoint(args.checkpoint, args.output, args.variant)
    if args.image_processor:
        from .image_processing_leyolo import LeYoloImageProcessor

        LeYoloImageProcessor(size=model.config.image_size).save_pretrained(args.output)
    print(f"Saved {type(model).__name__} ({model.num_parameters():,} parameters, float32) to {args.output}")


if __name__ == "__main__":
    main()
