"""``--config FILE`` for ``train music`` / ``train caption``: options from a TOML file or a run.

Two kinds of file:

* a TOML file (stdlib :mod:`tomllib`) of option names, spelled as on the command line with
  ``-`` or ``_`` (``batch-size = 8``, ``gate = "bbeta5"``, ``no_amp = true``), plus the few
  training-config fields that have no flag (music: ``min_lr``, ``eval_batch_size``) and the
  positive names of negated flags (``amp = false``). ``extends = "other.toml"`` (relative to
  the file) reads that file first, so a family of configs can share one protocol file. String
  values expand ``~`` and ``$VARS``.
* a run's ``config.json`` (``runs/x/best/config.json``, written next to every checkpoint):
  ``{"kind", "model", "train": asdict(TrainConfig), "metrics", ...}``. Its ``train`` dict is
  mapped back onto the options, so the run is replayed with the same typed config, except the
  run folder (``out``), which the replay never reuses: give ``--out``.

The file's values become the parser's defaults, then the command line is parsed again, so
flags given on the command line win wherever they stand. Every key is checked: an unknown one
is an error that names it and lists the valid ones; values are type-checked against the
option (``int``, ``float``, ``str``, ``bool``, choices). The trainer's config dataclass then
validates the whole (its ``__post_init__``) as for any command line.

Wiring (the trainer's ``add_arguments`` and ``bbservice.cli.main``)::

    run_config.add_config_argument(parser, "music")   # last line of add_arguments
    args = parser.parse_args(argv)
    if getattr(args, "config", None):                 # cli.main: the file's values are now
        args = parser.parse_args(argv)                # defaults; parse again so flags win

:func:`parse_args` does both steps for a parser used on its own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tomllib
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from bbservice.errors import ConfigError

# Destinations that say how to run, not what to train: never read from a file.
RUN_ONLY = frozenset({"help", "config", "resume", "resume_if_present"})


@dataclass(frozen=True)
class Schema:
    """How a trainer's ``config.json["train"]`` maps back onto its command-line options.

    ``renamed``: dotted config path -> option destination where the names differ (a path whose
    last part is a destination maps to it without an entry). ``inverted``: config field ->
    ``store_true`` destination meaning its negation. ``derived``: paths set by training itself
    (ignored on replay). ``train_config``: ``"module:Class"`` of the training dataclass.
    """

    kind: str
    train_config: str
    renamed: dict[str, str] = field(default_factory=dict)
    inverted: dict[str, str] = field(default_factory=dict)
    derived: frozenset[str] = frozenset()

    def dataclass(self) -> type:
        module, name = self.train_config.split(":")
        return getattr(importlib.import_module(module), name)


_GATE = {"model.gate.family": "gate"}
SCHEMAS: dict[str, Schema] = {
    "music": Schema(
        kind="music",
        train_config="training.train_music:MusicTrainConfig",
        renamed={
            **_GATE,
            "model.hidden_size": "hidden",
            "model.num_layers": "layers",
            "model.sparse": "sparsify",
            "model.gate.reference_sample_eps": "reference_eps",
        },
        inverted={"amp": "no_amp"},
    ),
    "caption": Schema(
        kind="caption",
        train_config="training.train_caption:CaptionTrainConfig",
        renamed={
            **_GATE,
            "model.hidden_size": "hidden",
            "model.grid_size": "grid",
            "model.sparse": "sparsify",
        },
        inverted={"amp": "no_amp", "cache_images": "no_cache", "progress": "no_progress"},
        derived=frozenset({"model.vocab_size"}),
    ),
}


def add_config_argument(parser: argparse.ArgumentParser, kind: str) -> None:
    """Add ``--config FILE`` to a trainer's parser (call it after every other option)."""
    if kind not in SCHEMAS:
        raise ConfigError(f"no config schema for {kind!r}; known: {sorted(SCHEMAS)}")
    parser.add_argument(
        "--config",
        action=_ConfigAction,
        default=None,
        metavar="FILE",
        help="options from a TOML file or a run's config.json (replay); flags given here win",
    ).schema = SCHEMAS[kind]


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; with ``--config``, parse again so the command line beats the file."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        args = parser.parse_args(argv)
    return args


class _ConfigAction(argparse.Action):
    """Loads the file, checks it and makes its values the parser's defaults."""

    schema: Schema

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            options = load(values, parser, self.schema)
        except ConfigError as err:
            raise argparse.ArgumentError(self, str(err)) from None
        for action in parser._actions:  # a required option the file gives is no longer missing
            if action.dest in options:
                action.required = False
        parser.set_defaults(**options)
        setattr(namespace, self.dest, values)


# -- loading ------------------------------------------------------------------------------------


def load(path: str | Path, parser: argparse.ArgumentParser, schema: Schema) -> dict[str, Any]:
    """Option destinations -> values from a TOML file or a run's ``config.json``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    if path.suffix == ".json":
        return options_from_run_config(_read_json(path), parser, schema, source=str(path))
    return options_from_toml(read_toml(path), parser, schema, source=str(path))


def read_toml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML file as a flat dict, ``extends`` resolved (the including file wins)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"config '{path}' extends itself (through {[str(p) for p in _seen]})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config '{path}' is not valid TOML: {err}") from err
    except OSError as err:
        raise ConfigError(f"config '{path}' cannot be read: {err}") from err
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"'extends' in '{path}' must be a file name, got {base!r}")
    return {**read_toml(path.parent / base, (*_seen, path)), **data}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as err:
        raise ConfigError(f"config '{path}' is not readable JSON: {err}") from err


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options a file may set, by destination."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in RUN_ONLY}


def extra_fields(parser: argparse.ArgumentParser, schema: Schema) -> dict[str, Any]:
    """Training-config fields without an option (name -> default), settable from a file."""
    dests = option_actions(parser)
    out = {}
    for f in fields(schema.dataclass()):
        if f.name in dests or f.name in schema.inverted or f.name == "model":
            continue
        out[f.name] = f.default if f.default is not MISSING else f.default_factory()
    return out


def valid_keys(parser: argparse.ArgumentParser, schema: Schema) -> list[str]:
    return sorted({*option_actions(parser), *extra_fields(parser, schema), *schema.inverted})


def options_from_toml(
    data: dict[str, Any], parser: argparse.ArgumentParser, schema: Schema, source: str = "TOML"
) -> dict[str, Any]:
    """Check and convert a flat TOML dict to option destinations -> values."""
    actions, extras = option_actions(parser), extra_fields(parser, schema)
    options: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key in schema.inverted:
            key, value = schema.inverted[key], _typed_bool(raw_key, value, source)
            value = not value
        if key in actions:
            options[key] = _check_option(actions[key], raw_key, value, source)
        elif key in extras:
            options[key] = _check_like(extras[key], raw_key, value, source)
        else:
            raise ConfigError(
                f"unknown key '{raw_key}' in {source}; valid keys: "
                + ", ".join(valid_keys(parser, schema))
            )
    return options


def _expand(value: str, key: str, source: str) -> str:
    expanded = os.path.expanduser(os.path.expandvars(value))
    if "$" in expanded:
        raise ConfigError(f"'{key}' in {source}: environment variable not set in {value!r}")
    return expanded


def _typed_bool(key: str, value: Any, source: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"'{key}' in {source} must be true or false, got {value!r}")
    return value


def _check_like(default: Any, key: str, value: Any, source: str) -> Any:
    """A value of a field without an option, typed like its default."""
    if isinstance(default, bool):
        return _typed_bool(key, value, source)
    if (
        isinstance(default, float)
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    ):
        return float(value)
    if default is not None and type(value) is not type(default):
        raise ConfigError(f"'{key}' in {source} must be {type(default).__name__}, got {value!r}")
    return _expand(value, key, source) if isinstance(value, str) else value


def _check_option(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """A value as the option would have parsed it (type, choices, flags as booleans)."""
    if action.nargs == 0:  # store_true / store_false: the file gives the destination's value
        return _typed_bool(key, value, source)
    if value is None and action.default is None:
        return None
    kind = action.type or str
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        value = float(value)
    elif kind in (int, float, str):
        if value is None or type(value) is not kind:
            raise ConfigError(f"'{key}' in {source} must be {kind.__name__}, got {value!r}")
        if kind is str:
            value = _expand(value, key, source)
    else:
        value = kind(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(
            f"'{key}' in {source} must be one of {', '.join(map(str, action.choices))}, "
            f"got {value!r}"
        )
    return value


# -- replaying a run's config.json --------------------------------------------------------------


def _flatten(data: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _defaults(schema: Schema) -> dict[str, Any]:
    cls = schema.dataclass()
    instance = cls()
    return dict(_flatten(asdict(instance) if is_dataclass(instance) else {}))


def options_from_run_config(
    config: dict, parser: argparse.ArgumentParser, schema: Schema, source: str = "config.json"
) -> dict[str, Any]:
    """Options that rebuild the training config saved in a checkpoint's ``config.json``."""
    if config.get("kind") != schema.kind or not isinstance(config.get("train"), dict):
        raise ConfigError(
            f"{source} is not the config.json of a {schema.kind} run "
            f"(kind {config.get('kind')!r}, needs a 'train' section)"
        )
    actions, extras, defaults = option_actions(parser), extra_fields(parser, schema), None
    options: dict[str, Any] = {}
    for path, value in _flatten(config["train"]):
        last = path.rsplit(".", 1)[-1]
        if path == "out" or path in schema.derived:
            continue  # never write over the replayed run; fields training fills in itself
        if path in schema.inverted:
            options[schema.inverted[path]] = not value
        elif path in schema.renamed or last in actions:
            dest = schema.renamed.get(path, last)
            options[dest] = _check_option(actions[dest], path, value, source)
        elif path in extras:
            options[path] = _check_like(extras[path], path, value, source)
        else:
            defaults = defaults if defaults is not None else _defaults(schema)
            if path not in defaults or defaults[path] != value:
                raise ConfigError(
                    f"{source}: '{path}' = {value!r} has no command-line option, so this run "
                    f"cannot be replayed with this version"
                )
    return options
