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
