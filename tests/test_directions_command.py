"""`safepatching directions` on the tiny model with built-in sets: the report, the saved directions,
and the one-line refusals of bad sets."""

import json

import pytest
from safetensors.torch import load_file

from safepatching.config.experiments import DirectionsConfig
from safepatching.config.settings import PipelineConfig
from safepatching.data.sources import load_examples
from safepatching.errors import DataError
from safepatching.experiments.directions import run_directions

SETS = {
    "harmful": {"source": "builtin:uncensorbench", "split": "train[:20]", "shuffle_seed": 0},
    "harmless": {"source": "builtin:harmless", "split": "train[2:]"},  # rows 0-1 are evaluated
    "benign": {"source": "builtin:benign-but-scary", "split": "train[5:25]"},  # rows 0-4 are evaluated
}


def directions_config(model_dir, out, bench_pipeline, **changes):
    pipeline = PipelineConfig(**bench_pipeline(model_dir), output_dir=out / "run")
    return DirectionsConfig(**{"pipeline": pipeline, "output_dir": out, "batch_size": 8, **SETS, **changes})


def test_the_report_has_a_row_per_layer_and_the_directions_are_saved(tmp_path, tiny_model_dir, bench_pipeline):
    config = directions_config(tiny_model_dir, tmp_path, bench_pipeline)
    result = run_directions(config, "safepatching directions", progress=False)
    assert [row["layer"] for row in result["layers"]] == [0, 1]
    assert result["sizes"] == {"harmful": 20, "harmless": 22, "benign": 20}
    first, second = result["layers"]
    assert first["norm_r"] == 0 and first["norm_v"] == 0  # layer 0's input at the last position: one token's embedding
    assert second["norm_r"] > 0 and -1 <= second["cos_r_v"] <= 1 and 0 <= second["probe_harmful_vs_benign"] <= 100
    low, high = second["probe_harmful_vs_benign_95ci"]
    assert low <= second["probe_harmful_vs_benign"] <= high and second["probe_harmful_vs_benign_held_out"] == 10
    saved = json.loads((tmp_path / "directions.json").read_text())
    assert saved["layers"] == result["layers"] and saved["device"]["kind"] == "cpu"
    tensors = load_file(tmp_path / "directions.safetensors")
    assert tensors["refusal"].shape == (2, result["positions"], 32) and tensors["false_refusal"].shape == (2, result["positions"], 32)
    assert "| layer | norm r |" in (tmp_path / "directions.md").read_text()


def test_a_set_sharing_an_evaluation_prompt_or_too_small_is_refused(tmp_path, tiny_model_dir, bench_pipeline):
    overlapping = directions_config(tiny_model_dir, tmp_path, bench_pipeline, benign={"source": "builtin:benign-but-scary"})
    with pytest.raises(DataError, match="directions benign set"):
        run_directions(overlapping, progress=False)
    small = directions_config(tiny_model_dir, tmp_path, bench_pipeline, harmless={"source": "builtin:harmless", "split": "train[2:10]"})
    with pytest.raises(DataError, match="has 8 prompts; directions need 16"):
        run_directions(small, progress=False)
    assert not (tmp_path / "directions.json").exists()


def test_the_shipped_sets_are_in_the_data_directory():
    defaults = DirectionsConfig()
    sizes = [len(load_examples(getattr(defaults, name), defaults.pipeline.data_dir)) for name in ("harmful", "harmless", "benign")]
    assert sizes == [260, 300, 200]


def test_the_refusal_filter_keeps_what_the_judge_calls_refused_and_too_few_fail_in_one_line(
    tmp_path, tiny_model_dir, bench_pipeline
):
    from safepatching.evaluation.judges.rules import Verdict
    from safepatching.experiments.directional import refused_only
    from safepatching.models.loading import load_model

    model, tokenizer = load_model(str(tiny_model_dir), loading=PipelineConfig().loading.model_copy(
        update={"compute_dtype": "float32"}))  # fmt: skip
    prompts = [e.prompt for e in load_examples(DirectionsConfig(**SETS).benign, None)]
    refused = set(prompts[::2])
    judge = lambda prompt, reply: Verdict("full_refusal" if prompt in refused else "full_compliance")  # noqa: E731
    kept = refused_only(model, tokenizer, DirectionsConfig(**SETS), prompts + prompts[:12], judge, 4)
    assert kept == [p for p in prompts + prompts[:12] if p in refused]
    # the tiny random model refuses nothing under the rule judge: the filter leaves too few, in one line
    config = directions_config(tiny_model_dir, tmp_path, bench_pipeline, benign_refused_only=True, refusal_max_new_tokens=4)
    with pytest.raises(DataError, match=r"the backbone refuses 0 of the 20 benign direction prompts"):
        run_directions(config, progress=False)


def test_the_refused_vs_answered_probe_uses_the_backbones_own_refusals(tmp_path, tiny_model_dir, bench_pipeline, monkeypatch):
    from safepatching.experiments import directions

    def every_other(model, tokenizer, prompts, judge, max_new_tokens, batch_size):
        return [i % 2 == 0 for i in range(len(prompts))]

    monkeypatch.setattr(directions, "refusals", every_other)
    result = run_directions(directions_config(tiny_model_dir, tmp_path, bench_pipeline), progress=False)
    assert result["refused"] == {"harmful": 10, "benign": 10}
    row = result["layers"][1]
    assert 0 <= row["probe_refused_vs_answered"] <= 100 and row["probe_refused_vs_answered_held_out"] == 10
    markdown = (tmp_path / "directions.md").read_text()
    assert "probe refused/answered (%)" in markdown and "| sublayer | probe answered/refused (%) |" in markdown
    names = [row["sublayer"] for row in result["sublayers"]]
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]  # fmt: skip
    for row in result["sublayers"]:
        low, high = row["probe_answered_vs_refused_95ci"]
        assert low <= row["probe_answered_vs_refused"] <= high and -1 <= row["cos_answer_benign"] <= 1
