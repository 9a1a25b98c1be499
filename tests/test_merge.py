import pytest
import torch

from safepatching.config.settings import MergeConfig
from safepatching.method.merge_methods import MERGE_METHODS, TensorPatches, retain, tensor_seed
from safepatching.method.regions import TopRegion, difference_sets


def test_safepatching_merge_matches_hand_computation():
    safety = torch.tensor([1.0, 2.0, 3.0, 4.0])
    over = torch.tensor([10.0, 20.0, 30.0, 40.0])
    safety_region = torch.tensor([True, True, False, False])
    over_region = torch.tensor([False, True, True, False])
    settings = MergeConfig(alpha=0.5, beta=2.0, retention=1.0)
    delta = MERGE_METHODS["safepatching"].function(
        TensorPatches("w", safety, over, safety_region, over_region), settings, seed=0
    )
    # entry 0: safety only -> 0.5*1; entry 1: both regions -> untouched; entry 2: over only -> 2*30; entry 3: none
    assert torch.equal(delta, torch.tensor([0.5, 0.0, 60.0, 0.0]))


def test_task_arithmetic_adds_both_patches_everywhere():
    settings = MergeConfig(method="task_arithmetic", alpha=1.0, beta=-1.0, retention=1.0)
    delta = MERGE_METHODS["task_arithmetic"].function(
        TensorPatches("w", torch.ones(3), torch.full((3,), 0.25)), settings, seed=0
    )
    assert torch.allclose(delta, torch.full((3,), 0.75))


def test_intersection_ablation_patches_only_where_both_regions_meet():
    patches = TensorPatches(
        "w",
        torch.tensor([1.0, 2.0, 3.0, 4.0]),
        torch.tensor([10.0, 20.0, 30.0, 40.0]),
        torch.tensor([True, True, False, False]),
        torch.tensor([False, True, True, False]),
    )
    settings = MergeConfig(method="safepatching_intersection", alpha=0.5, beta=2.0, retention=1.0)
    delta = MERGE_METHODS["safepatching_intersection"].function(patches, settings, seed=0)
    assert torch.equal(delta, torch.tensor([0.0, 0.5 * 2 + 2 * 20, 0.0, 0.0]))


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean():
    safety = torch.tensor([4.0, -3.0, 0.1, 2.0, -0.2])
    over = torch.tensor([1.0, 5.0, -0.3, -1.0, 0.05])
    settings = MergeConfig(method="ties", alpha=1.0, beta=1.0, density=0.6)
    delta = MERGE_METHODS["ties"].function(TensorPatches("w", safety, over), settings, seed=0)
    # trim keeps 3 of 5 by magnitude: safety -> [4, -3, 0, 2, 0], over -> [1, 5, 0, -1, 0]
    # entry 0: both +, mean (4+1)/2; entry 1: -3+5 elects +, only 5 agrees; entry 3: 2-1 elects +, only 2
    assert torch.allclose(delta, torch.tensor([2.5, 5.0, 0.0, 2.0, 0.0]))


def test_ties_trim_keeps_the_requested_share():
    from safepatching.method.merge_methods import trim_to_density

    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    kept = trim_to_density(values, 0.25)
    assert int((kept != 0).sum()) == 250
    assert kept.abs()[kept != 0].min() >= values.abs()[kept == 0].max()


def test_difference_sets_are_disjoint_and_cover_symmetric_difference():
    generator = torch.Generator().manual_seed(1)
    scores_s = {"a": torch.rand(50, 40, generator=generator), "b": torch.rand(30, generator=generator)}
    scores_o = {"a": torch.rand(50, 40, generator=generator), "b": torch.rand(30, generator=generator)}
    region_s = TopRegion(scores_s, 20)
    region_o = TopRegion(scores_o, 30)
    for name in scores_s:
        only_s, only_o = difference_sets(region_s.mask(name), region_o.mask(name))
        assert not (only_s & only_o).any()
        assert torch.equal(only_s | only_o, region_s.mask(name) ^ region_o.mask(name))
        assert only_s.any() and only_o.any()


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_top_region_selects_the_requested_share(scope):
    generator = torch.Generator().manual_seed(2)
    scores = {"a": torch.rand(100, 100, generator=generator), "b": torch.rand(50, 20, generator=generator) * 2}
    region = TopRegion(scores, 10, scope)
    total = sum(int(region.mask(name).sum()) for name in scores)
    assert total == 1100  # 10% of 11000 entries; continuous scores have no ties
    if scope == "per_tensor":
        assert int(region.mask("a").sum()) == 1000 and int(region.mask("b").sum()) == 100
    else:  # "b" has larger scores, so it takes more than its share of a global region
        assert int(region.mask("b").sum()) > 100


def test_top_region_never_selects_zero_scores():
    region = TopRegion({"a": torch.tensor([0.0, 0.0, 0.0, 1.0])}, 75)
    assert region.mask("a").tolist() == [False, False, False, True]


def test_retention_rate_and_inverse_rescale():
    delta = torch.ones(200_000)
    kept = retain(delta, 0.3, "inverse", seed=7)
    fraction = float((kept != 0).float().mean())
    assert abs(fraction - 0.3) < 0.005
    assert torch.allclose(kept[kept != 0], torch.full_like(kept[kept != 0], 1 / 0.3))
    plain = retain(delta, 0.3, "none", seed=7)
    assert torch.equal(plain != 0, kept != 0) and float(plain.max()) == 1.0
    # the expectation of the inverse rule equals the original patch
    assert abs(float(kept.mean()) - 1.0) < 0.02


def test_retention_depends_on_seed_and_name_not_on_order():
    delta = torch.randn(1000)
    first = retain(delta, 0.5, "inverse", tensor_seed(3, "safety", "layer.0"))
    retain(delta, 0.5, "inverse", tensor_seed(3, "safety", "layer.1"))
    again = retain(delta, 0.5, "inverse", tensor_seed(3, "safety", "layer.0"))
    other = retain(delta, 0.5, "inverse", tensor_seed(4, "safety", "layer.0"))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert tensor_seed(3, "safety", "x") != tensor_seed(3, "over_safety", "x")


@pytest.mark.parametrize("percent", [0.1, 5, 10, 33.3, 100])
def test_the_streamed_global_threshold_equals_the_threshold_of_all_scores_joined(percent):
    from safepatching.method.regions import _kth_largest, global_threshold

    generator = torch.Generator().manual_seed(int(percent * 10))
    scores = {f"t{i}": torch.randn(97 * (i + 1), generator=generator) * 10.0 ** (3 * i - 6) for i in range(4)}
    scores["t0"][:40] = 0.0  # ties at zero, a run of equal scores, both signs and magnitudes 1e-6..1e3
    scores["t1"][:30] = scores["t1"][0]
    scores["t2"] = scores["t2"].abs()
    joined = torch.cat([value.reshape(-1) for value in scores.values()])
    assert torch.equal(global_threshold(scores, percent), _kth_largest(joined, percent))


def test_patch_geometry_measures_cosine_per_module_and_sign_disagreement():
    from safepatching.method.geometry import patch_geometry, region_geometry

    up = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    safety = {"layers.0.mlp.up_proj.weight": up, "layers.0.attn.q_proj.weight": q}
    opposite = {"layers.0.mlp.up_proj.weight": -up, "layers.0.attn.q_proj.weight": torch.tensor([[0.0, 3.0, 0.0]])}
    geometry = patch_geometry(safety, opposite)
    assert geometry["cosine_by_module"]["up_proj"] == pytest.approx(-1.0)
    assert geometry["cosine_by_module"]["q_proj"] == pytest.approx(0.0)
    assert geometry["cosine"] == pytest.approx(-6 / (7**0.5 * 15**0.5))  # s.o = -6, |s|^2 = 7, |o|^2 = 6 + 9
    assert geometry["sign_disagreement"] == 1.0  # the 3 entries both change all differ in sign; q_proj shares none
    counts = {"entries": 100, "safety_only": 6, "over_safety_only": 2, "intersection": 4}
    regions = region_geometry(counts)
    assert regions["safety_region"] == 0.10 and regions["over_safety_region"] == 0.06
    assert regions["overlap_jaccard"] == pytest.approx(4 / 12) and regions["safety_only"] == 0.06
    assert region_geometry({"entries": 100, "safety_only": 0, "over_safety_only": 0, "intersection": 0}) is None
