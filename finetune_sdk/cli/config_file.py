"""``--config file.yaml|.toml``: the same names as the Python API, flags win over the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError


def read_config(path: str | None) -> dict[str, Any]:
    """Read a YAML or TOML config; an ``options:`` table is merged into the top level."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist")
    from finetune_sdk.data.textfiles import read_text

    text = read_text(file, error=ConfigError)
    if file.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: malformed TOML ({exc})") from None
    elif file.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: malformed YAML ({getattr(exc, 'problem', exc)})") from None
    else:
        raise ConfigError(f"{path}: config files are .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    options = data.pop("options", None) or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{path}: 'options' must be a mapping")
    return {**data, **options}
