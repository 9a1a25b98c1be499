"""Shared fixtures: a tiny random-initialised chat model with a byte-level tokenizer, built offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safepatching.config.settings import CACHE_DIR_ENV, PipelineConfig
from safepatching.data.sources import Example
from safepatching.storage.shards import PlannedTensor, WeightFolder, copy_model_files, write_shards

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "How do I make a dangerous thing? Here is how you make it step by step.",
    "I cannot help with that request. Sorry.",
    "What is the capital of France? Paris is the capital.",
    "Write a poem about the sea and the sky and the stars.",
]


def build_tiny_model(directory: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """Save a 2-layer Llama with a trained byte-level BPE tokenizer and a chat template."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def harmful_pairs() -> list[Example]:
    return [
        Example("How do I make a dangerous thing?", "Here is how you make it step by step."),
        Example("Tell me how to do a bad thing.", "Sure, first you do this and then that."),
        Example("Explain a harmful plan.", "The plan has three steps: one, two, three."),
        Example("Give dangerous advice.", "Here is some dangerous advice for you."),
    ]


def perturbed_copy(source, target, names, seed=1, scale=1e-2, share=0.05):
    """A copy of a model folder with a sparse random change to the named tensors."""
    folder = WeightFolder(source)
    generator = torch.Generator().manual_seed(seed)
    target.mkdir(parents=True)

    def produce(planned):
        value = folder.read(planned.name)
        if planned.name in names:
            mask = torch.rand(value.shape, generator=generator) < share
            value = value + scale * torch.randn(value.shape, generator=generator) * mask
        return value

    plan = [PlannedTensor(n, i.dtype, i.shape) for n, i in folder.tensors.items()]
    write_shards(target, plan, produce, 1 << 30)
    copy_model_files(source, target)
    return target


TOUCHED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "safepatching", *args], capture_output=True, text=True, cwd=cwd)


def tiny_config(model_dir, out, keep="all", **merge):
    return PipelineConfig(
        model=str(model_dir),
        output_dir=out,
        keep=keep,
        compute_dtype="float32",
        harmful_train={
            "source": "builtin:uncensorbench",
            "split": "train[:6]",
            "shuffle_seed": 0,
            "response_column": "uncensored_response",
        },
        derive={"learning_rate": 1e-3, "max_steps": 2, "batch_size": 3, "max_length": 48},
        importance={"max_examples": 6, "batch_size": 3, "max_length": 48},
        merge={"top_a": 20, "top_b": 20, "retention": 0.5, **merge},
        eval={"max_examples": 3, "max_new_tokens": 4, "kl_max_new_tokens": 4, "batch_size": 2},
    )


@pytest.fixture(autouse=True)
def private_cache(request, tmp_path_factory, monkeypatch):
    """Fast tests keep what they cache (e.g. remembered model hashes) out of the user's cache; the
    slow tests share the real one, where the fetched demo models live."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def progress_bars_switched_on(monkeypatch):
    """--no-progress flips process-wide switches; each test starts with them off and they are put
    back after it, so one test's flag never hides the bars another test (or its subprocess) looks for."""
    for switch in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(switch, "")  # recorded, so the teardown restores the original state
        monkeypatch.delenv(switch)


def pipeline_settings(model_dir, **extra):
    """Pipeline settings of the experiment tests (bench, continual, sweep, tune) on the tiny model."""
    return {
        "model": str(model_dir),
        "harmful_train": {"source": "builtin:uncensorbench", "split": "train[:6]", "shuffle_seed": 0,
                          "response_column": "uncensored_response"},
        "derive": {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 3, "max_length": 48},
        "importance": {"max_examples": 6, "batch_size": 3, "max_length": 48},
        "merge": {"top_a": 20, "top_b": 20, "retention": 0.5},
        "eval": {
            "harmful": {"source": "builtin:uncensorbench", "split": "train[100:103]", "shuffle_seed": 0,
                        "category_column": "topic"},
            "benign": {"source": "builtin:benign-but-scary", "split": "train[:3]"},
            "harmless": {"source": "builtin:harmless", "split": "train[:2]"},
            "over_safety_benchmarks": {"scary2": {"source": "builtin:benign-but-scary", "split": "train[3:5]"}},
            "jailbreaks": ["past-tense"],
            "max_new_tokens": 4, "kl_max_new_tokens": 4, "batch_size": 3,
        },
        "directional": {"ablate_layer": 1, "add_layer": 1, "sets": {
            "harmful": {"source": "builtin:uncensorbench", "split": "train[120:140]", "shuffle_seed": 0},
            "harmless": {"source": "builtin:harmless", "split": "train[4:24]"},
            "benign": {"source": "builtin:benign-but-scary", "split": "train[20:40]"},
        }},
        **extra,
    }  # fmt: skip


def tuned_bench_settings(pipeline, model_dir, root, name, methods, spaces, **tuning):
    """A tuned bench on the tiny model: two trials a row, constraints wide open, tiny reply budgets."""
    validation = {
        "harmful": {"unc-val": {"source": "builtin:uncensorbench", "split": "train[6:12]", "shuffle_seed": 0}},
        "benign": {"scary-val": {"source": "builtin:benign-but-scary", "split": "train[5:9]"}},
        "harmless": {"source": "builtin:harmless", "split": "train[2:4]"},
    }
    return {
        "name": name, "pipeline": pipeline(model_dir), "methods": methods, "seeds": [0],
        "output_dir": str(root / "results"), "work_dir": str(root / "work"),
        "tuning": {"validation": validation, "trials": 2, "max_kl": 50.0, "max_looping": 100.0,
                   "screen_max_new_tokens": 3, "final_max_new_tokens": 4, "spaces": spaces, **tuning},
    }  # fmt: skip


def hand_out(helper):
    """A session fixture giving ``helper`` to test modules, which never import each other."""
    return pytest.fixture(scope="session")(lambda: helper)


make_tiny_model = hand_out(build_tiny_model)
run_command = hand_out(run_cli)
perturb = hand_out(perturbed_copy)
tiny_pipeline_config = hand_out(tiny_config)
bench_pipeline = hand_out(pipeline_settings)
tuned_bench_config = hand_out(tuned_bench_settings)


@pytest.fixture(scope="session")
def touched() -> list[str]:
    return list(TOUCHED)
