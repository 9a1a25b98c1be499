"""Every benchmark script still imports: a renamed or removed library function fails here, not in
the next person's benchmark run."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.stem)
def test_the_benchmark_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(script.parent))  # as when run as a script: siblings import each other
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts run their work only under __main__
    assert callable(getattr(module, "main", None))


def test_the_device_carry_takes_the_projects_needs_and_leaves_lm_evals_own_behind(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS[0].parent))
    import device_prepare

    needs = device_prepare.dependency_closure("safepatching", {"lm-eval"})
    assert {"pydantic", "optuna", "transformers", "uncensorbench"} <= needs.keys()
    assert "lm-eval" not in needs and "rouge-score" not in needs  # rouge-score: only lm-eval needs it
    kinds = tmp_path / "KINDS.md"
    kinds.write_text("| a | table |\nnvidia: their image holds these. Packages: absl-py, Pydantic_Core, torch.\nnext line\n")
    assert device_prepare.image_packages(kinds) == {"absl-py", "pydantic-core", "torch"}
