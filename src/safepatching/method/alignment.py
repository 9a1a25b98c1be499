"""LLM-VA's alignment edit (Wang et al., ACL 2026): make a model answer where its input is benign and
refuse where it is harmful, by tying the direction it answers along to the direction that tells
benign from harmful, in the outputs of chosen attention and MLP sublayers.

For each sublayer (its output at the configured post-instruction position) two linear probes
(scikit-learn's LinearSVC) give unit directions: ``answer`` (answered vs
refused, by the model's own replies) and ``benign`` (benign vs harmful prompts), with the standard
deviation of the activations along each and each probe's held-out accuracy. The rewrite of the
sublayer's writer W ([hidden, in]) replaces what it writes along a by its component along b, rescaled
to a's spread: W' = W - a (a^T W) + (sigma_a / sigma_b) a (b^T W), a rank-1 change a (c b - a)^T W.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC


def probe_direction(
    features: torch.Tensor, labels: torch.Tensor, seed: int = 0, held_out: float = 0.25
) -> tuple[torch.Tensor, float, int, int]:
    """(unit direction towards label 1, std of all features along it, correct and total held-out
    prompts) of a LinearSVC fitted on the rest. The features are standardised for the fit (a few of a transformer's
    dimensions are orders of magnitude larger than the rest, and liblinear then fails to converge);
    the normal is mapped back to the activations' own space. The probe has an intercept (LLM-VA fits
    none): activations are not centred, and a plane forced through the origin tilts its normal."""
    x, y = features.double().numpy(), labels.numpy().astype(int)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=held_out, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(train_x)
    with warnings.catch_warnings():  # with more dimensions than prompts liblinear may stop at max_iter;
        warnings.simplefilter("ignore", ConvergenceWarning)  # the held-out accuracy says how good the plane is
        probe = LinearSVC(max_iter=10000, random_state=seed).fit(scaler.transform(train_x), train_y)
    normal = torch.from_numpy(probe.coef_[0] / scaler.scale_).float()
    unit = normal / normal.norm().clamp_min(1e-12)
    correct = int((probe.predict(scaler.transform(test_x)) == test_y).sum())
    return unit, float((features @ unit).std()), correct, len(test_y)


def alignment_directions(
    activations: torch.Tensor, benign: torch.Tensor, answered: torch.Tensor, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Both probes at every sublayer of ``activations`` [prompt, sublayer, hidden] (one position);
    ``benign`` and ``answered`` are the prompts' boolean labels. Returns ``answer`` and ``benign``
    unit directions [sublayer, hidden] with their ``*_std`` and ``*_accuracy`` [sublayer]."""
    sublayers, hidden = activations.shape[1:]
    out = {
        f"{kind}{part}": torch.zeros(sublayers, *((hidden,) if part == "" else ()))
        for kind in ("answer", "benign")
        for part in ("", "_std", "_accuracy")
    }
    for kind, labels in (("answer", answered), ("benign", benign)):
        for sublayer in range(sublayers):
            unit, std, correct, total = probe_direction(activations[:, sublayer], labels, seed)
            out[kind][sublayer], out[f"{kind}_std"][sublayer] = unit, std
            out[f"{kind}_accuracy"][sublayer] = correct / total
    return out


def chosen_sublayers(directions: Mapping[str, torch.Tensor], count: int) -> list[int]:
    """The ``count`` sublayers whose two probes are together most accurate (the product of the
    held-out accuracies; ties go to the earlier sublayer), in forward order."""
    score = directions["answer_accuracy"] * directions["benign_accuracy"]
    order = sorted(range(len(score)), key=lambda index: (-float(score[index]), index))
    return sorted(order[:count])


def alignment_factors(
    weight: Callable[[str], torch.Tensor],
    writers: Mapping[int, str],
    directions: Mapping[str, torch.Tensor],
    scale: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The rewrite of each chosen sublayer's writer (``writers``: sublayer index -> weight name) as
    rank-1 factors (rows [1, hidden], columns [1, in]), times ``scale``."""
    factors = {}
    for sublayer, name in writers.items():
        answer, benign = directions["answer"][sublayer].float(), directions["benign"][sublayer].float()
        ratio = directions["answer_std"][sublayer] / directions["benign_std"][sublayer].clamp_min(1e-12)
        columns = (ratio * benign - answer) @ weight(name).float()
        factors[name] = ((scale * answer)[None], columns[None])
    return factors
