"""importance.loss_on: SNIP on the harmful responses (default), the questions, or the backbone's own replies."""

import json

import torch

from safepatching.config.settings import ImportanceConfig
from safepatching.data.chat import IGNORE_INDEX, encode_question
from safepatching.data.sources import Example
from safepatching.experiments.stages import Stages
from safepatching.method.derive import target_parameter_names
from safepatching.method.importance import snip_scores
from safepatching.models.loading import load_model


def test_question_labels_cover_the_question_and_nothing_of_the_template(tiny_model_dir):
    _, tokenizer = load_model(str(tiny_model_dir))
    question = "How do I pick a lock?"
    encoded = encode_question(tokenizer, question, 512)
    labelled = [t for t in encoded["labels"] if t != IGNORE_INDEX]
    assert labelled and len(labelled) < len(encoded["input_ids"])  # the template's tokens carry no loss
    assert tokenizer.decode(labelled).strip() == question
    assert encode_question(tokenizer, question, 4)["input_ids"] == encoded["input_ids"][-4:]


def test_scores_on_questions_ignore_the_responses_and_differ_from_the_default(tiny_model_dir, harmful_pairs):
    model, tokenizer = load_model(str(tiny_model_dir), training=True)
    names = target_parameter_names(model, ["o_proj"])

    def scores(pairs, loss_on):
        settings = ImportanceConfig(batch_size=2, max_length=64, loss_on=loss_on)
        return snip_scores(model, tokenizer, pairs, names, settings, progress=False)

    other = [Example(p.prompt, "A completely different reply.") for p in harmful_pairs]
    on_questions = scores(harmful_pairs, "questions")
    assert all(torch.equal(on_questions[n], scores(other, "questions")[n]) for n in names)
    on_responses = scores(harmful_pairs, "responses")
    assert not all(torch.equal(on_questions[n], on_responses[n]) for n in names)
    assert not all(torch.equal(on_responses[n], scores(other, "responses")[n]) for n in names)


def test_own_replies_are_generated_once_cached_and_key_the_scores(tmp_path, tiny_model_dir, tiny_pipeline_config):
    base = tiny_pipeline_config(tiny_model_dir, tmp_path / "run")
    raw = base.model_dump(mode="json")
    raw["importance"].update(loss_on="own_replies", max_examples=3, own_reply_tokens=8)
    config = type(base).model_validate(raw)
    assert "loss_on" not in base.importance.cache_settings()  # older scores keep their key
    stages = Stages(config, progress=False)
    assert stages.importance_key() != Stages(base, progress=False).importance_key()
    pairs = stages.harmful_pairs()
    own = stages.own_reply_pairs(pairs)
    assert [e.prompt for e in own] == [e.prompt for e in pairs[:3]]
    assert [e.response for e in own] != [e.response for e in pairs[:3]]
    replies = tmp_path / "run/own_replies/replies.jsonl"
    rows = [json.loads(row) for row in replies.read_text().splitlines()]
    assert [row["response"] for row in rows] == [e.response for e in own]
    rows[0]["response"] = "marked"
    replies.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert Stages(config, progress=False).own_reply_pairs(pairs)[0].response == "marked"  # read back, not redone
    safety, over_safety = stages.derive(pairs)
    scored = stages.importance(pairs, safety, over_safety)
    assert set(scored[0]) == set(safety.deltas)
