import json

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM

from safepatching.config.identity import cache_identity
from safepatching.config.settings import PipelineConfig
from safepatching.errors import DataError
from safepatching.experiments.compare import compare_models
from safepatching.experiments.pipeline import run_pipeline, run_stages
from safepatching.experiments.stages import Stages
from safepatching.method.dense import load_dense_patch
from safepatching.method.merge_methods import MERGE_METHODS
from safepatching.method.merger import PatchMerger
from safepatching.patchfile.sparse import export_patch, inspect_patch, provenance_from_model
from safepatching.report.results import summary_schema
from safepatching.storage.cache import fingerprint
from safepatching.storage.files import load_tensors


def test_pipeline_end_to_end_writes_a_loadable_patched_model(tmp_path, tiny_model_dir, tiny_pipeline_config):
    config = tiny_pipeline_config(tiny_model_dir, tmp_path / "run")
    result = run_pipeline(config, progress=False)
    model_dir = result.model_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (model_dir / name).exists(), name
    assert "base_model:" in (model_dir / "README.md").read_text()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    safety = load_dense_patch(tmp_path / "run/patches/safety")
    over = load_dense_patch(tmp_path / "run/patches/over_safety")
    scores = [load_tensors(tmp_path / f"run/importance/{k}.safetensors") for k in ("safety", "over_safety")]
    deltas, counts = PatchMerger(safety, over, config.merge, config.seed, *scores).merge_all()
    base_params, merged_params = dict(base.named_parameters()), dict(merged.named_parameters())
    for name, param in merged_params.items():
        expected = base_params[name] + deltas.get(name, 0)
        assert torch.allclose(param, expected, atol=1e-6), name
    assert 0 < counts["changed_fraction"] < 0.4
    assert counts["intersection"] > 0 and counts["safety_only"] > 0

    summary = json.loads((tmp_path / "run/summary.json").read_text())
    jsonschema.validate(summary, summary_schema())
    assert summary["schema_version"] == 2
    assert summary["backbone"]["kl_to_reference"] is None
    assert summary["patched"]["kl_to_reference"] > 0
    records = (tmp_path / "run/eval/patched/records.jsonl").read_text().splitlines()
    assert len(records) == 9 and {"prompt", "response", "refusal"} <= json.loads(records[0]).keys()
    for stage in ("derive_safety", "derive_over_safety", "merge", "eval_backbone", "eval_patched"):
        recorded = summary["stages"][stage]
        assert recorded["wall_seconds"] >= 0 and recorded["peak_rss_gib"] >= recorded["peak_anonymous_gib"] > 0
    geometry = summary["geometry"]
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([safety.deltas[n].reshape(-1) for n in safety.deltas]),
        torch.cat([over.deltas[n].reshape(-1) for n in safety.deltas]),
        dim=0,
    )
    assert geometry["cosine"] == pytest.approx(float(cosine), abs=1e-5)
    assert geometry["regions"]["safety_only"] == pytest.approx(counts["safety_only"] / counts["entries"])
    assert 0 < geometry["regions"]["overlap_jaccard"] < 1
    export_patch(tiny_model_dir, model_dir, tmp_path / "patch", provenance_from_model(model_dir), progress=False)
    assert inspect_patch(tmp_path / "patch")["geometry"] == geometry


def test_rerun_reuses_finished_stages_and_redoes_changed_ones(tmp_path, tiny_model_dir, tiny_pipeline_config):
    run_pipeline(tiny_pipeline_config(tiny_model_dir, tmp_path / "run"), progress=False)
    patch_mtime = (tmp_path / "run/patches/safety/deltas.safetensors").stat().st_mtime_ns
    again = Stages(tiny_pipeline_config(tiny_model_dir, tmp_path / "run", alpha=0.5), progress=False)
    run_stages(again)
    assert (tmp_path / "run/patches/safety/deltas.safetensors").stat().st_mtime_ns == patch_mtime
    assert "derive_safety" not in again.meter and "eval_backbone" not in again.meter
    assert "merge" in again.meter and "eval_patched" in again.meter


def test_by_default_a_run_keeps_its_model_and_results_and_drops_what_only_new_settings_need(
    tmp_path, tiny_model_dir, tiny_pipeline_config, capsys
):
    run_pipeline(tiny_pipeline_config(tiny_model_dir, tmp_path / "run", keep="model"), progress=False)
    kept = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert kept == ["config.yaml", "eval", "model", "summary.json", "summary.md"]
    printed = capsys.readouterr().err
    assert [line[:5] for line in printed.splitlines() if line.startswith("[")] == [f"[{i}/7]" for i in range(1, 8)]
    assert "holds" in printed and "next:" in printed and "safepatching inspect" in printed

    same = Stages(tiny_pipeline_config(tiny_model_dir, tmp_path / "run", keep="model"), progress=False)
    run_stages(same)  # finished: the merge and both evaluations are answered from disk
    assert not {"derive_safety", "merge", "eval_backbone", "eval_patched"} & same.meter.keys()
    changed = Stages(tiny_pipeline_config(tiny_model_dir, tmp_path / "run", keep="model", alpha=0.5), progress=False)
    run_stages(changed)  # new merge settings need the patches again: they are derived anew
    assert {"derive_safety", "merge", "eval_patched"} <= changed.meter.keys() and "eval_backbone" not in changed.meter


def test_task_arithmetic_skips_importance(tmp_path, tiny_model_dir, tiny_pipeline_config):
    assert not MERGE_METHODS["task_arithmetic"].needs_importance
    run_pipeline(tiny_pipeline_config(tiny_model_dir, tmp_path / "run", method="task_arithmetic"), progress=False)
    assert not (tmp_path / "run/importance").exists()


def test_extra_training_sources_are_deduplicated_and_can_drop_evaluation_prompts(tmp_path):
    # The default harmful_train is uncensorbench rows 0-47 and the default harmful eval set rows 100-149
    # (both after a seed-0 shuffle).
    rows = {"source": "builtin:uncensorbench", "shuffle_seed": 0, "response_column": "uncensored_response"}
    plain = Stages(PipelineConfig(output_dir=tmp_path), progress=False)
    c = plain.config
    assert plain.keys.derive() == fingerprint(
        c.model, c.seed, plain.compute_dtype, c.harmful_train, cache_identity(c.derive)
    )

    widened = Stages(
        PipelineConfig(output_dir=tmp_path, harmful_train_extra=[{**rows, "split": "train[40:50]"}]), progress=False
    )
    assert len(widened.harmful_pairs()) == 50  # rows 40-47 occur in both sources and are kept once
    assert widened.harmful_pairs()[:48] == plain.harmful_pairs()
    assert widened.keys.derive() != plain.keys.derive()

    overlapping = PipelineConfig(output_dir=tmp_path, harmful_train_extra=[{**rows, "split": "train[90:110]"}])
    with pytest.raises(DataError, match="also occur"):
        Stages(overlapping, progress=False).data.eval_sets(Stages(overlapping).harmful_pairs())
    dropping = PipelineConfig(**{**overlapping.model_dump(), "drop_eval_overlap": True})
    pairs = Stages(dropping).harmful_pairs()
    assert len(pairs) == 58  # rows 100-109 dropped
    evaluation = Stages(dropping, progress=False).data.eval_sets(pairs).named()
    assert not {e.prompt for e in pairs} & {e.prompt for examples in evaluation.values() for e in examples}


def test_compare_models_writes_side_by_side_summary(tmp_path, tiny_model_dir, make_tiny_model, tiny_pipeline_config):

    other = make_tiny_model(tmp_path / "other", seed=1)
    config = tiny_pipeline_config(tiny_model_dir, tmp_path / "unused")
    summary = compare_models(
        [str(tiny_model_dir), str(other)], config, tmp_path / "cmp", progress=False, command="safepatching eval X"
    )
    jsonschema.validate(json.loads((tmp_path / "cmp/summary.json").read_text()), summary_schema())
    assert summary["schema_version"] == 2 and list(summary["models"]) == [str(tiny_model_dir), str(other)]
    assert summary["models"][str(tiny_model_dir)]["kl_to_reference"] is None
    assert summary["models"][str(other)]["kl_to_reference"] > 0
    table = (tmp_path / "cmp/summary.md").read_text()
    assert table.count("|") > 10 and "KL to backbone" in table
    assert table.startswith("command: `safepatching eval X`") and summary["command"] == "safepatching eval X"
    assert (tmp_path / "cmp/1-other/records.jsonl").exists()
    stats = {(row["set"], row["model"]): row for row in summary["statistics"]}
    benign = stats[("benign", str(other))]
    assert (
        benign["measure"] == "refusal" and benign["n"] == 3 and benign["ci_low"] <= benign["rate"] <= benign["ci_high"]
    )
    assert (
        0 <= benign[f"p_vs_{tiny_model_dir}"] <= 1 and stats[("harmful", str(other))]["measure"] == "harmful response"
    )
    assert "Wilson" in table and "p vs" in table
    metrics_schema = {**summary_schema()["$defs"]["metrics"], "$defs": summary_schema()["$defs"]}
    jsonschema.validate(json.loads((tmp_path / "cmp/1-other/metrics.json").read_text()), metrics_schema)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(schema_version=1),
        lambda s: s["models"]["m"].pop("harmful_refusal_rate"),
        lambda s: s["models"]["m"].update(benign_refusal_rate=140.0),
        lambda s: s["models"]["m"].update(judge_unparsed="none"),
        lambda s: s["models"]["m"]["safety_benchmarks"]["advbench"].pop("count"),
        lambda s: s.pop("models"),
    ],
)
def test_schema_rejects_malformed_summaries(change):
    rates = {"harmful_refusal_rate": 50.0, "harmful_response_rate": 50.0, "benign_refusal_rate": 10.0,
             "harmless_refusal_rate": 0.0, "harmful_response_rate_by_category": {"a": 50.0},
             "jailbreak_harmful_response_rate": {"dan": 70.0}, "judge_unparsed": 0, "kl_to_reference": None,
             "safety_benchmarks": {"advbench": {"harmful_response_rate": 4.0, "by_category": {}, "count": 25}},
             "counts": {"harmful": 2, "benign": 2, "harmless": 1}, "wall_seconds": 1.0}  # fmt: skip
    summary = {"schema_version": 2, "safepatching": "0.1.0", "reference": "m", "eval": {}, "models": {"m": rates}}
    jsonschema.validate(summary, summary_schema())
    change(summary)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(summary, summary_schema())


def test_run_options_leave_the_cache_keys(tmp_path, tiny_model_dir, tiny_pipeline_config):
    run_pipeline(tiny_pipeline_config(tiny_model_dir, tmp_path / "run"), progress=False)
    resharded = tiny_pipeline_config(tiny_model_dir, tmp_path / "run")
    resharded.merge.shard_size_mb = 1
    resharded.eval.vllm_gpu_memory_utilization = 0.9
    again = Stages(resharded, progress=False)
    run_stages(again)
    assert not {"merge", "eval_backbone", "eval_patched"} & set(again.meter)


def test_a_backbone_too_big_for_the_machine_fails_before_any_patch(
    tiny_model_dir, tmp_path, monkeypatch, tiny_pipeline_config
):
    from collections import namedtuple

    from safepatching.errors import ConfigError
    from safepatching.experiments import backbone as backbone_module
    from safepatching.method.memory import GIB, ModelSize, check_training_fits, training_bytes

    memory = namedtuple("memory", "total")
    monkeypatch.setattr(backbone_module.psutil, "virtual_memory", lambda: memory(5 * GIB))
    with pytest.raises(ConfigError, match="needs about 1.5 GiB, but this machine has 5.0 GiB"):
        run_pipeline(tiny_pipeline_config(tiny_model_dir, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "patches").exists()

    # the 1.5B backbone's counts and shapes on a 23.5 GiB machine: full fine-tuning is refused, LoRA named
    # as the fix; scoring's activations (640 tokens through 28 layers, 3.4 GiB) are counted
    big = ModelSize(1_777_088_000, 1_310_253_056, hidden_size=1536, intermediate_size=8960, layers=28)
    full, importance = PipelineConfig().derive, PipelineConfig().importance
    with pytest.raises(ConfigError, match=r"needs about 23.0 GiB.*set derive.method=lora \(about 16.4 GiB\)"):
        check_training_fits("big", big, full, importance, int(23.5 * GIB))
    check_training_fits("big", big, full.model_copy(update={"method": "lora"}), importance, int(23.5 * GIB))
    check_training_fits("big", big, full.model_copy(update={"memory_check": False}), importance, GIB)
    shapeless = ModelSize(big.total_params, big.target_params)  # a config without layer shapes: no activations
    lora = full.model_copy(update={"method": "lora"})
    assert training_bytes(big, lora, importance) - training_bytes(shapeless, lora, importance) == (
        4 * (4 * 160) * 28 * (10 * 1536 + 4 * 8960)  # float32, batch 4 x 160 tokens, 28 layers kept in full
    )
    with pytest.raises(ConfigError, match="use a machine with more memory"):
        check_training_fits("big", big, full, importance, 12 * GIB)
