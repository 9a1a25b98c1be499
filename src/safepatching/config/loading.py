"""YAML files, dotted overrides and validation: how CLI flags, YAML and the API fill one config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from safepatching.config.settings import PipelineConfig, StrictModel, current_setting
from safepatching.errors import ConfigError


def parse_assignment(item: str) -> tuple[str, Any]:
    """``dotted.key=value`` as (dotted key, value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"cannot read override {item!r}.", "write it as dotted.key=value, e.g. merge.alpha=0.5")
    try:
        return key.strip(), yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        raise ConfigError(f"the value in override {item!r} is not valid YAML.", "quote it for the shell") from None


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """Turn ``a.b=value`` flags into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in assignments:
        key, value = parse_assignment(item)
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key below a value.", "check the dotted key path")
        node[leaf] = value
    return nested


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML config file as a dict, with the files its ``extends:`` names merged underneath it.

    ``extends`` takes one path or a list, relative to the file that names it; later files override
    earlier ones and the file itself overrides them all (mappings merge key by key, anything else is
    replaced), so a variant config holds only what it changes.
    """
    return _read_extended(Path(path), ())


def _read_extended(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"config files extend each other in a cycle: {cycle}.", "remove one extends: entry")
    loaded = _read_mapping(path)
    parents = loaded.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(item, str) and item for item in parents):
        raise ConfigError(f"extends: in {path} must be a path or a list of paths.", "e.g. extends: tune-1.5b.yaml")
    merged: dict[str, Any] = {}
    for parent in parents:
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise ConfigError(f"{path} extends {parent}, but {parent_path} does not exist.", "check the path")
        merged = _deep_merge(merged, _read_extended(parent_path, (*chain, resolved)))
    return _deep_merge(merged, loaded)


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}.", "pass a readable UTF-8 YAML file") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " "), "fix the syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings.", "write key: value pairs")
    return loaded


def build_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    model: type[StrictModel] = PipelineConfig,
    quick: bool = False,
) -> StrictModel:
    """Validate a config from an optional YAML file plus overrides (CLI flags or API keywords).

    ``quick`` applies the file's own ``quick:`` overrides first (bench and continual configs).
    """
    raw = read_yaml(path) if path else {}
    if quick:
        if not isinstance(raw.get("quick"), dict) or not raw["quick"]:
            raise ConfigError(f"config {path} has no quick: section.", "add quick: {overrides} or drop --quick")
        raw = _deep_merge(raw, raw["quick"])
    raw = _deep_merge(raw, overrides or {})
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc), "run `safepatching config` to see every key") from None


def _describe_validation_error(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{where}: {message}")
    return "invalid config: " + "; ".join(problems) + "."


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def with_settings(config: PipelineConfig, candidate: dict[str, Any]) -> PipelineConfig:
    """``config`` with the candidate's dotted settings applied in order (validated like any config). A
    setting dumped only once an earlier one is in place (eval.decoding.plausibility after
    eval.decoding.method: rose) is found by validating what is set so far."""
    raw = config.model_dump(mode="json")
    for key, value in candidate.items():
        key = current_setting(key)
        node = _parent_of(raw, key)
        if node is None:
            raw = build_config(overrides=raw).model_dump(mode="json")
            node = _parent_of(raw, key)
        if node is None:
            raise ConfigError(f"unknown setting {key!r}.", "name a key that `safepatching config` prints")
        node[key.rsplit(".", 1)[-1]] = value
    return build_config(overrides=raw)


def _parent_of(raw: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The dict holding ``key``'s last part, or None when the dotted path is not there."""
    *parents, leaf = key.split(".")
    node: Any = raw
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) and leaf in node else None
