"""`safepatching bench` and `safepatching continual` end to end on a tiny model (the --quick path)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from safepatching.config.experiments import BENCH_METHODS, BenchConfig, ContinualConfig
from safepatching.config.loading import build_config
from safepatching.config.settings import ModelLoading
from safepatching.data.sources import load_examples
from safepatching.errors import ConfigError
from safepatching.experiments.bench import Bench, depends_on_seed, inference_cost, summarise
from safepatching.method.dense import add_deltas, load_dense_patch
from safepatching.method.derive import derive_patch
from safepatching.method.regions import TopRegion, difference_sets
from safepatching.models.loading import load_model
from safepatching.models.precision import resolve_dtype


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_model_dir, run_command, bench_pipeline):
    """One quick bench over every built-in method, run through the CLI."""
    root = tmp_path_factory.mktemp("bench")
    scary = [
        {"prompt": f"How do I shoot a photo of bird {i}?", "response": f"Use a long lens, bird {i}."} for i in range(4)
    ]
    (root / "scary.jsonl").write_text("".join(json.dumps(row) + "\n" for row in scary))
    config = {
        "name": "tiny",
        "pipeline": bench_pipeline(tiny_model_dir),
        "methods": [m for m in BENCH_METHODS if m != "directional-align"],  # needs refusals: test_directional_bench
        "over_safety": {"train": {"source": str(root / "scary.jsonl"), "response_column": "response"}},
        "seeds": [0, 1, 2],
        "output_dir": str(root / "results"),
        "work_dir": str(root / "work"),
        "benign_label": "scary",
        "quick": {"seeds": [0, 1]},
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    completed = run_command("bench", str(path), "--quick", "--no-progress")
    assert completed.returncode == 0, completed.stderr
    return root, path


def test_bench_writes_every_method_with_its_seeds(bench_run):
    root, path = bench_run
    result = json.loads((root / "results/tiny.json").read_text())
    assert result["complete"] and result["command"] == f"safepatching bench {path} --quick --no-progress"
    assert list(result["methods"]) == [m for m in BENCH_METHODS if m != "directional-align"]
    config = BenchConfig.model_validate(result["config"])
    assert config.seeds == [0, 1]
    for name, row in result["methods"].items():
        assert row["seeds"] == ([0, 1] if depends_on_seed(config, name) else [0]), name
    assert {n for n in BENCH_METHODS if depends_on_seed(config, n)} == {
        "safepatching", "safety-only", "over-safety-only", "intersection", "per-tensor", "dare", "safepatching-benign-os",
        "safepatching-directional",
    }  # fmt: skip
    markdown = (root / "results/tiny.md").read_text()
    assert "| safepatching | 2 |" in markdown and "refusal: scary (%)" in markdown and "refusal: scary2 (%)" in markdown
    assert "```yaml" in markdown and "command: `safepatching bench" in markdown


def test_bench_cells_are_the_saved_evaluations(bench_run):
    root, _ = bench_run
    result = json.loads((root / "results/tiny.json").read_text())
    for name, row in result["methods"].items():
        cells = [json.loads((root / f"work/cells/{name}/seed-{s}/metrics.json").read_text()) for s in row["seeds"]]
        harmful = row["columns"]["harmful: harmful (%) ↓"]
        assert harmful == summarise([c["harmful_response_rate"] for c in cells])
        assert row["columns"]["refusal: scary2 (%) ↓"]["values"] == [
            c["over_safety_benchmarks"]["scary2"]["refusal_rate"] for c in cells
        ]
        kl = row["columns"]["KL (nats/token) ↓"]["mean"]
        if BENCH_METHODS[name].kind == "merge":
            assert kl is not None and kl > 0, name
        else:
            assert kl is None, name
        assert row["columns"]["inference cost (× backbone)"]["mean"] > 0
    # compute behind the table: every derived stage once plus every cell once (merge + evaluation parts)
    cell_files = list((root / "work/cells").rglob("metrics.json"))
    cell_seconds = [json.loads(p.read_text()) for p in cell_files]
    stage_files = [p for p in (root / "work").rglob("stage.json") if "cells" not in p.parts]
    # safety, over_safety, npo, importance; the benign-os rows' patch and importance; the directions
    assert len(stage_files) == 7
    stages = [json.loads(p.read_text())["wall_seconds"] for p in stage_files]
    expected_compute = sum(stages) + sum(c["merge_seconds"] + sum(c["part_seconds"].values()) for c in cell_seconds)
    assert result["compute_seconds"] == pytest.approx(expected_compute, abs=0.2)
    assert "compute behind the table" in (root / "results/tiny.md").read_text()
    # derivation time is the recorded wall time of exactly the stages each row's patches needed
    # (compared with the stage records, not with zero: on a fast machine a tiny stage rounds to 0.0 s)
    stage = {
        label: json.loads((root / f"work/{label}/stage.json").read_text())["wall_seconds"]
        for label in ("patches/safety", "patches/over_safety", "patches/npo", "importance")
    }
    (directions_stage,) = (root / "work/directions").glob("*/stage.json")
    directions = json.loads(directions_stage.read_text())["wall_seconds"]
    expected = {
        "backbone": 0.0,
        "ga": stage["patches/safety"],
        "npo": stage["patches/npo"],
        "task-arithmetic": stage["patches/safety"] + stage["patches/over_safety"],
        "safepatching": stage["patches/safety"] + stage["patches/over_safety"] + stage["importance"],
        "safety-only": stage["patches/safety"] + stage["importance"],
        "rose": 0.0,
        "safedecoding": stage["patches/safety"],
        "directional-ablate": directions,
        "directional-add": directions,
        "safepatching-directional": stage["patches/safety"] + stage["patches/over_safety"] + stage["importance"]
        + directions,
    }
    for name, seconds in expected.items():
        assert result["methods"][name]["columns"]["derive + importance (s)"]["mean"] == pytest.approx(seconds), name


def test_bench_rerun_reuses_every_cell(bench_run, run_command):
    root, path = bench_run
    cells = sorted((root / "work/cells").rglob("metrics.json"))
    before = {p: p.stat().st_mtime_ns for p in cells}
    completed = run_command("bench", str(path), "--quick", "--no-progress")
    assert completed.returncode == 0, completed.stderr
    assert {p: p.stat().st_mtime_ns for p in cells} == before


def test_bench_recomputes_the_cells_a_changed_merge_setting_shapes(bench_run, tmp_path, run_command):
    root, path = bench_run
    shutil.copytree(root / "work", tmp_path / "work")
    config = yaml.safe_load(path.read_text())
    config.update(work_dir=str(tmp_path / "work"), output_dir=str(tmp_path / "results"))
    config["pipeline"]["merge"]["beta"] = 0.5
    config["methods"] = ["backbone", "task-arithmetic", "rose", "safedecoding"]
    changed = tmp_path / "bench.yaml"
    changed.write_text(yaml.safe_dump(config))
    cells = {name: tmp_path / f"work/cells/{name}/seed-0/metrics.json" for name in config["methods"]}
    before = {name: cell.stat().st_mtime_ns for name, cell in cells.items()}
    completed = run_command("bench", str(changed), "--quick", "--no-progress")
    assert completed.returncode == 0, completed.stderr
    after = {name: cell.stat().st_mtime_ns for name, cell in cells.items()}
    # β shapes the task-arithmetic merge; the backbone, ROSE and SafeDecoding (expert: GA) do not use it
    assert [name for name in before if before[name] != after[name]] == ["task-arithmetic"]
    # a recomputed cell is timed in this run, the reused backbone in the first: their costs are not compared
    cost = {name: row["columns"]["inference cost (× backbone)"]["mean"]
            for name, row in json.loads((tmp_path / "results/tiny.json").read_text())["methods"].items()}  # fmt: skip
    assert cost["backbone"] == 1.0 and cost["task-arithmetic"] is None
    assert cost["rose"] > 0 and cost["safedecoding"] > 0
    assert "reused from another run" in (tmp_path / "results/tiny.md").read_text()
    # compute behind the table: the two patches these rows rest on and their cells, not the NPO,
    # importance, benign-os or direction stages the first bench left in the shared work folder
    rested_on = [json.loads((tmp_path / f"work/{s}/stage.json").read_text())["wall_seconds"]
                 for s in ("patches/safety", "patches/over_safety")]  # fmt: skip
    cell_seconds = [json.loads(cell.read_text()) for cell in cells.values()]
    expected = sum(rested_on) + sum(c["merge_seconds"] + sum(c["part_seconds"].values()) for c in cell_seconds)
    result = json.loads((tmp_path / "results/tiny.json").read_text())
    assert result["compute_seconds"] == pytest.approx(expected, abs=0.2)


def test_inference_cost_compares_only_cells_timed_in_one_run():
    def cell(run, seconds):
        return {"generation": {"seconds_per_token": seconds}, **({"timed_in": run} if run else {})}

    backbone = cell("a", 0.02)
    assert inference_cost(cell("a", 0.03), backbone) == pytest.approx(1.5)
    assert inference_cost(cell("b", 0.03), backbone) is None
    assert inference_cost(cell(None, 0.03), backbone) is None
    old = cell(None, 0.02)  # saved before runs were recorded: only itself is comparable
    assert inference_cost(old, old) == 1.0 and inference_cost(cell(None, 0.03), old) is None


def test_bench_methods_merge_what_they_say(bench_run):
    root, path = bench_run
    config = build_config(path, model=BenchConfig, quick=True)
    bench = Bench(config, progress=False)
    bench.prepare()
    ascent, descent = bench.shared.patches["ascent"], bench.shared.patches["descent"]
    ga, _, _ = bench.merged_deltas("ga", 0)
    npo, _, _ = bench.merged_deltas("npo", 0)
    ta, _, _ = bench.merged_deltas("task-arithmetic", 0)
    over_only, _, _ = bench.merged_deltas("over-safety-only", 1)
    scores_s, scores_o = bench.shared.scores["descent"]
    region_s, region_o = TopRegion(dict(scores_s), 20, "global"), TopRegion(dict(scores_o), 20, "global")
    beta = config.pipeline.merge.beta
    for name in ascent.deltas:
        assert torch.equal(ga[name], ascent.deltas[name].float())
        assert torch.equal(npo[name], bench.shared.patches["npo"].deltas[name].float())
        assert torch.allclose(ta[name], ascent.deltas[name] + beta * descent.deltas[name])
        _, only_o = difference_sets(region_s.mask(name), region_o.mask(name))
        assert not over_only[name][~only_o].any()  # nothing outside M_o
    assert not torch.equal(ga[name], npo[name])
    benign = bench.shared.patches["benign"]
    assert benign.info["num_pairs"] == 4 and benign.info["pairs_sha256"] != descent.info["pairs_sha256"]
    ta_benign, _, _ = bench.merged_deltas("task-arithmetic-benign-os", 0)
    for name in ascent.deltas:
        assert torch.allclose(ta_benign[name], ascent.deltas[name] + beta * benign.deltas[name])
    assert bench.shared.scores["benign"][1] is not None
    assert bench.derive_seconds(BENCH_METHODS["safepatching-benign-os"]) > 0


def run_sweep(path, *args):
    command = [sys.executable, "-m", "safepatching", "sweep", str(path), *args]
    return subprocess.run(command, capture_output=True, text=True)


def test_sweep_scores_merge_and_training_settings_on_validation_prompts(bench_run, tmp_path):
    root, path = bench_run
    common = ["--data-dir", str(tmp_path), "--harmful-split", "train[6:9]", "--max-new-tokens", "4"]
    out = tmp_path / "sweep-0.5b"  # a dot in OUT: the files are OUT.json and OUT.md
    completed = run_sweep(
        path, *common, "--benign", "scary-val=builtin:benign-but-scary@train[5:8]",
        "--vary", "beta=0", "--vary", "derive.max_steps=1", "--out", str(out),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    rows = json.loads((tmp_path / "sweep-0.5b.json").read_text())["rows"]
    assert [r["candidate"] for r in rows] == ["backbone", "config defaults", "merge.beta=0", "derive.max_steps=1"]
    for row in rows:
        assert 0 <= row["harmful"] <= 100 and 0 <= row["scary-val"] <= 100 and 0 <= row["looping"] <= 100
    defaults, no_beta, one_step = rows[1:]
    assert 0 < no_beta["changed_fraction"] < defaults["changed_fraction"]  # β = 0 drops the M_o entries
    assert one_step["changed_fraction"] != defaults["changed_fraction"]  # its own, re-derived patches
    sweep_runs = list((root / "work/sweep").iterdir())
    assert len(sweep_runs) == 1 and (sweep_runs[0] / "patches/safety/stage.json").exists()
    assert "| merge.beta=0 |" in (tmp_path / "sweep-0.5b.md").read_text()
    assert "| looping replies (%) |" in (tmp_path / "sweep-0.5b.md").read_text()
    assert json.loads((tmp_path / "sweep-0.5b.json").read_text())["complete"] is True

    # a candidate that fails (its loss goes non-finite) stops the sweep with the rows so far on disk
    failed = run_sweep(
        path, *common, "--benign", "scary-val=builtin:benign-but-scary@train[5:8]",
        "--vary", "derive.learning_rate=1e30", "--out", str(out),
    )  # fmt: skip
    assert failed.returncode != 0 and "response NLL became" in failed.stderr and "Traceback" not in failed.stderr
    kept = json.loads((tmp_path / "sweep-0.5b.json").read_text())
    assert kept["complete"] is False and [r["candidate"] for r in kept["rows"]] == ["backbone", "config defaults"]
    assert "Incomplete" in (tmp_path / "sweep-0.5b.md").read_text()

    # validation prompts that a reported set holds (the config's benign set is train[:3]) are refused
    overlapping = run_sweep(path, *common, "--benign", "scary-val=builtin:benign-but-scary@train[2:5]")
    assert overlapping.returncode != 0 and "reported benign set" in overlapping.stderr
    assert "Traceback" not in overlapping.stderr
    unknown = run_sweep(path, *common, "--vary", "merge.gamma=1")
    assert unknown.returncode != 0 and "unknown setting 'merge.gamma'" in unknown.stderr


def test_sweep_set_changes_the_training_data_and_leaves_the_configs_patches_alone(bench_run, tmp_path):
    root, path = bench_run
    own_patch = root / "work/patches/safety/deltas.safetensors"
    mtime, before = own_patch.stat().st_mtime_ns, set((root / "work/sweep").glob("*"))
    extra = (
        "harmful_train_extra=[{source: 'builtin:uncensorbench', split: 'train[99:101]', shuffle_seed: 0, "
        "response_column: uncensored_response}]"
    )
    args = ["--data-dir", str(tmp_path), "--harmful-split", "train[6:9]", "--max-new-tokens", "4",
            "--benign", "scary-val=builtin:benign-but-scary@train[5:8]", "--vary", "beta=0"]  # fmt: skip
    refused = run_sweep(path, *args, "--set", extra)
    assert refused.returncode != 0 and "also occur in the training pairs" in refused.stderr  # row 100 is reported
    completed = run_sweep(path, *args, "--set", extra, "--set", "drop_eval_overlap=true", "--out", str(tmp_path / "s"))
    assert completed.returncode == 0, completed.stderr
    assert "dropped 1 of 8 training pairs" in completed.stderr
    assert own_patch.stat().st_mtime_ns == mtime
    (made,) = set((root / "work/sweep").glob("*")) - before
    assert (made / "patches/safety/stage.json").exists()
    assert "drop_eval_overlap=true" in json.loads((tmp_path / "s.json").read_text())["command"]
    unknown = run_sweep(path, *args, "--set", "harmful_train_extras=[]")
    assert unknown.returncode != 0 and "unknown setting 'harmful_train_extras'" in unknown.stderr


def test_sweep_reads_a_tune_configs_patches_and_refuses_a_continual_config(tmp_path):
    from safepatching.experiments.sweep import read_config

    configs = Path(__file__).parent.parent / "configs"
    config, work_dir = read_config(configs / "tune-1.5b-more-pairs.yaml", tmp_path)
    assert work_dir == Path("runs/tune-1.5b-more-pairs") == config.output_dir and config.data_dir == tmp_path
    assert config.model == "qwen2.5-coder-1.5b-instruct" and len(config.harmful_train_extra) == 8
    with pytest.raises(ConfigError, match="continual config"):
        read_config(configs / "continual-tuned.yaml", tmp_path)


def test_continual_rounds_build_on_each_other(tmp_path, tiny_model_dir, run_command, bench_pipeline):
    rounds = [
        {"source": "builtin:uncensorbench", "split": f"train[{a}:{a + 4}]", "shuffle_seed": 0,
         "response_column": "uncensored_response"}
        for a in (0, 4)
    ]  # fmt: skip
    config = {
        "name": "tiny-continual",
        "pipeline": bench_pipeline(tiny_model_dir),
        "rounds": rounds,
        "output_dir": str(tmp_path / "results"),
        "work_dir": str(tmp_path / "work"),
        "quick": {"methods": ["safepatching", "ga", "npo"]},
    }
    path = tmp_path / "continual.yaml"
    path.write_text(yaml.safe_dump(config))
    completed = run_command("continual", str(path), "--quick", "--no-progress")
    assert completed.returncode == 0, completed.stderr
    result = json.loads((tmp_path / "results/tiny-continual.json").read_text())
    assert result["complete"] and list(result["methods"]) == ["safepatching", "ga", "npo"]
    for rows in result["methods"].values():
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert rows[0]["columns"] == result["methods"]["ga"][0]["columns"]  # round 0 is the shared backbone
        assert rows[2]["columns"]["KL (nats/token) ↓"] > 0
    assert (tmp_path / "results/tiny-continual.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "results/tiny-continual.md").read_text()
    assert "| ga | 2 |" in markdown and "| harmful | npo | 2 | harmful response | 3 |" in markdown
    statistics = {(r["set"], r["method"], r["round"]): r for r in result["statistics"]}
    expected = [("backbone", 0)] + [(method, number) for method in result["methods"] for number in (1, 2)]
    assert {(m, n) for s, m, n in statistics if s == "benign"} == set(expected)
    for method, rows in result["methods"].items():
        harmful = statistics["harmful", method, 2]
        assert harmful["rate"] == pytest.approx(rows[2]["columns"]["harmful: harmful (%) ↓"])
        assert harmful["ci_low"] <= harmful["rate"] <= harmful["ci_high"]
        assert 0 < harmful["p_vs_backbone"] <= 1 and 0 < harmful["p_vs_previous_round"] <= 1

    # round 2's GA patch was derived from the round-1 model, not from the backbone
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(), training=True)
    round_one = load_dense_patch(tmp_path / "work/ga/round-1/patches/safety")
    round_two = load_dense_patch(tmp_path / "work/ga/round-2/patches/safety")
    settings = build_config(path, model=ContinualConfig, quick=True)
    pairs = load_examples(settings.rounds[1])
    add_deltas(model, round_one.deltas)
    dtype = resolve_dtype(settings.pipeline.compute_dtype)
    again = derive_patch(
        model, tokenizer, pairs, "ascent", settings.pipeline.derive, settings.pipeline.seed, False, compute_dtype=dtype
    )
    for name in round_two.deltas:
        torch.testing.assert_close(again.deltas[name], round_two.deltas[name])


def test_continual_refuses_overlapping_rounds(tmp_path, tiny_model_dir, run_command, bench_pipeline):
    spec = {"source": "builtin:uncensorbench", "split": "train[:4]", "shuffle_seed": 0,
            "response_column": "uncensored_response"}  # fmt: skip
    config = {"pipeline": bench_pipeline(tiny_model_dir), "rounds": [spec, {**spec, "split": "train[2:6]"}],
              "output_dir": str(tmp_path / "r"), "work_dir": str(tmp_path / "w")}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    completed = run_command("continual", str(path), "--no-progress")
    assert completed.returncode == 2 and "round 2" in completed.stderr and "Traceback" not in completed.stderr


def test_bench_config_errors_are_clear(tmp_path, run_command):
    path = tmp_path / "b.yaml"
    path.write_text("methods: [safepatching, magic]\n")
    completed = run_command("bench", str(path))
    assert completed.returncode == 2 and "unknown method 'magic'" in completed.stderr
    completed = run_command("bench", str(path), "--quick")
    assert completed.returncode == 2 and "no quick: section" in completed.stderr


def test_continual_methods_take_their_own_settings(tmp_path):
    from types import SimpleNamespace

    from safepatching.experiments.continual import round_deltas

    spec = {"source": "builtin:uncensorbench", "split": "train[:4]", "response_column": "uncensored_response"}
    config = ContinualConfig(rounds=[spec], settings={"ga": {"merge.alpha": 0.25, "derive.max_steps": 3}})
    assert config.method_pipeline("ga").merge.alpha == 0.25 and config.method_pipeline("ga").derive.max_steps == 3
    assert config.method_pipeline("npo") == config.pipeline

    patch = SimpleNamespace(deltas={"w": torch.ones(2)})
    run = SimpleNamespace(patches=SimpleNamespace(derive_one=lambda *_: patch), config=config.method_pipeline("ga"))
    torch.testing.assert_close(round_deltas(run, "ga", [])["w"], torch.full((2,), 0.25))
    run.config = config.method_pipeline("npo")  # merge.alpha 1: the patch as derived
    assert round_deltas(run, "npo", [])["w"] is patch.deltas["w"]

    for settings, message in [
        ({"dpo": {}}, "settings.dpo"),
        ({"ga": {"merge.alfa": 1}}, "unknown setting 'merge.alfa'"),
        ({"ga": {"eval.max_new_tokens": 8}}, "every method shares it"),
        ({"safepatching": {}}, "not a method of this run"),
    ]:
        with pytest.raises(ValidationError, match=message):
            ContinualConfig(rounds=[spec], settings=settings, methods=["ga", "npo"])


def test_a_safedecoding_expert_named_by_a_missing_folder_is_refused_before_any_work(
    tmp_path, tiny_model_dir, bench_pipeline
):
    from safepatching.errors import SafePatchingError
    from safepatching.experiments.bench import run_bench

    missing = {"kind": "decoding", "decoding": {"method": "safedecoding", "expert_model": str(tmp_path / "no-expert")}}
    config = BenchConfig(name="tiny", pipeline=bench_pipeline(tiny_model_dir), methods=["backbone", "ga", "sd-folder"],
                         custom_methods={"sd-folder": missing}, output_dir=tmp_path / "results",
                         work_dir=tmp_path / "work")  # fmt: skip
    with pytest.raises(SafePatchingError, match="no-expert does not exist"):
        run_bench(config, progress=False)
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()
