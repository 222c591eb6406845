"""Users' own model and data factories, named in the config by an import path (`model.arch`, `data.name`).

Two spellings, both `<where>:<function>`:

- `package.module:function`: imported like any module (installed, on PYTHONPATH, or in the current
  directory);
- `path/to/file.py:function`: the file itself, a path relative to the config file (`load` makes it
  absolute, so the stored config names the file wherever an analysis later runs).

The store records the factory as written in the resolved config, its options, and the sha256 of its
source file (`describe`); an analysis that rebuilds the network or the data warns once on stderr when
that file has changed since recording (`warn_if_changed`). Every failure to find or call a factory is
a ConfigError naming the config key and saying how to fix it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from gentrace.core.config import RunConfig, is_factory, split_factory
from gentrace.core.config import factory_is_file as is_file
from gentrace.core.errors import ConfigError

__all__ = ["call", "describe", "is_factory", "load", "recorded", "source_file", "warn_if_changed"]

_WARNED: set[str] = set()  # source files already warned about in this process


def source_file(spec: str, key: str) -> Path | None:
    """The source file of a factory: the file itself, or the file of its module (None: built-in or no file)."""
    where, _ = split_factory(spec, key)
    if is_file(where):
        return Path(where).expanduser()
    found = importlib.util.find_spec(where) if _importable_name(where) else None
    return Path(found.origin) if found is not None and found.origin and found.origin.endswith(".py") else None


def load(spec: str, key: str) -> Callable[..., Any]:
    """The factory function named by `spec` (a ConfigError naming `key` when it cannot be imported)."""
    where, function = split_factory(spec, key)
    module = _load_file(where, key) if is_file(where) else _import(where, key)
    factory = getattr(module, function, None)
    if factory is None:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        shown = ", ".join(defined[:8]) or "none"
        raise ConfigError(f"{key} = {spec!r}: {where} has no function {function!r}; its functions: {shown}")
    if not callable(factory):
        raise ConfigError(f"{key} = {spec!r}: {where}.{function} is a {type(factory).__name__}, not a function")
    return factory


def call(spec: str, key: str, *args: Any, **options: Any) -> Any:
    """Call the factory; an exception inside it becomes one ConfigError line that includes its message."""
    factory = load(spec, key)
    try:
        return factory(*args, **options)
    except TypeError as exc:
        if "argument" in str(exc):
            raise ConfigError(f"{key} = {spec!r}: the factory does not take these arguments ({exc})") from None
        raise ConfigError(f"{key} = {spec!r}: the factory raised TypeError: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a user's factory may raise anything; report it in one line
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"{key} = {spec!r}: the factory raised {type(exc).__name__}: {text}") from None


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe(spec: str, key: str, options: dict[str, Any]) -> dict[str, Any]:
    """What the store records of a factory: the spec, its options, its source file and the file's sha256."""
    path = source_file(spec, key)
    digest = sha256(path) if path is not None and path.is_file() else None
    return {"factory": spec, "options": dict(options), "file": str(path) if path else None, "sha256": digest}


def recorded(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The store's `factories` attr: config key -> `describe` of each factory the run uses (empty: built-ins only)."""
    used = {"model.arch": (cfg.model.arch, cfg.model.options), "data.name": (cfg.data.name, cfg.data.options)}
    return {key: describe(spec, key, options) for key, (spec, options) in used.items() if is_factory(spec)}


def warn_if_changed(recorded: dict[str, Any], key: str) -> None:
    """Warn once on stderr when a factory's source file differs from the one the run was recorded with."""
    file, digest = recorded.get("file"), recorded.get("sha256")
    if not file or not digest or file in _WARNED:
        return
    path = Path(file)
    now = sha256(path) if path.is_file() else None
    if now != digest:
        _WARNED.add(file)
        what = "is gone" if now is None else "has changed"
        sys.stderr.write(
            f"warning: {key} factory {recorded.get('factory')!r}: its source {file} {what} since the run was "
            "recorded; the rebuilt network or data may differ from the recorded one\n"
        )


def _importable_name(where: str) -> bool:
    return all(part.isidentifier() for part in where.split("."))


def _import(name: str, key: str) -> ModuleType:
    if not _importable_name(name):
        raise ConfigError(f"{key}: {name!r} is not a module name; give 'package.module:function' or a .py file path")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name) and os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # `gentrace` run from the project folder: its modules are importable
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError:
                pass
        raise ConfigError(
            f"{key}: cannot import module {name!r} ({exc}); install it, add its folder to PYTHONPATH, "
            "or name its file: 'path/to/file.py:function'"
        ) from None
    except Exception as exc:  # noqa: BLE001 - importing a user's module runs its code
        raise ConfigError(f"{key}: importing module {name!r} raised {type(exc).__name__}: {exc}") from None


def _load_file(where: str, key: str) -> ModuleType:
    path = Path(where).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{key}: the factory file {path} does not exist; a relative path is relative to the config file"
        )
    # one module per file content: the same file loads once, an edited file loads anew
    name = f"gentrace_factory_{path.stem}_{sha256(path)[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{key}: cannot load {path} as Python source")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: dataclasses and pickling inside the module look it up
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - a user's file runs its code
        del sys.modules[name]
        raise ConfigError(f"{key}: loading {path} raised {type(exc).__name__}: {exc}") from None
    return module
