"""Flags generated from config dataclasses, and the CLI's one-line errors.

Each ``option(...)`` field of a config becomes ``--field-name`` with the field's help, choices and
default shown in ``--help``; booleans become ``--flag/--no-flag``; tuples take several values.
Parsed flags default to ``None`` ("not given"), so a config file (``--config``) and per-command
``defaults`` can sit between the dataclass defaults and the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from ..config import ConfigBase
from ..schedule import StoppingSchedule

C = TypeVar("C", bound=ConfigBase)


class CLIError(SystemExit):
    """An error with a message for the user: one ``smi: error:`` line, exit status 2, no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"smi: error: {message}")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _argument_kwargs(field: dataclasses.Field, annotation: Any, default: Any) -> dict[str, Any]:
    meta = field.metadata
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    shown = str(default) if isinstance(default, StoppingSchedule) else default
    if isinstance(shown, tuple):
        shown = " ".join(str(v) for v in shown)
    help_text = f"{meta.get('help', '')} (default: {shown})".replace("%", "%%")
    kwargs: dict[str, Any] = {"help": help_text, "default": None}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    annotation = _unwrap_optional(annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is tuple:
        args = typing.get_args(annotation)
        kwargs["type"] = args[0]
        kwargs["nargs"] = "+" if len(args) == 2 and args[1] is Ellipsis else len(args)
    elif annotation in (int, float, str):
        kwargs["type"] = annotation
    else:  # schedules and other text forms: the config parses and validates them
        kwargs["type"] = str
    if choices is not None:
        kwargs["choices"] = list(choices)
    return kwargs


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[ConfigBase], title: str | None = None,
                         defaults: Mapping[str, Any] | None = None, skip: Sequence[str] = (),
                         prefix: str = "", prefixed: Sequence[str] = ()) -> None:
    """One flag per CLI field of ``config_class``; ``defaults`` are this command's defaults (shown in help).

    Fields named in ``prefixed`` get ``prefix`` before their flag and destination (``--kd-lr``), for two
    configs of one command that share a field name; ``config_from_args`` takes the same two arguments.
    """
    group = parser.add_argument_group(title or config_class.__name__)
    hints = typing.get_type_hints(config_class)
    defaults = dict(defaults or {})
    for field in dataclasses.fields(config_class):
        if not field.metadata.get("cli", True) or field.name in skip:
            continue
        if field.name in defaults:
            default = defaults[field.name]
        elif field.default is not dataclasses.MISSING:
            default = field.default
        else:
            default = field.default_factory()  # type: ignore[misc]
        dest = prefix + field.name if field.name in prefixed else field.name
        group.add_argument(flag_name(dest), dest=dest, **_argument_kwargs(field, hints[field.name], default))


def read_config_file(path: str | None, config_class: type[ConfigBase]) -> dict[str, Any]:
    """The mapping in a YAML or JSON file of ``config_class`` fields (empty without a path)."""
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"config file {path} not found; pass an existing YAML or JSON file to --config")
    text = file.read_text()
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:
        raise CLIError(f"cannot parse {path}: {err}") from err
    if not isinstance(data, dict):
        raise CLIError(f"{path} must hold a mapping of {config_class.__name__} fields, got {type(data).__name__}")
    return data


def config_from_args(config_class: type[C], args: argparse.Namespace, defaults: Mapping[str, Any] | None = None,
                     file_values: Mapping[str, Any] | None = None, prefix: str = "",
                     prefixed: Sequence[str] = ()) -> C:
    """``config_class`` from: its defaults < ``defaults`` < ``file_values`` < flags given on the command line."""
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {**(defaults or {}), **(file_values or {})}
    for name in names:
        given = getattr(args, prefix + name if name in prefixed else name, None)
        if given is not None:
            values[name] = given
    unknown = sorted(set(values) - names)
    if unknown:
        raise CLIError(f"unknown {config_class.__name__} keys {unknown}; valid keys: {sorted(names)}")
    try:
        return config_class(**values)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from err


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that says so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def literal(text: str) -> Any:
    """A command-line value as a Python literal (``32``, ``0.5``, ``(224, 224)``, ``True``), else the text."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class KeyValueAction(argparse.Action):
    """``--flag KEY=VALUE ...`` into a dict, values read by ``literal`` (timm's train.py convention)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        result = dict(getattr(namespace, self.dest, None) or {})
        for pair in values:
            key, sep, value = pair.partition("=")
            if not sep or not key.isidentifier():
                raise CLIError(f"{option_string} takes KEY=VALUE pairs (e.g. img_size=32 patch_size=4), got {pair!r}")
            result[key] = literal(value)
        setattr(namespace, self.dest, result)


# argparse reads an argument such as "-1,3" as an unknown flag (it only takes "-1" or "-0.5" as
# negative numbers), so `--labels -1,3` failed with "expected one argument". This pattern also
# accepts comma-separated integer lists; our parsers define no flag that looks like a number.
NEGATIVE_NUMBER_OR_LIST = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+(\s*,\s*-?\d+)*,?$")


def accept_negative_lists(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` take values like ``-1,3`` (so the label check, not argparse, reports them)."""
    parser._negative_number_matcher = NEGATIVE_NUMBER_OR_LIST  # argparse has no public hook for this
