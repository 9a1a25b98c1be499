"""Directional rows in a tuned bench on a tiny model: edit-only rows derive nothing, a study searches
the edit's layer and scale, harmless refusal is a constraint, and a bad layer fails in one line. The
random model refuses nothing, so align's answered/refused labels come from a stubbed judge."""

import json

import pytest
import torch

from safepatching.config.experiments import BenchConfig
from safepatching.config.loading import build_config
from safepatching.errors import ConfigError
from safepatching.experiments.bench import Bench, run_bench
from safepatching.method.directions import configured_edits, projection_deltas, residual_writers
from safepatching.storage.files import load_tensors

SPACES = {
    "directional-ablate": {
        "directional.ablate_layer": {"low": 0, "high": 1, "integer": True},
        "directional.ablate_scale": {"low": 0.5, "high": 1.0},
    },
}
METHODS = ["backbone", "directional-ablate", "directional-add", "directional-align"]


def every_other_refused(model, tokenizer, prompts, *rest):
    return [i % 2 == 0 for i in range(len(prompts))]


@pytest.fixture(scope="module")
def directional(tmp_path_factory, tiny_model_dir, bench_pipeline, tuned_bench_config):
    from safepatching.experiments import directional as stage

    root = tmp_path_factory.mktemp("directional-bench")
    settings = tuned_bench_config(bench_pipeline, tiny_model_dir, root, "tiny-directional", METHODS, SPACES,
                                  max_harmless_refusal=100.0, max_harmful_drop=100.0)  # fmt: skip
    config = build_config(overrides=settings, model=BenchConfig)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage, "refusals", every_other_refused)
        return root, config, run_bench(config, "safepatching bench tiny-directional.yaml", progress=False)


def test_edit_only_rows_derive_no_patch_and_share_one_directions_stage(directional):
    root, _, result = directional
    assert list(result["methods"]) == METHODS
    assert not (root / "work/patches").exists()
    stages = {path.parent.name: path for path in (root / "work/directions").glob("*/*.safetensors")}
    assert sorted(path.name for path in stages.values()) == ["alignment.safetensors", "directions.safetensors"]
    directions = load_tensors(next(p for p in stages.values() if p.name == "directions.safetensors"))
    assert directions["refusal"].shape[:1] == (2,) and directions["false_refusal"].shape == directions["refusal"].shape
    alignment = load_tensors(next(p for p in stages.values() if p.name == "alignment.safetensors"))
    assert alignment["answer"].shape == (4, 32) and alignment["benign_accuracy"].shape == (4,)
    seconds = {p.name: json.loads((p.parent / "stage.json").read_text())["wall_seconds"] for p in stages.values()}
    derived = {name: result["methods"][name]["columns"]["derive + importance (s)"]["mean"] for name in METHODS[1:]}
    assert derived == pytest.approx({"directional-ablate": 0.0,  # tuned: its study's time is its own
                                     "directional-add": seconds["directions.safetensors"],
                                     "directional-align": seconds["alignment.safetensors"]})  # fmt: skip
    align = json.loads((root / "work/cells/directional-align/seed-0/metrics.json").read_text())
    assert align["merge_counts"]["edited_tensors"] == 4  # 8 sublayers asked; the tiny model has 4
    for name in ("directional-ablate", "directional-add", "directional-align"):
        cell = json.loads((root / f"work/cells/{name}/seed-0/metrics.json").read_text())
        assert cell["merge_counts"]["edited_tensors"] > 0, name
        assert cell["kl_to_reference"] > 0, name  # the edit changed the model that was evaluated


def test_the_study_searches_the_edit_under_the_harmless_constraint(directional):
    root, _, result = directional
    tuning = result["methods"]["directional-ablate"]["tuning"]
    assert tuning["trials"] == 2 and tuning["chosen"] is not None
    params = tuning["chosen"]["params"]
    assert params["directional.ablate_layer"] in (0, 1) and 0.5 <= params["directional.ablate_scale"] <= 1.0
    study = json.loads((root / "results/tiny-directional-tuning/tiny-directional-directional-ablate.json").read_text())
    for trial in study["trials"]:
        assert set(trial["sets"]) == {"unc-val", "scary-val", "harmless"}  # harmless judged, not pooled
    assert "tuning" not in result["methods"]["directional-add"]  # untuned: its configured point
    markdown = (root / "results/tiny-directional-tuning/tiny-directional-directional-ablate.md").read_text()
    assert "refusal of the harmless prompts <= 100.0 %" in markdown and "harmless refusal |" in markdown
    assert "harmful refusal at most 100.0 points below the backbone's" in markdown


def test_the_harmful_guard_refuses_a_point_that_loses_more_harmful_refusal_than_allowed():
    from types import SimpleNamespace

    from safepatching.experiments.tune import Tuner

    tuner = object.__new__(Tuner)
    tuner.settings = SimpleNamespace(max_harmless_refusal=None, max_harmful_drop=3.0, max_looping=2.0)
    tuner.backbone = lambda budget: {"harmful": 60.0}
    final = {"looping": 0.0, "sets": {}}
    assert tuner.feasible_at_full_budget({**final, "harmful": {"refusal": 57.0}})
    assert not tuner.feasible_at_full_budget({**final, "harmful": {"refusal": 56.5}})
    tuner.settings.max_harmful_drop = None
    assert tuner.feasible_at_full_budget({**final, "harmful": {"refusal": 10.0}})


def test_the_evaluated_edit_is_the_projection_of_the_chosen_direction(directional):
    root, config, result = directional
    bench = Bench(config, progress=False)
    bench.tune("directional-ablate", "")
    deltas, counts, _ = bench.merged_deltas("directional-ablate", 0)
    model, _ = bench.stages.backbone.model()
    (path,) = (root / "work/directions").glob("*/directions.safetensors")
    directions = load_tensors(path)
    chosen = bench.chosen["directional-ablate"].directional
    expected = projection_deltas(
        bench.stages.backbone.base_weight, residual_writers(model, "auto"), configured_edits(directions, chosen)
    )
    assert set(deltas) == set(expected) and counts["edited_tensors"] == len(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(deltas[name], delta)


def test_an_edit_of_a_layer_the_model_lacks_fails_in_one_line(tmp_path, tiny_model_dir, bench_pipeline, tuned_bench_config):
    settings = tuned_bench_config(bench_pipeline, tiny_model_dir, tmp_path, "tiny-directional", METHODS, SPACES)
    settings["tuning"] = None
    settings["methods"] = ["backbone", "directional-add"]
    settings["pipeline"]["directional"]["add_layer"] = 7
    with pytest.raises(ConfigError, match=r"directional.add_layer 7: the backbone has 2 layers"):
        run_bench(build_config(overrides=settings, model=BenchConfig), progress=False)


def test_a_run_writes_the_merge_plus_the_edit_and_keys_the_merge_by_it(tmp_path, tiny_model_dir, tiny_pipeline_config):
    from safepatching.experiments.pipeline import run_pipeline
    from safepatching.experiments.stages import Stages
    from safepatching.storage.shards import WeightFolder

    plain = tiny_pipeline_config(tiny_model_dir, tmp_path / "plain", method="task_arithmetic")
    sets = {"harmful": {"source": "builtin:uncensorbench", "split": "train[120:140]", "shuffle_seed": 0},
            "harmless": {"source": "builtin:harmless", "split": "train[4:24]"},
            "benign": {"source": "builtin:benign-but-scary", "split": "train[20:40]"}}  # fmt: skip
    edit = {"add_scale": 0.5, "add_layer": 1, "sets": sets}
    edited = type(plain).model_validate({**plain.model_dump(), "output_dir": tmp_path / "edited", "directional": edit})
    assert Stages(plain, progress=False).keys.merge() != Stages(edited, progress=False).keys.merge()
    run_pipeline(plain, progress=False)
    run_pipeline(edited, progress=False)
    record = json.loads((tmp_path / "edited/model/safepatching.json").read_text())
    assert record["merge_counts"]["edited_tensors"] > 0
    stages = Stages(edited, progress=False)
    model, tokenizer = stages.backbone.model()
    edits = stages.directional().deltas(edited, model, tokenizer, stages.backbone.base_weight)
    plain_weights, edited_weights = WeightFolder(tmp_path / "plain/model"), WeightFolder(tmp_path / "edited/model")
    embedding = next(name for name in edits if name.endswith("embed_tokens.weight"))
    torch.testing.assert_close(
        edited_weights.read(embedding), stages.backbone.base_weight(embedding).float() + edits[embedding]
    )
    writer = next(name for name in edits if name.endswith("o_proj.weight"))
    torch.testing.assert_close(edited_weights.read(writer), plain_weights.read(writer) + edits[writer])


def test_an_edited_model_exports_as_a_low_rank_patch_that_applies_and_reverts_bit_exactly(
    tmp_path, tiny_model_dir, tiny_pipeline_config
):
    from safepatching.experiments.pipeline import run_pipeline
    from safepatching.patchfile.sparse import apply_patches, export_patch, inspect_patch, revert_patch
    from safepatching.storage.shards import WeightFolder

    plain = tiny_pipeline_config(tiny_model_dir, tmp_path / "run", method="task_arithmetic", alpha=0.0, beta=0.0)
    sets = {"harmful": {"source": "builtin:uncensorbench", "split": "train[120:140]", "shuffle_seed": 0},
            "harmless": {"source": "builtin:harmless", "split": "train[4:24]"},
            "benign": {"source": "builtin:benign-but-scary", "split": "train[20:40]"}}  # fmt: skip
    edit = {"ablate_scale": 1.0, "ablate_layer": 1, "add_scale": 0.5, "add_layer": 1, "sets": sets}
    config = type(plain).model_validate({**plain.model_dump(), "directional": edit})
    result = run_pipeline(config, progress=False)
    assert not (tmp_path / "run/patches").exists()  # alpha and beta 0: an edit alone derives nothing
    base = WeightFolder(tiny_model_dir)
    meta = export_patch(tiny_model_dir, result.model_dir, tmp_path / "patch", progress=False)
    assert meta["format_version"] == 3
    low_rank = {name: r for name, r in meta["tensors"].items() if "low_rank" in r}
    assert low_rank and all(r["low_rank"] == 2 for r in low_rank.values())  # two edits: rank 2
    dense_bytes = sum(base.tensors[name].nbytes for name in low_rank)
    # factors, one step per entry where rounding need not invert, and the few entries no step mends
    assert meta["patch_bytes"] < dense_bytes * 0.3
    assert all(r["exact"] < 0.05 * r["changed"] < r["revert_steps"] for r in low_rank.values())
    assert inspect_patch(tmp_path / "patch")["low_rank_tensors"] == len(low_rank)
    apply_patches([tmp_path / "patch"], tiny_model_dir, tmp_path / "applied", progress=False)
    revert_patch(tmp_path / "patch", tmp_path / "applied", tmp_path / "reverted", progress=False)
    patched, applied, reverted = (WeightFolder(p) for p in (result.model_dir, tmp_path / "applied", tmp_path / "reverted"))
    for name in base.tensors:
        assert torch.equal(applied.read(name).view(torch.int32), patched.read(name).view(torch.int32)), name
        assert torch.equal(reverted.read(name).view(torch.int32), base.read(name).view(torch.int32)), name
    assert not (tmp_path / "applied/safepatching").exists()  # the factors stay with the merge that made them


def test_align_iterates_on_the_model_its_earlier_rounds_left_and_stacks_each_rounds_rewrite(
    tmp_path, tiny_model_dir, tiny_pipeline_config, monkeypatch
):
    from safepatching.experiments import directional as stage
    from safepatching.experiments.stages import Stages

    monkeypatch.setattr(stage, "refusals", every_other_refused)
    plain = tiny_pipeline_config(tiny_model_dir, tmp_path / "run", method="task_arithmetic", alpha=0.0, beta=0.0)
    sets = {"harmful": {"source": "builtin:uncensorbench", "split": "train[120:140]", "shuffle_seed": 0},
            "harmless": {"source": "builtin:harmless", "split": "train[4:24]"},
            "benign": {"source": "builtin:benign-but-scary", "split": "train[20:40]"}}  # fmt: skip

    def settings(rounds: int):
        edit = {"align_scale": 1.0, "align_sublayers": 4, "align_iterations": rounds, "sets": sets}  # all four
        return type(plain).model_validate({**plain.model_dump(), "directional": edit})

    stages = Stages(settings(2), progress=False)
    model, tokenizer = stages.backbone.model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    edits = stages.directional()
    once = edits.factors(settings(1), model, tokenizer, stages.backbone.base_weight)
    twice = edits.factors(settings(2), model, tokenizer, stages.backbone.base_weight)
    assert len(once) == 4 and set(once) == set(twice) and all(twice[name][0].shape[0] == 2 for name in once)
    for name, (rows, columns) in once.items():  # the first round is the one-round edit
        torch.testing.assert_close(twice[name][0][:1], rows)
        torch.testing.assert_close(twice[name][1][:1], columns)
    first, second = (load_tensors(stages.out / "directions" / key[:12] / "alignment.safetensors")
                     for key in edits.stage_keys(settings(2)))  # fmt: skip
    assert not torch.allclose(first["answer"], second["answer"])  # probed on the edited model
    for name, param in model.named_parameters():  # the rounds' patches were taken out again
        assert torch.equal(param, before[name]), name
    assert edits.stage_keys(settings(1)) == edits.stage_keys(settings(2))[:1]
