"""Command-line options, built from the typed config in `model/config.py` (one place for
every option, its default and its help), and the merge of a config file with the flags
given on the command line (flags win)."""
from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Callable

import click
from click.core import ParameterSource

from model.config import SECTIONS, ConfigError, ExperimentConfig


def _int_list(ctx, param, value) -> list[int] | None:
    if value is None or isinstance(value, (list, tuple)):
        return value
    try:
        values = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}")
    if not values or min(values) < 1:
        raise click.BadParameter("cut-offs must be positive integers")
    return values


def _variant_list(choices: tuple[str, ...]):
    """'all', one variant, or several comma-separated (kept as the comma-separated text)."""
    def parse(ctx, param, value):
        if value is None:
            return value
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = sorted(set(names) - set(choices))
        if unknown or not names or ("all" in names and len(names) > 1):
            raise click.BadParameter(f"'all', or variants from {', '.join(choices[1:])} "
                                     f"(comma-separated); got {value!r}")
        return ",".join(names)
    return parse


def _name_list(choices: tuple[str, ...], allow_empty: bool) -> Callable:
    def parse(ctx, param, value) -> list[str]:
        if isinstance(value, (list, tuple)):
            return list(value)
        names = [v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"]
        unknown = sorted(set(names) - set(choices))
        if unknown or (not names and not allow_empty):
            raise click.BadParameter(f"names are {', '.join(choices)}; got {value!r}")
        return names
    return parse


def _click_option(f) -> Callable:
    meta, annotation = f.metadata, str(f.type)
    default = f.default if f.default is not MISSING else f.default_factory()
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    kwargs = {"help": meta.get("help", ""), "show_default": True}
    if annotation == "bool":
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=default, **kwargs)
    if meta.get("kind") == "ints":
        return click.option(flag, f.name, default=",".join(map(str, default)),
                            callback=_int_list, **kwargs)
    if meta.get("kind") == "names":
        return click.option(flag, f.name, default=",".join(default) or "none",
                            callback=_name_list(meta["choices"],
                                                allow_empty=not default or meta["none_ok"]),
                            **kwargs)
    if meta.get("kind") == "variants":
        return click.option(flag, f.name, default=default, callback=_variant_list(meta["choices"]),
                            **kwargs)
    if meta.get("choices"):
        kwargs["type"] = click.Choice(meta["choices"])
    elif "int" in annotation:
        kwargs["type"] = int
    elif "float" in annotation:
        kwargs["type"] = float
    elif meta.get("kind") == "path":
        kwargs["type"] = click.Path()
    return click.option(flag, f.name, default=default, **kwargs)


def config_options(*sections: str | type, only: tuple[str, ...] | None = None) -> Callable:
    """Decorator adding the options of the named config sections, or of option dataclasses
    given directly (or just `only` of them)."""
    chosen = [f for name in sections
              for f in fields(SECTIONS[name] if isinstance(name, str) else name)
              if only is None or f.name in only]

    def decorate(command: Callable) -> Callable:
        for f in reversed(chosen):
            command = _click_option(f)(command)
        return command
    return decorate


def experiment_config(ctx: click.Context, config_file: str | None,
                      values: dict) -> ExperimentConfig:
    """The config file (if any) with every flag given on the command line applied on top."""
    try:
        base = ExperimentConfig.load(config_file) if config_file else ExperimentConfig()
        given = {name: value for name, value in values.items()
                 if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
                 or config_file is None}
        return base.updated(given, "command line")
    except ConfigError as error:
        raise click.ClickException(str(error))
