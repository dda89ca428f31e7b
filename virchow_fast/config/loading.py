"""YAML in, ``--set a.b=v`` overrides, typed sections out; derived values; the saved and printed forms.

Every error is a :class:`ConfigError`, one line naming the file and the key, before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .sections import Config, ConfigError
from .yaml_io import one_line, read_yaml


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build_section(tp, value, where)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("on" if value else "off") in choices:  # YAML 1.1: a bare on/off is a bool
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool):  # a bare on/off in YAML 1.1
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _renamed_ops() -> dict[str, str]:
    from ..ops.table import RENAMED

    return RENAMED


def build_section(cls: type, data: dict, where: str) -> Any:
    """A section (dataclass ``cls``) from a mapping: unknown keys and wrong types fail naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            if where == "ops" and key in _renamed_ops():
                raise ConfigError(f"ops.{key}: renamed ops.{_renamed_ops()[key]}")
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where}.{key}: unknown key (known: {known})".lstrip("."))
    obj = cls()
    for key, value in data.items():
        setattr(obj, key, _coerce(value, hints[key], f"{where}.{key}".lstrip(".")))
    return obj


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse {raw!r}: {exc}") from None
    return key.strip(), value


def shipped_configs() -> list[str]:
    """Names of the configs installed with the package (``configs/*.yaml`` of the repository)."""
    from importlib.resources import files

    return sorted(f.name[:-5] for f in files("virchow_fast.configs").iterdir() if f.name.endswith(".yaml"))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file, else a shipped config of that name (``vit_h14_virchow2``)."""
    p = Path(path)
    if p.is_file() or len(p.parts) != 1 or p.suffix not in ("", ".yaml"):
        return p
    from importlib.resources import as_file, files

    shipped = files("virchow_fast.configs") / f"{p.stem}.yaml"
    if not shipped.is_file():
        return p
    with as_file(shipped) as real:  # a plain file for every install kind but a zipped one
        return Path(real)


def validate(cfg: Config) -> None:
    """Impossible values fail here, before any work starts (each section's checks sit beside its fields)."""
    cfg.check()


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML at ``path`` (a file, or a shipped config's name; None = defaults), apply ``a.b=v``
    overrides, validate. Every error is a :class:`ConfigError` naming the file and the key."""
    source = str(path) if path is not None else "<defaults>"
    tree: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file (shipped configs: {', '.join(shipped_configs())})")
        try:
            tree = read_yaml(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: {one_line(exc)}") from None
        if tree is None:
            raise ConfigError(f"{source}: the file is empty (no settings): it would train on the defaults")
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: top level must be a mapping")
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    try:
        cfg = build_section(Config, tree, "")
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


@dataclass(frozen=True)
class Derived:
    """Values computed once from the config (and the process count) and saved with the run."""
    world_size: int
    global_batch: int
    peak_lr: float  # base_lr * sqrt(global_batch / 1024)
    total_steps: int
    global_patches: int
    local_patches: int
    global_tokens: int  # patches + cls + registers
    local_tokens: int


def derive(cfg: Config, world_size: int = 1) -> Derived:
    m, c = cfg.model, cfg.data.crops
    global_batch = cfg.data.batch_size * world_size
    prefix = 1 + m.num_registers
    g, lo = (c.global_size // m.patch_size) ** 2, (c.local_size // m.patch_size) ** 2
    return Derived(world_size=world_size, global_batch=global_batch,
                   peak_lr=cfg.optim.base_lr * math.sqrt(global_batch / 1024.0),
                   total_steps=cfg.train.epochs * cfg.train.steps_per_epoch, global_patches=g, local_patches=lo,
                   global_tokens=g + prefix, local_tokens=lo + prefix)


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def save_resolved(cfg: Config, derived: Derived, path: str | os.PathLike) -> None:
    """Write the resolved config and its derived values, atomically."""
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump({"config": to_dict(cfg), "derived": to_dict(derived)}, sort_keys=False))
    os.replace(tmp, p)


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per field: dotted key, default, documentation (for ``virchow-fast config-help``)."""
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{key} = {default!r}  # {f.metadata.get('doc', '')}")
    return lines
