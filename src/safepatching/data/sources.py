"""Datasets: read prompt lists and (prompt, response) pairs from files, built-ins or the hub.

Also the chat-template formatting shared by training, scoring and generation, with the loss
restricted to response tokens.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import json
import logging
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from safepatching.config.settings import DATA_DIR_ENV, DatasetSpec
from safepatching.errors import DataError

log = logging.getLogger(__name__)
LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".txt")
_SPLIT_PATTERN = re.compile(r"^(?P<name>[\w.\-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


@dataclass
class Example:
    prompt: str
    response: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# Named benchmarks, read from the data directory (see its MANIFEST.md): name -> DatasetSpec fields.
NAMED_BENCHMARKS: dict[str, dict[str, Any]] = {
    "advbench": {"source": "data:advbench/harmful_behaviors.csv", "prompt_column": "goal"},
    "harmbench-val": {
        "source": "data:harmbench/harmbench_behaviors_text_val.csv",
        "prompt_column": "Behavior",
        "where": {"FunctionalCategory": "standard"},
        "category_column": "SemanticCategory",
    },
    "harmbench-test": {
        "source": "data:harmbench/harmbench_behaviors_text_test.csv",
        "prompt_column": "Behavior",
        "where": {"FunctionalCategory": "standard"},
        "category_column": "SemanticCategory",
    },
    "jbb": {
        "source": "data:jailbreakbench/jbb_behaviors_harmful_100.csv",
        "prompt_column": "Goal",
        "category_column": "Category",
    },
    "simple-safety-tests": {
        "source": "data:simple_safety_tests/simple_safety_tests.csv",
        "prompt_column": "prompts_final",
        "category_column": "harm_area",
    },
    "xstest-safe": {"source": "data:xstest/xstest_prompts.csv", "where": {"label": "safe"}, "category_column": "type"},
    "xstest-unsafe": {
        "source": "data:xstest/xstest_prompts.csv",
        "where": {"label": "unsafe"},
        "category_column": "type",
    },
    "oktest": {"source": "data:over_refusal/oktest/OKTest.csv"},
    "alpacaeval": {"source": "data:utility/alpaca_eval/alpaca_eval.jsonl", "prompt_column": "instruction"},
}


def resolve_named(spec: DatasetSpec) -> DatasetSpec:
    """Expand ``bench:NAME`` into its file, columns and filters; other specs pass through."""
    if not spec.source.startswith("bench:"):
        return spec
    name = spec.source.removeprefix("bench:")
    if name not in NAMED_BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}.", f"choose one of {', '.join(sorted(NAMED_BENCHMARKS))}")
    return spec.model_copy(update=NAMED_BENCHMARKS[name])


def _builtin_rows(name: str) -> list[dict[str, Any]]:
    if name == "uncensorbench":
        # Located without importing the package: only its data file is needed.
        path = importlib.metadata.distribution("uncensorbench").locate_file("uncensorbench/data/prompts.json")
        return json.loads(Path(path).read_text(encoding="utf-8"))["prompts"]
    own = {"benign-but-scary": "benign_but_scary.json", "harmless": "harmless.json"}
    if name not in own:
        raise DataError(
            f"unknown built-in dataset {name!r}.", f"choose builtin:uncensorbench or builtin:{'/'.join(own)}"
        )
    text = resources.files("safepatching.resources").joinpath(own[name]).read_text(encoding="utf-8")
    return json.loads(text)["prompts"]


def resolve_local_path(source: str, data_dir: Path | None) -> Path | None:
    """Return the file a source names, or None when it is a hub dataset id."""
    if source.startswith("data:"):
        if data_dir is None:
            raise DataError(
                f"{source} is relative to the data directory, which is not set.",
                f"pass --data-dir or set {DATA_DIR_ENV}",
            )
        path = Path(data_dir) / source.removeprefix("data:")
        if not path.exists():
            raise DataError(f"{path} does not exist.", "check the data directory and the file name")
        return path
    path = Path(source).expanduser()
    if path.exists():
        return path
    if path.suffix in LOCAL_SUFFIXES or path.name.endswith(".gz") or source.startswith((".", "/", "~")):
        raise DataError(f"data file {source} does not exist.", "check the path")
    return None


def read_file_rows(path: Path) -> list[dict[str, Any]]:
    """Read CSV, JSON, JSONL or TXT (optionally gzipped) into a list of row dicts."""
    name = path.name.removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path} has an unsupported extension.", f"use one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}).", "re-encode it as UTF-8"
        ) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}.", "check the file and its permissions") from None
    try:
        if suffix == ".csv":
            return list(csv.DictReader(text.splitlines()))
        if suffix == ".txt":
            return [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
        if suffix == ".jsonl":
            return [_as_row(json.loads(line)) for line in text.splitlines() if line.strip()]
        return [_as_row(item) for item in _unwrap_json(json.loads(text))]
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}).", "fix the file or convert it to CSV/JSONL") from None


def _unwrap_json(payload: Any) -> list[Any]:
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict):
        lists = [value for value in payload.values() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]
    raise DataError("a JSON dataset must be a list of rows or an object holding one list.", "reshape the file")


def _as_row(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    if isinstance(item, str):
        return {"prompt": item}
    raise DataError(f"dataset rows must be objects or strings, got {type(item).__name__}.", "reshape the file")


def _hub_rows(source: str, config: str | None, split_name: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError("hub datasets need the `datasets` package.", "pip install datasets") from None
    try:
        loaded = datasets.load_dataset(source, config, split=split_name)
    except Exception as exc:  # datasets raises many unrelated types for missing or offline data
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load dataset {source!r} split {split_name!r}: {message}", "check the id") from None
    return [dict(row) for row in loaded]


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    match = _SPLIT_PATTERN.match(split.strip())
    if not match:
        raise DataError(f"cannot read split {split!r}.", "write it like train, train[:100] or train[80%:]")
    return match["name"], match["start"], match["stop"]


def _bound(value: str | None, length: int) -> int | None:
    if value is None:
        return None
    if value.endswith("%"):
        return round(length * int(value[:-1]) / 100)
    return int(value)


def load_rows(spec: DatasetSpec, data_dir: Path | None = None) -> list[dict[str, Any]]:
    """All selected rows of a dataset spec: filtered, shuffled with its seed, then sliced."""
    spec = resolve_named(spec)
    name, start, stop = parse_split(spec.split)
    if spec.source.startswith("builtin:"):
        rows, local = _builtin_rows(spec.source.removeprefix("builtin:")), True
    else:
        path = resolve_local_path(spec.source, data_dir)
        local = path is not None and path.is_file()
        if local:
            rows = read_file_rows(path)
        else:  # a hub id, or a local folder that `datasets` can read like one
            rows = _hub_rows(str(path) if path else spec.source, spec.hub_config, name)
    if local and name != "train":
        raise DataError(f"{spec.source} is one file and has only the split 'train'.", "use train[...] to select rows")
    for column, wanted in spec.where.items():
        _require_column(rows, column, spec.source)
        accepted = {wanted} if isinstance(wanted, str) else set(wanted)
        rows = [row for row in rows if str(row[column]) in accepted]
    if spec.shuffle_seed is not None:
        rows = list(rows)
        random.Random(spec.shuffle_seed).shuffle(rows)
    rows = rows[_bound(start, len(rows)) : _bound(stop, len(rows))]
    if not rows:
        raise DataError(f"{spec.source} split {spec.split!r} selects no rows.", "check the split and filters")
    return rows


def _require_column(rows: list[dict[str, Any]], column: str, source: str) -> None:
    if rows and column not in rows[0]:
        raise DataError(
            f"{source} has no column {column!r} (columns: {', '.join(map(str, rows[0]))}).",
            "set prompt_column/response_column/where to existing columns",
        )


def load_examples(spec: DatasetSpec, data_dir: Path | None = None, limit: int | None = None) -> list[Example]:
    spec = resolve_named(spec)
    rows = load_rows(spec, data_dir)[:limit]
    _require_column(rows, spec.prompt_column, spec.source)
    if spec.response_column:
        _require_column(rows, spec.response_column, spec.source)
    if spec.category_column:
        _require_column(rows, spec.category_column, spec.source)
    examples = []
    for row in rows:
        prompt = str(row[spec.prompt_column] or "").strip()
        response = str(row[spec.response_column] or "").strip() if spec.response_column else None
        if not prompt or (spec.response_column and not response):
            continue
        meta = {k: v for k, v in row.items() if k not in (spec.prompt_column, spec.response_column)}
        examples.append(Example(prompt, response, meta))
    if not examples:
        raise DataError(f"{spec.source} has no rows with a non-empty prompt (and response).", "check the columns")
    return examples


def load_pairs(specs: list[DatasetSpec], data_dir: Path | None = None) -> list[Example]:
    """Examples of several sources, in order. A pair that an earlier source already gave (same prompt,
    case and spacing aside, and same response) is skipped, so overlapping sources do not count it
    twice; one source's rows, and other responses to the same prompt, are all kept."""
    pairs: list[Example] = []
    for spec in specs:
        given = {(normalise_prompt(e.prompt), e.response) for e in pairs}
        pairs += [e for e in load_examples(spec, data_dir) if (normalise_prompt(e.prompt), e.response) not in given]
    return pairs


def normalise_prompt(text: str) -> str:
    return " ".join(text.lower().split())
