"""A ``RunConfig`` from a YAML/JSON file and ``--section.field`` flags.

Every field of every section gets a flag ``--section.field-name VALUE`` (documented with its
default); values from the file and the flags are converted to the field's type here, and the
sections validate themselves when they are built (``engine.config.run``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml

from data_pipeline.errors import ConfigError
from engine.config.run import SECTIONS, RunConfig
from engine.resources import resolve_resource_path


def _field_types(section_class) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(section_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_class)}


def _coerce(value, annotation, name: str):
    """Convert a file or flag value to the field's type, or raise ConfigError naming the field."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, options[0], name)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()] if value.strip() else []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(item, item_type, name) for item in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(number)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{name}: unsupported type {annotation}")


def read_config_file(path: str | Path) -> dict:
    """The ``{section: {field: value}}`` mapping of a YAML or JSON file (not yet validated)."""
    path = resolve_resource_path(path)  # configs/tiny_cpu.yaml works from any directory
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {path} does not parse: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def build_run_config(file_data: dict | None = None, overrides: dict[str, object] | None = None) -> RunConfig:
    """A ``RunConfig`` from file data (``{section: {field: value}}``) then dotted overrides."""
    values: dict[str, dict] = {name: {} for name in SECTIONS}
    top: dict[str, object] = {}
    for key, value in (file_data or {}).items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of fields, got {value!r}")
            values[key].update(value)
        elif key in ("output_dir", "resume"):
            top[key] = value
        else:
            raise ConfigError(f"{key}: unknown section (sections: {', '.join(SECTIONS)}, output_dir, resume)")
    for dotted, value in (overrides or {}).items():
        if "." in dotted:
            section, name = dotted.split(".", 1)
            values.setdefault(section, {})[name.replace("-", "_")] = value
        else:
            top[dotted] = value

    sections = {}  # each section validates its fields as it is built; RunConfig what spans them
    for section_name, section_class in SECTIONS.items():
        types_by_field = _field_types(section_class)
        given = values.get(section_name, {})
        unknown = sorted(set(given) - set(types_by_field))
        if unknown:
            raise ConfigError(f"{section_name}.{unknown[0]}: unknown field (known: {', '.join(types_by_field)})")
        converted = {
            name: _coerce(value, types_by_field[name], f"{section_name}.{name}") for name, value in given.items()
        }
        sections[section_name] = section_class(**converted)
    return RunConfig(**sections, **{k: str(v) for k, v in top.items()})


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--section.field-name`` flag per field, documented with its default."""
    for section_name, section_class in SECTIONS.items():
        group = parser.add_argument_group(f"{section_name} settings (override the config file)")
        defaults = section_class()
        for name in _field_types(section_class):
            flag = f"--{section_name}.{name.replace('_', '-')}"
            default = getattr(defaults, name)
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            group.add_argument(flag, dest=f"override:{section_name}.{name}", default=None, metavar="VALUE",
                               help=f"default: {shown}")


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    return {
        key[len("override:"):]: value
        for key, value in vars(args).items()
        if key.startswith("override:") and value is not None
    }


def load_run_config(path: str | Path | None, overrides: dict[str, object]) -> RunConfig:
    """The validated run configuration of a file (optional) with dotted overrides on top."""
    return build_run_config(read_config_file(path) if path else {}, overrides)
