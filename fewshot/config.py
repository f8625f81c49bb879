"""One way to combine argparse options and YAML config files, shared by every script.

``parse_args_with_config(parser, argv)`` adds ``--config FILE.yaml`` to ``parser``. The file's keys are
the parser's option destinations (``lr``, ``data_root``; the flag spelling ``data-root`` is accepted too)
and supply defaults; flags given on the command line override them. Values are converted and checked with
the option's own ``type``/``choices``/``nargs``, so a file cannot smuggle in what the CLI would refuse.

``save_config(namespace, path)`` writes the resolved options as YAML that ``--config`` reads back.
``cli_main(fn)`` runs a script's ``main`` and turns our errors into one ``error: ...`` line (exit 2).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from fewshot.io import atomic_write

__all__ = ["ConfigError", "parse_args_with_config", "load_config_file", "save_config", "to_yaml_value", "cli_main"]

CONFIG_DEST = "config"


class ConfigError(ValueError):
    """A config file or config value that cannot be used."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file that must hold a mapping of option names to values, each key once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # safe: a SafeLoader subclass
    except yaml.YAMLError as exc:  # one line: the problem and where it is
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of option names to values, got {type(data).__name__}"
        )
    return data


def _options_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        a.dest: a
        for a in parser._actions
        if a.dest not in (argparse.SUPPRESS, "help", CONFIG_DEST) and a.option_strings
    }


def _convert_scalar(value: Any, action: argparse.Action, key: str, where: str) -> Any:
    """Convert one YAML value with the option's ``type``, refusing lossy or nonsensical conversions."""
    kind = action.type
    if value is None:
        return None
    if kind is None:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: key {key!r} expects a single value, got {value!r}")
        return value
    if isinstance(value, bool) and kind in (int, float):
        raise ConfigError(f"{where}: key {key!r} expects {kind.__name__}, got boolean {value!r}")
    if kind is int and isinstance(value, float):
        raise ConfigError(f"{where}: key {key!r} expects an integer, got {value!r}")
    if kind in (int, float) and not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: key {key!r} expects {kind.__name__}, got {value!r}")
    if kind is str and isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: key {key!r} expects a string, got {value!r}")
    try:
        return kind(value) if kind is not str else str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        name = getattr(kind, "__name__", repr(kind))
        raise ConfigError(f"{where}: key {key!r} has a bad value {value!r} ({name}: {exc})") from None


def _convert(value: Any, action: argparse.Action, key: str, where: str) -> Any:
    """Convert a config value as argparse would have converted the same value given as a flag."""
    if value is None and action.default is None:  # "not set", as a saved config writes it
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key {key!r} expects true or false, got {value!r}")
        return value
    if isinstance(action, (argparse._StoreConstAction, argparse._CountAction)):
        if isinstance(action, argparse._CountAction):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}: key {key!r} expects a count >= 0, got {value!r}")
            return value
        if value not in (action.const, action.default):
            raise ConfigError(f"{where}: key {key!r} must be {action.const!r} or {action.default!r}, got {value!r}")
        return value
    many = action.nargs in ("*", "+") or (isinstance(action.nargs, int) and action.nargs > 1)
    if isinstance(action, argparse._AppendAction):
        many = True
    if many:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key {key!r} expects a list, got {value!r}")
        items = [_convert_scalar(v, action, key, where) for v in value]
        if (
            isinstance(action.nargs, int)
            and not isinstance(action, argparse._AppendAction)
            and len(items) != action.nargs
        ):
            raise ConfigError(f"{where}: key {key!r} expects {action.nargs} values, got {len(items)}")
        if action.nargs == "+" and not items:
            raise ConfigError(f"{where}: key {key!r} expects at least one value")
    else:
        items = [_convert_scalar(value, action, key, where)]
    if action.choices is not None:
        for item in items:
            if item is not None and item not in action.choices:
                valid = ", ".join(map(str, action.choices))
                raise ConfigError(f"{where}: key {key!r} has value {item!r}; choose one of: {valid}")
    return items if many else items[0]


# Keys of earlier versions' config files -> (the key that replaces them, what to write there); named in the
# error, never read silently.
RENAMED_KEYS = {"channels_last": ("memory_format", "channels_last (for true) or contiguous (for false)")}


def config_defaults(parser: argparse.ArgumentParser, config: dict[str, Any], where: str) -> dict[str, Any]:
    """Map a config dict to ``{dest: converted value}`` for ``parser``; unknown keys raise ConfigError."""
    options = _options_by_dest(parser)
    defaults: dict[str, Any] = {}
    for raw_key, value in config.items():
        key = str(raw_key).replace("-", "_")
        if key not in options:
            new_key, values = RENAMED_KEYS.get(key, (None, ""))
            if new_key in options:
                raise ConfigError(f"{where}: key {str(raw_key)!r} is gone; write {new_key}: {values}")
            valid = ", ".join(sorted(options))
            raise ConfigError(f"{where}: unknown key {str(raw_key)!r}; valid keys: {valid}")
        if key in defaults:
            raise ConfigError(f"{where}: key {key!r} is given twice")
        defaults[key] = _convert(value, options[key], key, where)
    return defaults


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``parser``, taking defaults from ``--config FILE.yaml`` when given.

    Precedence: command-line flags > config file > the parser's own defaults. Options the parser marks
    ``required`` may be supplied by the file instead. The namespace's ``config`` is the file's path (or None).
    """
    if not any(CONFIG_DEST == a.dest for a in parser._actions):
        parser.add_argument(
            "--config",
            metavar="FILE.yaml",
            default=None,
            help="YAML file of option defaults (keys = option names); flags override it",
        )
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return parser.parse_args(argv)

    defaults = config_defaults(parser, load_config_file(known.config), f"config file {known.config!r}")
    options = _options_by_dest(parser)
    saved_defaults = {dest: options[dest].default for dest in defaults}
    relaxed = [options[d] for d in defaults if options[d].required]
    try:
        for action in relaxed:
            action.required = False
        for dest, value in defaults.items():
            options[dest].default = value
        return parser.parse_args(argv)
    finally:
        for action in relaxed:
            action.required = True
        for dest, value in saved_defaults.items():
            options[dest].default = value


def to_yaml_value(value: Any) -> Any:
    """A plain YAML-safe version of ``value`` (paths and tuples become strings and lists)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [to_yaml_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_yaml_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_config(namespace: argparse.Namespace | dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the resolved options as YAML (atomically) so that ``--config path`` reproduces the run.

    The ``config`` entry itself is left out: the saved file is complete on its own.
    """
    items = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    data = {k: to_yaml_value(v) for k, v in items.items() if k != CONFIG_DEST}
    text = yaml.safe_dump(data, sort_keys=True, default_flow_style=False)
    return atomic_write(path, lambda f: f.write(text))


def cli_main(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a script's ``main``: ValueError/FileNotFoundError/... become ``error: ...`` + exit 2;
    training that diverged (FloatingPointError: a non-finite loss) becomes ``error: ...`` + exit 1.

    Tracebacks are for bugs; a wrong flag, file or value is reported in one line naming it.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
            message = str(exc) if not isinstance(exc, OSError) or exc.filename is None else _os_message(exc)
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except FloatingPointError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return wrapper


def _os_message(exc: OSError) -> str:
    return f"{exc.strerror or type(exc).__name__}: {exc.filename!r}"
