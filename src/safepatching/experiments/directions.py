"""`safepatching directions`: where a backbone keeps refusal and false refusal, layer by layer.

For each layer (at the last post-instruction position) the report gives the norms of the refusal
direction r = mean(harmful) - mean(harmless) and the false-refusal direction v = mean(benign) -
mean(harmless), their cosine, and two probes' held-out accuracy: harmful vs harmless (is refusal's
input linearly there?) and harmful vs benign-but-scary (does the model tell real harm from what only
sounds like it, even where its refusals do not?). The directions of every layer and position are
saved beside the report for the edits that use them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from safepatching.config.experiments import DirectionsConfig
from safepatching.data.eval_sets import load_eval_sets
from safepatching.evaluation.judges.registry import Judges
from safepatching.experiments.backbone import Backbone
from safepatching.experiments.directional import (
    MIN_PROMPTS,
    SETS,
    direction_prompts,
    directions_of,
    refusals,
    refused_only,
    set_activations,
)
from safepatching.method.alignment import probe_direction
from safepatching.method.directions import activations, mean_difference, probe_accuracy, sublayer_names
from safepatching.models.precision import resolved
from safepatching.report.results import result_header
from safepatching.report.statistics import wilson_interval
from safepatching.storage.files import save_tensors, write_json, write_text_atomic

DIRECTIONS_SCHEMA_VERSION = 1


def layer_rows(
    activations: dict[str, torch.Tensor], seed: int, refused: dict[str, list[bool]] | None = None
) -> list[dict[str, Any]]:
    """The per-layer report at the last post-instruction position. ``refused``: the backbone's own
    refusals of the harmful and benign prompts, for the refused-vs-answered probe."""
    last = {name: acts[:, :, -1] for name, acts in activations.items()}
    split = None
    if refused is not None:
        flags = torch.tensor(refused["harmful"] + refused["benign"])
        both = torch.cat([last["harmful"], last["benign"]])
        if min(int(flags.sum()), int((~flags).sum())) >= MIN_PROMPTS:  # a probe needs both classes
            split = both[flags], both[~flags]
    refusal = mean_difference(last["harmful"], last["harmless"])
    false_refusal = mean_difference(last["benign"], last["harmless"])
    rows = []
    for layer in range(refusal.shape[0]):
        r, v = refusal[layer], false_refusal[layer]
        rows.append(
            {
                "layer": layer,
                "norm_r": round(float(r.norm()), 4),
                "norm_v": round(float(v.norm()), 4),
                "cos_r_v": round(float(torch.nn.functional.cosine_similarity(r, v, dim=0)), 4),
                **probe_columns("harmful_vs_harmless", last["harmful"][:, layer], last["harmless"][:, layer], seed),
                **probe_columns("harmful_vs_benign", last["harmful"][:, layer], last["benign"][:, layer], seed),
                **(probe_columns("refused_vs_answered", split[0][:, layer], split[1][:, layer], seed) if split else {}),
            }
        )
    return rows


def probe_columns(name: str, first: torch.Tensor, second: torch.Tensor, seed: int) -> dict[str, Any]:
    """A probe's held-out accuracy in % with its 95 % Wilson interval and the held-out count."""
    return accuracy_columns(name, *probe_accuracy(first, second, seed))


def accuracy_columns(name: str, correct: int, total: int) -> dict[str, Any]:
    low, high = wilson_interval(correct, total)
    return {f"probe_{name}": round(100 * correct / total, 1), f"probe_{name}_95ci": [round(low, 1), round(high, 1)],
            f"probe_{name}_held_out": total}  # fmt: skip


def sublayer_rows(
    outputs: torch.Tensor, names: list[str], harmful: int, refused: list[bool], seed: int
) -> list[dict[str, Any]]:
    """align's view of each attention and MLP output (``outputs`` [prompt, sublayer, hidden] of the
    harmful then the benign prompts): the held-out accuracy of its answered/refused and benign/harmful
    probes and the cosine of their directions."""
    answered = torch.tensor([not flag for flag in refused])
    benign = torch.arange(len(refused)) >= harmful
    rows = []
    for index, name in enumerate(names):
        answer, _, *answer_counts = probe_direction(outputs[:, index], answered, seed)
        harm, _, *harm_counts = probe_direction(outputs[:, index], benign, seed)
        rows.append({"sublayer": name, "cos_answer_benign": round(float(answer @ harm), 4),
                     **accuracy_columns("answered_vs_refused", *answer_counts),
                     **accuracy_columns("benign_vs_harmful", *harm_counts)})  # fmt: skip
    return rows


def directions_markdown(result: dict[str, Any]) -> str:
    sizes = ", ".join(f"{name} {count}" for name, count in result["sizes"].items())
    refused = result.get("refused")
    probed = bool(result["layers"]) and "probe_refused_vs_answered" in result["layers"][0]
    note = ""
    if refused:
        note = (f" The backbone refuses {refused['harmful']} harmful and {refused['benign']} benign prompts; "
                + ("the last probe tells its refusals from its answers." if probed else
                   f"too few of one kind for the refused/answered probe (it needs {MIN_PROMPTS} of each)."))  # fmt: skip
    lines = [
        f"# {result['name']}: residual directions of {result['backbone']}",
        "",
        f"Command: `{result['command']}`; compute dtype {result['compute_dtype']}; prompts: {sizes}; "
        f"{result['positions']} post-instruction positions (the table: the last). Probe accuracies are on a "
        f"held-out quarter of the prompts, with 95 % Wilson intervals.{note}",
        "",
        "| layer | norm r | norm v | cos(r, v) | probe harmful/harmless (%) | probe harmful/benign (%) |"
        + (" probe refused/answered (%) |" if probed else ""),
        "|---:|---:|---:|---:|---:|---:|" + ("---:|" if probed else ""),
    ]

    def probe(row: dict[str, Any], name: str) -> str:
        low, high = row[f"probe_{name}_95ci"]
        return f"{row[f'probe_{name}']:.1f} [{low:.1f}, {high:.1f}]"

    for row in result["layers"]:
        lines.append(
            f"| {row['layer']} | {row['norm_r']:.2f} | {row['norm_v']:.2f} | {row['cos_r_v']:.2f} | "
            f"{probe(row, 'harmful_vs_harmless')} | {probe(row, 'harmful_vs_benign')} |"
            + (f" {probe(row, 'refused_vs_answered')} |" if probed else "")
        )
    if result.get("sublayers"):
        lines += [
            "",
            "Attention and MLP outputs (what `align` rewrites), on the harmful and benign prompts at the last "
            "position: its two probes' held-out accuracy and the cosine of their directions.",
            "",
            "| sublayer | probe answered/refused (%) | probe benign/harmful (%) | cos(answer, benign) |",
            "|---|---:|---:|---:|",
        ]
        for row in result["sublayers"]:
            lines.append(f"| {row['sublayer']} | {probe(row, 'answered_vs_refused')} | {probe(row, 'benign_vs_harmful')} | "
                         f"{row['cos_answer_benign']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_directions(config: DirectionsConfig, command: str = "", progress: bool = True) -> dict[str, Any]:
    """Write OUTPUT_DIR/<name>.json and .md (the report) and <name>.safetensors (r and v of every
    layer and position)."""
    started = time.perf_counter()
    pipeline = config.pipeline
    evaluated = load_eval_sets(pipeline.eval, pipeline.data_dir).named()
    prompts = direction_prompts(config, pipeline.data_dir, evaluated)  # bad data fails here, before the model loads
    loading = resolved(pipeline.loading)
    model, tokenizer = Backbone(pipeline.model, loading, pipeline.derive.target_modules).model()
    judge = Judges(pipeline.eval, pipeline.data_dir, loading=loading).refusal
    batch = pipeline.eval.batch_size
    if config.benign_refused_only:
        prompts["benign"] = refused_only(model, tokenizer, config, prompts["benign"], judge, batch)
    residual = set_activations(model, tokenizer, prompts, config.batch_size, loading.compute_dtype, progress)
    positions = residual["harmful"].shape[2]
    refused = None
    if config.refusal_probe:
        tokens = config.refusal_max_new_tokens
        refused = {
            name: refusals(model, tokenizer, prompts[name], judge, tokens, batch) for name in ("harmful", "benign")
        }
    layers = layer_rows(residual, config.seed, refused)
    sublayers = None
    if refused is not None and "probe_refused_vs_answered" in layers[0]:  # both kinds of reply are there
        both = prompts["harmful"] + prompts["benign"]
        outputs = activations(model, tokenizer, both, 1, config.batch_size, loading.compute_dtype, "sublayers")[:, :, 0]
        names = sublayer_names(model)
        sublayers = sublayer_rows(
            outputs, names, len(prompts["harmful"]), refused["harmful"] + refused["benign"], config.seed
        )
    result = {
        **result_header(config, command, time.perf_counter() - started, True, DIRECTIONS_SCHEMA_VERSION),
        "positions": positions,
        "sizes": {name: len(prompts[name]) for name in SETS},
        "refused": refused and {name: sum(flags) for name, flags in refused.items()},
        "layers": layers,
        "sublayers": sublayers,
        "config": config.model_dump(mode="json"),
    }
    base = Path(config.output_dir)
    write_json(base / f"{config.name}.json", result)
    write_text_atomic(base / f"{config.name}.md", directions_markdown(result))
    save_tensors(base / f"{config.name}.safetensors", directions_of(residual))
    Console(highlight=False).print(directions_markdown(result))
    return result
