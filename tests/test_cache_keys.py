"""Stage keys are part of the run folder's format: keys written by an earlier version must still
match, or every cached patch, score and evaluation of a user's runs is silently recomputed."""

import json
from pathlib import Path

import pytest
from pydantic import Field

from safepatching.config.identity import ADDED_LATER, HELD_RUN_OPTION, RUN_OPTION, cache_identity, only_with
from safepatching.config.settings import (
    DeriveConfig,
    EvalConfig,
    ImportanceConfig,
    MergeConfig,
    PipelineConfig,
    StrictModel,
)
from safepatching.experiments.stages import Stages
from safepatching.storage.cache import KEY_SCHEMA, STAGE_FILE, cached

WRITTEN = json.loads((Path(__file__).parent / "data" / "stage_keys_v1.json").read_text())


@pytest.mark.parametrize("case", WRITTEN["cases"], ids=lambda case: case["case"])
def test_keys_written_before_the_stages_split_still_match(case):
    config = PipelineConfig(**case["settings"], compute_dtype="float32", output_dir="/tmp/unused", data_dir="/data")
    keys = Stages(config, progress=False, evaluates=False).keys  # only the keys: "/data" is not read
    assert {
        "derive safety": keys.derive("safety"),
        "derive over_safety": keys.derive("over_safety"),
        "importance": keys.importance(),
        "merge": keys.merge(),
        "backbone eval": keys.backbone_eval(),
    } == case["keys"]


class Section(StrictModel):
    shaping: int = 1
    run_option: int = Field(1, json_schema_extra=RUN_OPTION)
    held: int = Field(1, json_schema_extra=HELD_RUN_OPTION)
    later: str = Field("old", json_schema_extra=ADDED_LATER)
    tokens: int = Field(8, json_schema_extra=only_with(later="new"))


class Outer(StrictModel):
    inner: Section = Section()


def test_one_rule_leaves_out_run_options_and_later_settings_at_their_defaults_in_every_section():
    assert cache_identity(Outer()) == {"inner": {"shaping": 1, "held": 1}}
    changed = Outer(inner=Section(shaping=2, run_option=5, held=5, later="new", tokens=9))
    assert cache_identity(changed) == {"inner": {"shaping": 2, "held": 1, "later": "new", "tokens": 9}}


def test_the_settings_sections_mark_what_changes_no_result():
    assert cache_identity(DeriveConfig(checkpoint_every_steps=3, memory_check=False)) == cache_identity(DeriveConfig())
    assert cache_identity(MergeConfig(shard_size_mb=10)) == cache_identity(MergeConfig())
    assert cache_identity(EvalConfig(vllm_gpu_memory_utilization=0.9)) == cache_identity(EvalConfig())
    assert "own_reply_tokens" not in cache_identity(ImportanceConfig(own_reply_tokens=64))
    assert cache_identity(ImportanceConfig(loss_on="own_replies"))["own_reply_tokens"] == 96


def test_a_stage_of_another_key_schema_is_recomputed(tmp_path, monkeypatch):
    made = []
    produce = lambda: made.append(1)  # noqa: E731
    cached(tmp_path, "k", produce, lambda: "loaded")
    assert json.loads((tmp_path / STAGE_FILE).read_text())["key_schema"] == KEY_SCHEMA
    assert cached(tmp_path, "k", produce, lambda: "loaded") == "loaded" and len(made) == 1
    record = json.loads((tmp_path / STAGE_FILE).read_text())
    del record["key_schema"]  # as stages written before the schema was recorded
    (tmp_path / STAGE_FILE).write_text(json.dumps(record))
    assert cached(tmp_path, "k", produce, lambda: "loaded") == "loaded"
    monkeypatch.setattr("safepatching.storage.cache.KEY_SCHEMA", KEY_SCHEMA + 1)
    cached(tmp_path, "k", produce, lambda: "loaded")
    assert len(made) == 2
