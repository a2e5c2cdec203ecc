"""Checks shared by the PEFT tuners of peft-ext: each names the bad field (or layer) and what is allowed."""

from __future__ import annotations

from peft.tuners.tuners_utils import _get_in_out_features


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def check_dropout(name: str, value) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")


def normalize_module_targets(config) -> None:
    """peft's own rules for `target_modules` / `exclude_modules` / `layers_to_transform` / `layers_pattern`:
    lists become sets (as peft's LoRA config does), and a regex target cannot be combined with layer selection."""
    if isinstance(config.layers_to_transform, int):
        config.layers_to_transform = [config.layers_to_transform]
    if isinstance(config.target_modules, list):
        config.target_modules = set(config.target_modules)
    if isinstance(config.exclude_modules, list):
        config.exclude_modules = set(config.exclude_modules)
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str (a regex).")
    if isinstance(config.target_modules, str) and config.layers_pattern is not None:
        raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str (a regex).")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("`layers_pattern` needs `layers_to_transform`; set both or neither.")


def base_layer_features(tuner_layer, method: str) -> tuple[int, int]:
    """(in_features, out_features) of a tuner layer's base layer; a layer type without them is refused by name."""
    base_layer = tuner_layer.get_base_layer()
    in_features, out_features = _get_in_out_features(base_layer)
    if in_features is None or out_features is None:
        raise TypeError(f"{method} does not support layers of type {type(base_layer).__name__}.")
    return in_features, out_features
