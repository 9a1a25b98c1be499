"""The base of every settings model, and where a dataset lives (shared by every section)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetSpec(StrictModel):
    """Where a dataset lives and which rows and columns to use.

    ``source`` is ``builtin:NAME`` (data shipped with safepatching), ``bench:NAME`` (a named benchmark
    in the data directory, e.g. bench:advbench, bench:xstest-safe), ``data:RELATIVE/PATH`` (a file
    under the data directory setting), a local CSV/JSON/JSONL/TXT path, or a Hugging Face hub
    dataset id. ``split`` selects rows, e.g. ``train``, ``train[:100]``, ``train[80%:]``; local
    files have the single split ``train``. Rows are shuffled with ``shuffle_seed`` before slicing.
    """

    source: str = Field(description="builtin:NAME, bench:NAME, data:PATH, a local file or a hub dataset id")
    split: str = Field("train", description="rows to use, e.g. train, train[:100], train[80%:] (local files: train)")
    prompt_column: str = Field("prompt", description="column holding the prompt")
    response_column: str | None = Field(None, description="column holding the response (training pairs need one)")
    where: dict[str, str | list[str]] = Field(
        default_factory=dict, description="keep rows whose column equals the value (or one of the listed values)"
    )
    shuffle_seed: int | None = Field(
        None, description="shuffle the rows with this seed before slicing; null keeps the order"
    )
    hub_config: str | None = Field(None, description="the configuration name of a hub dataset")
    category_column: str | None = Field(None, description="column whose values split rates by category")
