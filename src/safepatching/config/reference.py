"""The settings reference (docs/configuration.md), generated from the pydantic models themselves so
that it cannot drift from the code: `safepatching config --reference` prints it, and a test fails
when the committed file differs."""

from __future__ import annotations

import json
import os
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from safepatching.config.experiments import BenchConfig, ContinualConfig, SweepConfig, TuneConfig
from safepatching.config.settings import DATA_DIR_ENV, DatasetSpec, PipelineConfig, StrictModel

SECTIONS = (
    (PipelineConfig, "`safepatching run` / `demo` / the stage commands (and every experiment's `pipeline:`)"),
    (TuneConfig, "`safepatching tune`"),
    (BenchConfig, "`safepatching bench`"),
    (ContinualConfig, "`safepatching continual`"),
    (SweepConfig, "`safepatching sweep` (its flags)"),
    (DatasetSpec, "A dataset (`DatasetSpec`: every `harmful_train`, `eval.*` set and validation set)"),
)
LEAF_MODELS = (PipelineConfig, DatasetSpec)  # shown as one value: each has a table of its own
HEADER = """# Configuration reference

Generated from the pydantic models by `safepatching config --reference > docs/configuration.md`;
`tests/test_docs.py` fails when this file is stale. Unknown keys are errors. A YAML file, `--set
dotted.key=value` and the Python API fill the same models; see [the guide](guide.md) for how.
"""


def nested_model(annotation: Any) -> type[StrictModel] | None:
    """The settings model a field holds directly or as ``Model | None`` (expanded in place)."""
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, StrictModel)]
    return models[0] if len(models) == 1 and models[0] not in LEAF_MODELS else None


def type_name(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"\b(?:typing|pathlib|safepatching\.[a-z_.]+)\.", "", text)
    text = re.sub(r"\bLiteral\[([^\]]*)\]", lambda m: m.group(1).replace(", ", " | "), text)
    return text.replace("|", "\\|").replace("\\\\|", "\\|").replace("NoneType", "None")


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = json.dumps(value, default=str)
    return f"`{text}`" if len(text) <= 110 else f"`{text[:107]}...`"


def rows(model: type[StrictModel], prefix: str = "") -> list[str]:
    """One table row per setting, nested models expanded under their dotted keys (an optional one
    also gets a row of its own, since null is its default)."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        about = (field.description or "").replace("|", "\\|").replace("\n", " ")
        inner = nested_model(field.annotation)
        if inner is not None:
            if field.default is None or field.description:
                out.append(f"| `{key}` | {type_name(field.annotation)} | {default_text(field)} | {about} |")
            out += rows(inner, f"{key}.")
            continue
        default = default_text(field)
        if field.annotation is PipelineConfig:
            about, default = "a pipeline config", "the first table's defaults"
        out.append(f"| `{key}` | {type_name(field.annotation)} | {default} | {about} |")
    return out


def settings_reference() -> str:
    """Markdown of every setting with its type, default and meaning (defaults read with the data
    directory variable unset, so the file does not depend on the machine that wrote it)."""
    saved = os.environ.pop(DATA_DIR_ENV, None)
    try:
        parts = [HEADER]
        for model, title in SECTIONS:
            doc = " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())
            parts += [f"\n## {title}\n\n{doc}\n", "| key | type | default | meaning |", "|---|---|---|---|"]
            parts += rows(model)
        return "\n".join(parts) + "\n"
    finally:
        if saved is not None:
            os.environ[DATA_DIR_ENV] = saved
