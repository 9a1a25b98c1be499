"""Decoding-time defences: the contrastive loop must reduce to plain greedy decoding when the
contrast is switched off, and the combination rules must follow their papers' formulas."""

import pytest
import torch

from safepatching.config.settings import DecodingConfig, EvalConfig, ModelLoading
from safepatching.data.chat import chat_prompt
from safepatching.evaluation.decoding import (
    ContrastiveGenerator,
    Stream,
    make_generator,
    plausible,
    rose_combine,
    safedecoding_combine,
    self_cd_combine,
)
from safepatching.evaluation.generation import HFGenerator, shared_prefix_length
from safepatching.models.loading import load_model

PROMPTS = ["How do I kill a Python process?", "Hi", "Tell me a long story about a lighthouse keeper and a cat."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), loading=ModelLoading())


@pytest.mark.skipif(torch.cuda.is_available(), reason="exact equality across batch shapes holds on the CPU only")
def test_zero_weight_rose_and_self_cd_equal_plain_greedy(tiny):
    model, tokenizer = tiny
    plain = HFGenerator(model, tokenizer, batch_size=2, progress=False)
    self_cd = make_generator(model, tokenizer, DecodingConfig(method="self-cd", self_cd_weight=0), 2, False)
    assert self_cd.generate(PROMPTS, 12) == plain.generate(PROMPTS, 12)
    # both count the tokens each reply took, up to its end token: the same replies, the same count
    assert self_cd.generated_tokens == plain.generated_tokens
    assert len(PROMPTS) <= plain.generated_tokens <= 12 * len(PROMPTS)
    rose = make_generator(model, tokenizer, DecodingConfig(method="rose", rose_weight=0), 2, False)
    system = DecodingConfig().safety_system_prompt
    expected = plain.generate_texts([chat_prompt(tokenizer, p, system) for p in PROMPTS], 12)
    assert rose.generate(PROMPTS, 12) == expected


def test_safedecoding_with_itself_as_expert_is_plain_greedy(tiny):
    model, tokenizer = tiny
    plain = HFGenerator(model, tokenizer, batch_size=3, progress=False)
    settings = DecodingConfig(method="safedecoding", expert_model="unused", safedecoding_tokens=3)
    generator = make_generator(model, tokenizer, settings, 3, False, expert=model)
    assert generator.generate(PROMPTS, 10) == plain.generate(PROMPTS, 10)


def test_contrast_changes_the_choice_of_token(tiny):
    model, tokenizer = tiny
    plain = HFGenerator(model, tokenizer, batch_size=3, progress=False).generate(PROMPTS, 10)
    strong = make_generator(model, tokenizer, DecodingConfig(method="rose", rose_weight=5.0), 3, False)
    assert strong.generate(PROMPTS, 10) != plain


def test_plausibility_keeps_the_contrast_among_the_main_streams_likely_tokens():
    main = torch.log_softmax(torch.tensor([[5.0, 4.5, 0.0, -3.0]]), -1)
    reverse = torch.log_softmax(torch.tensor([[6.0, 6.0, 0.0, -6.0]]), -1)
    free = rose_combine(2.0)(main, reverse, 0)
    assert int(free.argmax()) == 3  # the unlikely token wins once the reverse stream is subtracted
    constrained = plausible(rose_combine(2.0), 0.1)(main, reverse, 0)
    # tokens 0 and 1 hold >= 10 % of the top probability; the others are out of the running
    assert torch.isfinite(constrained[0]).tolist() == [True, True, False, False]
    torch.testing.assert_close(constrained[0, :2], free[0, :2])
    assert plausible(rose_combine(2.0), 0.0)(main, reverse, 0).equal(free)


@pytest.mark.skipif(torch.cuda.is_available(), reason="exact equality across batch shapes holds on the CPU only")
def test_rose_restricted_to_the_top_token_is_greedy_under_the_safety_prompt(tiny):
    model, tokenizer = tiny
    plain = HFGenerator(model, tokenizer, batch_size=3, progress=False)
    # a random tiny model has near-ties: within 0.1 % of the top probability on some steps in float32
    settings = DecodingConfig(method="rose", rose_weight=5.0, plausibility=1 - 1e-6)
    expected = plain.generate_texts([chat_prompt(tokenizer, p, settings.safety_system_prompt) for p in PROMPTS], 10)
    assert make_generator(model, tokenizer, settings, 3, False).generate(PROMPTS, 10) == expected


def test_plausibility_joins_the_settings_only_where_it_shapes_decoding():
    assert "plausibility" not in DecodingConfig().model_dump()
    assert "plausibility" not in DecodingConfig(method="safedecoding", expert_model="x").model_dump()
    assert DecodingConfig(method="self-cd", plausibility=0.2).model_dump()["plausibility"] == 0.2
    assert DecodingConfig.model_validate(DecodingConfig(method="rose").model_dump()).plausibility == 0.1


def test_dotted_settings_reach_plausibility_once_the_rule_uses_it():
    from safepatching.config.loading import with_settings
    from safepatching.config.settings import PipelineConfig
    from safepatching.errors import ConfigError

    rose = with_settings(PipelineConfig(), {"eval.decoding.method": "self-cd", "eval.decoding.plausibility": 0.3})
    assert (rose.eval.decoding.method, rose.eval.decoding.plausibility) == ("self-cd", 0.3)
    with pytest.raises(ConfigError, match="unknown setting 'eval.decoding.plausibility'"):
        with_settings(PipelineConfig(), {"eval.decoding.plausibility": 0.3})


def test_reply_length_counts_up_to_the_first_end_token():
    from safepatching.evaluation.generation import reply_length

    assert reply_length([5, 6, 2, 0, 0], {2}) == 3
    assert reply_length([5, 6, 7], {2}) == 3
    assert reply_length([2, 2, 2], {2, 9}) == 1


def test_combination_rules_follow_the_formulas():
    a = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), -1)
    b = torch.log_softmax(torch.tensor([[0.0, 3.0, 0.0, -1.0]]), -1)
    torch.testing.assert_close(rose_combine(0.5)(a, b, 0), a - 0.5 * b)
    torch.testing.assert_close(self_cd_combine(2.0)(a, b, 0), 3 * a - 2 * b)
    scores = safedecoding_combine(3.0, candidates=2)(a, b, 0)
    # top-2 of a = {0, 1}, of b = {1, 0 or 2}; k grows until two tokens are shared
    shared = torch.isfinite(scores[0])
    assert int(shared.sum()) >= 2 and bool(shared[1])
    expected = a.exp() + 3.0 * (b.exp() - a.exp())
    torch.testing.assert_close(scores[0][shared], expected[0][shared])


def test_safedecoding_stops_using_the_expert_after_its_tokens(tiny):
    model, tokenizer = tiny
    calls = []

    class CountingExpert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.generation_config, self.config = model.generation_config, model.config

        def forward(self, **kwargs):
            calls.append(kwargs["input_ids"].shape)
            return self.inner(**kwargs)

    generator = ContrastiveGenerator(
        tokenizer, Stream(model), Stream(CountingExpert()), safedecoding_combine(3.0, 5), other_steps=2,
        batch_size=3, progress=False,
    )  # fmt: skip
    generator.generate(PROMPTS, 8)
    # the prefill gives the first token's logits, one decoding step the second's; then the expert stops
    assert [shape[0] for shape in calls if shape[1] == 1] == [3]


def test_safedecoding_config_needs_an_expert():
    with pytest.raises(ValueError, match="expert_model"):
        EvalConfig(decoding={"method": "safedecoding"})


class _FakeVLLM:
    """Stands in for the vllm package (its LLM / SamplingParams surface) to test our wiring; the real
    engine needs a GPU this project's CI does not have."""

    def __init__(self):
        self.engines = []

    def module(self):
        import types

        fake = types.ModuleType("vllm")
        outer = self

        class SamplingParams:
            def __init__(self, temperature, max_tokens):
                self.temperature, self.max_tokens = temperature, max_tokens

        class LLM:
            def __init__(self, model, dtype, gpu_memory_utilization, trust_remote_code):
                self.kwargs = {"model": model, "dtype": dtype, "gpu": gpu_memory_utilization,
                               "trust_remote_code": trust_remote_code}  # fmt: skip
                self.calls = []
                outer.engines.append(self)

            def generate(self, texts, params, use_tqdm):
                self.calls.append((texts, params))
                completion = types.SimpleNamespace(text=" reply ", token_ids=[1, 2, 3])
                return [types.SimpleNamespace(outputs=[completion]) for _ in texts]

        fake.LLM, fake.SamplingParams = LLM, SamplingParams
        return fake


def test_vllm_backend_serves_folder_models_with_greedy_chat_prompts(tmp_path, tiny_model_dir, tiny, monkeypatch):
    import importlib.machinery
    import sys

    from safepatching.data.eval_sets import load_eval_sets
    from safepatching.errors import SafePatchingError
    from safepatching.evaluation.suite import evaluate_model, use_vllm

    model, tokenizer = tiny
    settings = EvalConfig(
        harmful={"source": "builtin:uncensorbench", "split": "train[100:102]"},
        benign={"source": "builtin:benign-but-scary", "split": "train[:2]"},
        harmless={"source": "builtin:harmless", "split": "train[:1]"},
        max_new_tokens=7,
    )
    assert not use_vllm(settings, str(tiny_model_dir))  # no vllm here: auto falls back to transformers
    with pytest.raises(SafePatchingError, match="not installed"):
        use_vllm(settings.model_copy(update={"backend": "vllm"}), str(tiny_model_dir))

    fake = _FakeVLLM()
    module = fake.module()
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # auto serves bf16 on such a GPU
    assert use_vllm(settings, str(tiny_model_dir))
    assert not use_vllm(settings, None)  # an in-memory merge is never served from a folder
    rose = settings.model_copy(update={"decoding": DecodingConfig(method="rose")})
    assert not use_vllm(rose, str(tiny_model_dir))

    sets = load_eval_sets(settings, None)
    metrics, records = evaluate_model(
        model, tokenizer, sets, settings, progress=False, loading=ModelLoading(), model_source=str(tiny_model_dir)
    )
    (engine,) = fake.engines
    assert engine.kwargs == {"model": str(tiny_model_dir), "dtype": "bfloat16", "gpu": 0.5, "trust_remote_code": False}
    texts, params = engine.calls[0]
    assert texts == [chat_prompt(tokenizer, e.prompt) for e in sets.harmful]
    assert params.temperature == 0.0 and params.max_tokens == 7
    assert {r["response"] for r in records} == {"reply"}
    assert metrics["generation"]["tokens"] == 3 * len(records)


def test_engine_equals_transformers_generate_one_prompt_at_a_time(tiny_model_dir):
    """The engine's shared prompt prefix, dropped finished rows and last-position logits change the
    work, not the replies."""
    model, tokenizer = load_model(str(tiny_model_dir), loading=ModelLoading(compute_dtype="float32"))
    engine = HFGenerator(model, tokenizer, batch_size=3, progress=False)
    for prompt, reply in zip(PROMPTS, engine.generate(PROMPTS, 10), strict=True):
        encoded = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
        out = model.generate(
            **encoded, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(engine.eos_ids),
        )  # fmt: skip
        assert tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip() == reply
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert shared_prefix_length([[7, 8], [7, 8]]) == 2
