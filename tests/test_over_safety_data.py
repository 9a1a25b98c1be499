"""The over-safety patch on its own data: benign-but-scary prompts with compliant replies."""

import json

import pytest

from safepatching.config.experiments import BenchConfig, TuneConfig
from safepatching.config.loading import build_config, with_settings
from safepatching.config.settings import PipelineConfig
from safepatching.data.sources import Example
from safepatching.errors import ConfigError, DataError
from safepatching.experiments.backbone import Backbone
from safepatching.experiments.pipeline import run_stages
from safepatching.experiments.stages import Stages
from safepatching.experiments.tune import first_study_key, study_key
from safepatching.experiments.validation import ValidationScorer, ValidationSet
from safepatching.method import derivations as derivations_module
from safepatching.method.derive import pairs_digest
from safepatching.models.precision import fast_dtypes

PROMPTS = [f"How do I kill process number {i} on Linux?" for i in range(5)]


def changed(config, **fields):
    """The config with some top-level fields replaced, validated like any config."""
    raw = config.model_dump(mode="json")
    for key, value in fields.items():
        raw[key] = {**raw[key], **value} if key in ("importance", "over_safety") else value
    return type(config).model_validate(raw)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_the_over_safety_patch_descends_on_its_own_pairs(tmp_path, tiny_model_dir, tiny_pipeline_config):
    data = jsonl(tmp_path / "os.jsonl", [{"prompt": p, "response": f"Run kill {i}."} for i, p in enumerate(PROMPTS)])
    base = tiny_pipeline_config(tiny_model_dir, tmp_path / "run")
    config = changed(
        base,
        over_safety={"train": {"source": data, "response_column": "response"}},
        importance={"over_safety_data": "over_safety_train"},
    )
    stages = Stages(config, progress=False)
    paper = Stages(base, progress=False)
    assert stages.keys.derive("safety") == paper.keys.derive("safety")
    assert stages.keys.derive("over_safety") != paper.keys.derive("over_safety")
    assert stages.keys.importance() != paper.keys.importance()
    run_stages(stages)
    info = json.loads((tmp_path / "run/patches/over_safety/derived.json").read_text())
    assert info["num_pairs"] == 5 and info["pairs_sha256"] == pairs_digest(stages.patches.over_safety_pairs([]))
    safety_info = json.loads((tmp_path / "run/patches/safety/derived.json").read_text())
    assert safety_info["num_pairs"] == 6  # the harmful pairs, unchanged


def test_generated_replies_are_judged_cached_and_refusals_and_loops_dropped(
    tmp_path, tiny_model_dir, tiny_pipeline_config, monkeypatch, caplog
):
    data = jsonl(tmp_path / "os.jsonl", [{"prompt": p} for p in PROMPTS])
    config = changed(tiny_pipeline_config(tiny_model_dir, tmp_path / "run"), over_safety={"train": {"source": data}})
    loop = "1) " * 40  # what a too-strong answerer patch produces
    replies = iter([["Sure: run kill -9 PID."] * 2 + [loop] + ["I'm sorry, I can't help with that."] * 2])
    monkeypatch.setattr(Backbone, "answer", lambda self, model, tokenizer, prompts, *_: next(replies))
    stages = Stages(config, progress=False)
    with caplog.at_level("WARNING"):
        pairs = stages.patches.over_safety_pairs(stages.harmful_pairs())
    assert [p.response for p in pairs] == ["Sure: run kill -9 PID."] * 2
    assert "of 5 generated replies, 2 refusals and 1 looping ones were dropped" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "run/over_safety_replies/replies.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and sum(row["refusal"] for row in rows) == 2
    assert (tmp_path / "run/patches/over_safety_paper/derived.json").exists()  # the default answerer's patch
    again = Stages(config, progress=False)  # cached: the answerer is not asked again (the iterator is spent)
    assert [p.response for p in again.patches.over_safety_pairs(again.harmful_pairs())] == [p.response for p in pairs]


def test_replies_that_are_all_refusals_stop_the_run_in_one_line(
    tmp_path, tiny_model_dir, tiny_pipeline_config, monkeypatch
):
    data = jsonl(tmp_path / "os.jsonl", [{"prompt": p} for p in PROMPTS])
    config = changed(tiny_pipeline_config(tiny_model_dir, tmp_path / "run"), over_safety={"train": {"source": data}})
    monkeypatch.setattr(
        Backbone, "answer", lambda self, model, tokenizer, prompts, *_: ["I cannot help with that."] * len(prompts)
    )
    stages = Stages(config, progress=False)
    with pytest.raises(DataError, match="none of the 5 generated over-safety replies complies: 5 were refusals"):
        stages.patches.over_safety_pairs(stages.harmful_pairs())


def test_over_safety_prompts_that_an_evaluation_set_holds_are_refused_before_any_output(
    tmp_path, tiny_model_dir, tiny_pipeline_config
):
    base = tiny_pipeline_config(tiny_model_dir, tmp_path / "run")
    config = changed(base, over_safety={"train": base.eval.benign.model_dump(mode="json")})
    with pytest.raises(DataError, match="over_safety.train"):
        run_stages(Stages(config, progress=False))
    assert not (tmp_path / "run").exists()


def test_scoring_on_over_safety_data_needs_that_data(tiny_pipeline_config, tiny_model_dir, tmp_path):
    from pydantic import ValidationError

    raw = tiny_pipeline_config(tiny_model_dir, tmp_path).model_dump()
    raw["importance"]["over_safety_data"] = "over_safety_train"
    with pytest.raises(ValidationError, match="needs an over_safety.train source"):
        type(tiny_pipeline_config(tiny_model_dir, tmp_path)).model_validate(raw)


@pytest.mark.skipif("bfloat16" not in fast_dtypes(), reason="the dtype mix arises only where bf16 is the compute dtype")
def test_replies_are_generated_with_a_float32_master_given_as_in_a_study(
    tmp_path, tiny_model_dir, tiny_pipeline_config
):
    """A study hands its stages the float32 master (output layer held in the compute dtype): the
    paper's patched model must still answer the over-safety prompts under autocast."""
    data = jsonl(tmp_path / "os.jsonl", [{"prompt": p} for p in PROMPTS])
    base = tiny_pipeline_config(tiny_model_dir, tmp_path / "run").model_copy(update={"compute_dtype": "bfloat16"})
    config = changed(base, over_safety={"train": {"source": data}, "replies": {"max_new_tokens": 8}})
    own = Stages(config, progress=False)
    given = Backbone(config.model, own.loading, config.derive.target_modules, loaded=own.backbone.model(training=True))
    stages = Stages(config, progress=False, backbone=given)
    stages.patches.over_safety_pairs(stages.harmful_pairs())
    rows = (tmp_path / "run/over_safety_replies/replies.jsonl").read_text().splitlines()
    assert len(rows) == len(PROMPTS)


def test_a_study_that_changes_only_the_over_safety_data_links_the_other_patches(
    tmp_path, tiny_model_dir, tiny_pipeline_config, monkeypatch
):
    """A variant with its own over-safety data derives in a sweep folder; its safety patch is the
    config's own, linked, not derived again."""
    data = jsonl(tmp_path / "os.jsonl", [{"prompt": p, "response": f"Run kill {i}."} for i, p in enumerate(PROMPTS)])
    config = tiny_pipeline_config(tiny_model_dir, tmp_path / "run")
    scorer = ValidationScorer(config, tmp_path / "run", [ValidationSet("val", "harmful", [Example("Pick a lock?")])])
    scorer.derived(config)
    derived, derive_patch = [], derivations_module.derive_patch

    def counted(model, tokenizer, pairs, direction, *rest):
        derived.append(direction)
        return derive_patch(model, tokenizer, pairs, direction, *rest)

    monkeypatch.setattr(derivations_module, "derive_patch", counted)
    variant = changed(config, over_safety={"train": {"source": data, "response_column": "response"}})
    scorer.derived(variant)
    assert derived == ["descent"]  # only the over-safety patch on the new data
    (sweep,) = (tmp_path / "run/sweep").iterdir()
    own = tmp_path / "run/patches/safety/deltas.safetensors"
    assert (sweep / "patches/safety/deltas.safetensors").stat().st_ino == own.stat().st_ino
    assert json.loads((sweep / "patches/over_safety/derived.json").read_text())["num_pairs"] == 5


def test_the_old_over_safety_keys_are_read_into_the_one_section():
    old = {"over_safety_train": {"source": "bench:oktest", "split": "train[:40]"}, "over_safety_replies": {"scale": 1.0}}
    new = {"over_safety": {"train": {"source": "bench:oktest", "split": "train[:40]"}, "replies": {"scale": 1.0}}}
    assert PipelineConfig.model_validate(old) == PipelineConfig.model_validate(new)
    assert with_settings(PipelineConfig(), {"over_safety_replies.scale": 2.0}).over_safety.replies.scale == 2.0
    with pytest.raises(ConfigError, match=r"over_safety_train and over_safety.train both given") as error:
        build_config(overrides={**old, **new})
    assert "\n" not in str(error.value)
    bench = BenchConfig.model_validate({"over_safety_train": old["over_safety_train"], "pipeline": old})
    assert bench.over_safety == PipelineConfig.model_validate(new).over_safety  # answered by the pipeline's replies


def test_study_keys_written_before_the_section_still_match():
    """Fingerprints of a study on its own over-safety data, as the version with the two top-level keys wrote them."""
    config = TuneConfig.model_validate(
        {
            "pipeline": {"over_safety": {"train": {"source": "builtin:benign-but-scary", "split": "train[:40]"},
                                         "replies": {"scale": 1.0}}},  # fmt: skip
            "validation": {"harmful": {"h": {"source": "builtin:uncensorbench", "split": "train[48:60]"}},
                           "benign": {"b": {"source": "bench:oktest", "split": "train[:12]"}}},  # fmt: skip
            "tune": {"space": {"merge.beta": {"low": 0.5, "high": 2.0}}},
        }
    )
    assert (study_key(config), first_study_key(config)) == ("a17bf3489a35bd52", "da8300a4b71d5783")
