"""Command-line parsing of the scripts: a YAML config file, then ``--key value`` overrides (trl-style)."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Sequence

import yaml
from transformers import HfArgumentParser

CONFIG_EXTENSIONS = (".yaml", ".yml")


def parse_config_and_overrides(parser: HfArgumentParser, argv: Sequence[str]) -> tuple:
    """Parse ``[config.yaml] [--key value ...]`` into the parser's dataclasses; the command line wins over the YAML,
    which may ``include:`` a base YAML.

    Unknown YAML keys are an error (a typo would otherwise silently fall back to a default).
    """
    argv = list(argv)
    if argv and not argv[0].startswith("-") and not argv[0].endswith(CONFIG_EXTENSIONS):
        raise ValueError(
            f"{argv[0]!r} is not a YAML config file: the first argument, unless it is an --option, must be a "
            f"{' or '.join(CONFIG_EXTENSIONS)} file of `option: value` lines (a JSON config is valid YAML: rename it "
            "to .yaml)."
        )
    if argv and argv[0].endswith(CONFIG_EXTENSIONS):
        values = read_config(argv.pop(0))
        known = {field.name for dtype in parser.dataclass_types for field in dataclasses.fields(dtype)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown keys in the config file: {unknown}. Check their spelling against --help.")
        parser.set_defaults(**values)
    check_options(parser, argv)
    return parser.parse_args_into_dataclasses(args=argv)


def check_options(parser: HfArgumentParser, argv: Sequence[str]) -> None:
    """Name a mistyped ``--option`` (with the closest real ones) before argparse prints its whole usage first."""
    options = [option for option in parser._option_string_actions if option.startswith("--")]
    for token in argv:
        name = token.split("=", 1)[0]
        if not name.startswith("--") or any(option.startswith(name) for option in options):  # argparse takes prefixes
            continue
        close = difflib.get_close_matches(name, [option for option in options if "-" not in option[2:]], n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ValueError(f"Unknown option {name}{hint}: `cmp-hf train --help` lists every option.")


def read_config(path: str) -> dict:
    """A YAML config; ``include: other.yaml`` (relative to this file) is read first and overridden by this one."""
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(
            f"{path} holds a YAML {type(values).__name__}, not a mapping: write one `option: value` per line (e.g. "
            "`model_name_or_path: openai/clip-vit-base-patch16`), not a list or a bare value."
        )
    include = values.pop("include", None)
    if include is None:
        return values
    return {**read_config(os.path.join(os.path.dirname(path), include)), **values}
