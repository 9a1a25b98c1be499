"""The one rule for what a cached stage's key holds of a settings section.

A field's ``json_schema_extra`` may carry a cache rule:

- ``RUN_OPTION``: it changes no result (checkpoint frequency, shard size); it is left out.
- ``HELD_RUN_OPTION``: the same, for run options that were keyed before they were recognised as
  such; they are held at their default, so the keys of that time stay valid.
- ``ADDED_LATER``: a setting added after keys were first written; it joins only when changed.
- ``only_with(field=value)``: it shapes the result only while another field has that value.

``cache_identity`` applies these to ``model_dump(mode="json")`` (so a model's own serializers still
decide what it dumps), in every nested section. Keys are part of the run folder's format:
``tests/test_cache_keys.py`` holds keys written by an earlier version.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

RULE = "cache"
RUN_OPTION = {RULE: "run_option"}
HELD_RUN_OPTION = {RULE: "held_run_option"}
ADDED_LATER = {RULE: "added_later"}


def only_with(**condition: Any) -> dict[str, Any]:
    return {RULE: {"only_with": condition}}


def cache_identity(model: BaseModel) -> dict[str, Any]:
    """What a stage key holds of ``model``: its JSON dump less what its fields' cache rules leave out."""
    return _apply(model, model.model_dump(mode="json"))


def _apply(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    for name, field in type(model).model_fields.items():
        if name not in dumped:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        rule = extra.get(RULE)
        value = getattr(model, name)
        default = field.get_default(call_default_factory=True)
        if rule == "run_option" or (rule == "added_later" and value == default):
            del dumped[name]
        elif rule == "held_run_option":
            dumped[name] = default
        elif isinstance(rule, dict) and any(getattr(model, k) != v for k, v in rule["only_with"].items()):
            del dumped[name]
        elif isinstance(value, BaseModel) and isinstance(dumped[name], dict):
            _apply(value, dumped[name])
    return dumped
