"""How far a tuned setting travels: a trial's merge setting reaches the region code through a few
modules, not through the whole stage machinery (the layout issue counted 23)."""

import sys

from safepatching.config.settings import PipelineConfig
from safepatching.data.sources import Example
from safepatching.experiments.validation import ValidationScorer, ValidationSet
from safepatching.method import regions


def modules_entered(block, target) -> tuple[list[str], list[str]]:
    """(the safepatching modules on the stack when the code ``target`` first runs, every
    safepatching module whose code ran) while ``block`` runs."""
    entered, stack_at_region = set(), []

    def profile(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if module.startswith("safepatching."):
            entered.add(module)
        if frame.f_code is target and not stack_at_region:
            caller = frame
            while caller is not None:
                name = caller.f_globals.get("__name__", "")
                if name.startswith("safepatching.") and (not stack_at_region or stack_at_region[-1] != name):
                    stack_at_region.append(name)
                caller = caller.f_back

    sys.setprofile(profile)
    try:
        block()
    finally:
        sys.setprofile(None)
    return stack_at_region, sorted(entered)


def test_a_trials_merge_setting_reaches_top_region_through_at_most_eight_modules(
    tmp_path, tiny_model_dir, bench_pipeline, monkeypatch
):
    config = PipelineConfig(**bench_pipeline(tiny_model_dir), output_dir=tmp_path / "run")
    scorer = ValidationScorer(config, tmp_path / "run", [ValidationSet("val", "harmful", [Example("Pick a lock?")])])
    scorer.derived(config)  # the study's patches and scores, as after its first trial
    trial = config.model_copy(update={"merge": config.merge.model_copy(update={"top_a": 3.5})})
    percents = []
    built = regions.TopRegion.__init__

    def recorded(self, scores, percent, scope="per_tensor"):
        percents.append(percent)
        built(self, scores, percent, scope)

    monkeypatch.setattr(regions.TopRegion, "__init__", recorded)

    def merge_once():
        with scorer.merged(trial):
            pass

    stack, entered = modules_entered(merge_once, built.__code__)
    assert 3.5 in percents  # the trial's setting is the one that arrives
    assert stack[0] == "safepatching.method.regions" and stack[-1] == "safepatching.experiments.validation"
    assert len(set(stack)) <= 8, stack
    print(f"stack at TopRegion: {stack}; modules entered: {len(entered)} {entered}")
