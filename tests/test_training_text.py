"""One text for selection, training and export (issue 27): the chat template applied once at ingest, the same ids
through the token-feature path and the fine-tuning path, and `source.too_long` (drop, cut, keep) counted."""
from __future__ import annotations

import json

import pytest

from sftcurate.core.config import CurateConfig, FinetuneConfig, SourceConfig
from sftcurate.core.ingest import examples_meta, ingest, load_examples, load_pool, source_fingerprint
from sftcurate.core.tokenize import encode_pairs, example_rows
from sftcurate.data_contracts import UserError
from sftcurate.infra import progress
from tests.helpers import write_jsonl

# ChatML with a default system prompt, as SmolLM2-Instruct's template.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> str:
    """A tiny GPT-2 folder whose tokenizer has ChatML special tokens and a chat template (a local model spec)."""
    from sftcurate.infra.models import build_tiny_gpt2, loading_lock

    folder = tmp_path_factory.mktemp("tiny-chat")
    tiny = build_tiny_gpt2("tiny-gpt2")
    tiny.tokenizer.save_pretrained(folder)  # a copy: the tiny tokenizer is cached and shared by other tests
    with loading_lock() as tf:
        tok = tf.AutoTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    tiny.model.resize_token_embeddings(len(tok))
    tiny.model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def chat(i: int, answer: str = "") -> dict:
    return {"messages": [{"role": "user", "content": f"How do Python lists work, case {i}?"},
                         {"role": "assistant", "content": answer or f"Lists keep order, case {i}."}]}


def run_ingest(uri: str, spec: str, max_length: int = 128, template: str = "auto", **source) -> str:
    src = SourceConfig(uri=uri, heldout_fraction=0.0, **source)
    return ingest(src, source_fingerprint(src), spec, max_length, template)


def rendered_ids(tokenizer, messages: list[dict]) -> list[int]:
    """What TRL's SFTTrainer tokenizes for a `messages` record: the rendered chat, tokenized whole."""
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def test_features_and_fine_tuning_see_the_same_chat_template_ids(tmp_path, store_root, chat_model, monkeypatch):
    from sftcurate.core import embedding, finetune
    from sftcurate.flows.curate import select_pipeline
    from sftcurate.infra.models import model_fingerprint, resolve_tokenizer

    write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(6)])
    cfg = CurateConfig.model_validate({"source": {"uri": str(tmp_path / "chat.jsonl"), "heldout_fraction": 0.0},
                                       "selection": {"method": "uniform", "budget": 6},
                                       "models": {"target": chat_model, "max_length": 128}})
    examples_uri, selection_uri = select_pipeline(cfg, None)
    assert examples_meta(examples_uri).template == "chat"
    seen: dict[str, list] = {}

    def recording(path):
        def encode(tokenizer, rows, max_length=None):
            out = encode_pairs(tokenizer, rows, max_length)
            seen.setdefault(path, []).extend(out)
            return out
        return encode

    monkeypatch.setattr(embedding, "encode_pairs", recording("features"))
    monkeypatch.setattr(finetune, "encode_pairs", recording("finetune"))
    fp = model_fingerprint(chat_model)
    embedding.embed_shard(examples_uri, 0, 64, chat_model, fp, 128, 4096)
    finetune.finetune(examples_uri, selection_uri, chat_model, fp, FinetuneConfig(steps=1, batch_size=2,
                                                                                   max_length=128))
    pool = load_pool(examples_uri)
    tok = resolve_tokenizer(chat_model)
    by_response = dict(zip(pool.column("response").to_pylist(), seen["features"]))
    trained = {tuple(e.input_ids): e.loss_mask for e in seen["finetune"]}
    for i in range(6):
        record = chat(i)
        features = by_response[record["messages"][1]["content"]]
        assert features.input_ids == rendered_ids(tok, record["messages"])          # TRL's ids, whole template
        assert trained[tuple(features.input_ids)] == features.loss_mask            # fine-tune: same ids, same loss
        loss_text = tok.decode([t for t, m in zip(features.input_ids, features.loss_mask) if m])
        assert loss_text == record["messages"][1]["content"] + "<|im_end|>"       # the answer and its end of turn
    assert pool.column("response_tokens").to_pylist() == [e.n_loss for e in seen["features"]]  # budget = loss


def test_every_assistant_turn_of_a_chat_carries_the_loss_under_the_template(tmp_path, store_root, chat_model):
    from sftcurate.infra.models import resolve_tokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second question"},
                {"role": "assistant", "content": "second answer"}, {"role": "user", "content": "unanswered"}]
    write_jsonl(tmp_path / "multi.jsonl", [{"messages": messages}])
    pool = load_pool(run_ingest(str(tmp_path / "multi.jsonl"), chat_model))
    tok = resolve_tokenizer(chat_model)
    (e,) = encode_pairs(tok, example_rows(pool), 128)
    assert e.input_ids == rendered_ids(tok, messages[:5])  # up to the last assistant turn: no loss after it
    loss_runs, run = [], []
    for t, m in zip(e.input_ids, e.loss_mask):
        if m:
            run.append(t)
        elif run:
            loss_runs, run = loss_runs + [tok.decode(run)], []
    assert loss_runs + ([tok.decode(run)] if run else []) == ["first answer<|im_end|>", "second answer<|im_end|>"]
    assert pool.column("response_tokens").to_pylist() == [e.n_loss]


def test_too_long_records_are_dropped_and_counted(tmp_path, store_root, chat_model):
    long_answer = " ".join(f"word{i}" for i in range(200))
    write_jsonl(tmp_path / "mixed.jsonl", [chat(i) for i in range(5)] + [chat(9, long_answer), chat(8, long_answer)])
    uri = run_ingest(str(tmp_path / "mixed.jsonl"), chat_model, max_length=96, too_long="drop")
    meta, table = examples_meta(uri), load_examples(uri)
    assert (meta.too_long_dropped, meta.too_long_cut, meta.n_examples) == (2, 0, 5)
    assert long_answer not in table.column("response").to_pylist()
    assert max(a + b for a, b in zip(table.column("prompt_tokens").to_pylist(),
                                     table.column("response_tokens").to_pylist())) <= 96


def test_held_out_examples_stay_whole_and_a_pool_that_all_drops_is_one_line(tmp_path, store_root):
    from sftcurate.core.ingest import is_heldout

    long_answers = [" ".join(f"word{i}_{j}" for j in range(60)) for i in range(30)]
    records = [{"prompt": f"question {i}", "response": a} for i, a in enumerate(long_answers)]
    write_jsonl(tmp_path / "long.jsonl", records)
    src = SourceConfig(uri=str(tmp_path / "long.jsonl"), heldout_fraction=0.3, too_long="drop")
    ids = load_examples(ingest(src.model_copy(update={"too_long": "keep"}), source_fingerprint(src), "tiny-gpt2",
                               48)).column("id").to_pylist()
    assert 0 < is_heldout(ids, 0.3).sum() < len(ids)
    with pytest.raises(UserError, match="every pool example is longer than models.max_length"):
        ingest(src, source_fingerprint(src), "tiny-gpt2", 48)
    mixed = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(30)] + records
    write_jsonl(tmp_path / "mixed.jsonl", mixed)
    src = SourceConfig(uri=str(tmp_path / "mixed.jsonl"), heldout_fraction=0.3, too_long="drop")
    uri = ingest(src, source_fingerprint(src), "tiny-gpt2", 48)
    table = load_examples(uri)
    split = dict(zip(table.column("response").to_pylist(), table.column("split").to_pylist()))
    assert {split[a] for a in long_answers if a in split} == {"heldout"}  # long ones only where never selected
    assert examples_meta(uri).too_long_dropped == sum(1 for a in long_answers if a not in split) > 0


def test_a_cut_record_is_exported_as_cut_and_counted_as_trained(tmp_path, store_root, chat_model):
    from sftcurate.infra.models import resolve_tokenizer

    long_answer = " ".join(f"word{i}" for i in range(200))
    write_jsonl(tmp_path / "mixed.jsonl", [chat(i) for i in range(3)] + [chat(9, long_answer)])
    events = []
    unsubscribe = progress.subscribe(lambda name, event, detail: events.append((name, detail.get("step"))))
    try:
        uri = run_ingest(str(tmp_path / "mixed.jsonl"), chat_model, max_length=96)  # cut is the default
    finally:
        unsubscribe()
    assert ("ingest: chat template, too_long cut", 4) in events  # the rendering reports its progress, labelled
    meta, rows = examples_meta(uri), load_examples(uri).to_pylist()
    assert (meta.too_long, meta.too_long_cut, meta.too_long_dropped, meta.n_examples) == ("cut", 1, 0, 4)
    (cut,) = [r for r in rows if r["response"].startswith("word0 word1")]
    assert long_answer.startswith(cut["response"]) and len(cut["response"]) < len(long_answer)
    raw = json.loads(cut["raw"])  # what the export writes: the record as it trains
    assert raw["messages"][1]["content"] == cut["response"]
    tok = resolve_tokenizer(chat_model)
    ids = rendered_ids(tok, raw["messages"])
    assert 90 <= len(ids) <= 96 and cut["prompt_tokens"] + cut["response_tokens"] == len(ids)


def test_keep_measures_a_long_record_whole(tmp_path, store_root, chat_model):
    from sftcurate.infra.models import resolve_tokenizer

    long_answer = " ".join(f"word{i}" for i in range(200))
    write_jsonl(tmp_path / "long.jsonl", [chat(0), chat(9, long_answer)])
    uri = run_ingest(str(tmp_path / "long.jsonl"), chat_model, max_length=96, too_long="keep")
    meta, rows = examples_meta(uri), load_examples(uri).to_pylist()
    assert (meta.too_long_whole, meta.too_long_cut, meta.too_long_dropped) == (1, 0, 0)
    (long,) = [r for r in rows if r["response"] == long_answer]
    assert long["prompt_tokens"] + long["response_tokens"] == len(rendered_ids(resolve_tokenizer(chat_model),
                                                                               chat(9, long_answer)["messages"]))
    (head,) = encode_pairs(resolve_tokenizer(chat_model), [(long["prompt"], long["response"], long["turns"])], 96)
    assert len(head.input_ids) == 96  # features and the built-in fine-tune see the first max_length tokens


def test_a_format_string_renders_every_example_and_plain_is_the_old_text(tmp_path, store_root, chat_model):
    from sftcurate.infra.models import resolve_tokenizer

    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "What is 2+2?", "response": "4"}])
    tok = resolve_tokenizer(chat_model)
    formatted = load_pool(run_ingest(str(tmp_path / "qa.jsonl"), chat_model,
                                     template="Q: {prompt}\nA: {response}"))
    (e,) = encode_pairs(tok, example_rows(formatted), 128)
    assert tok.decode(e.input_ids) == "Q: What is 2+2?\nA: 4" + tok.eos_token
    assert tok.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m]) == "4" + tok.eos_token
    plain = load_pool(run_ingest(str(tmp_path / "qa.jsonl"), chat_model, template="plain"))
    assert plain.column("turns").to_pylist() == [""]  # prompt ids + response ids + eos, as before templates
    assert examples_meta(run_ingest(str(tmp_path / "qa.jsonl"), "tiny-gpt2")).template == "plain"  # auto


def test_a_template_that_cannot_be_used_is_one_line(tmp_path, store_root):
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(UserError, match="has no chat template"):
        run_ingest(str(tmp_path / "qa.jsonl"), "tiny-gpt2", template="chat")
    with pytest.raises(ValueError, match=r"\{prompt\} and then \{response\}"):
        CurateConfig.model_validate({"models": {"template": "{response} after {prompt}"}})


def test_the_curation_report_states_what_was_cut_and_dropped(tmp_path, store_root):
    from sftcurate.core.curation_report import curation_report
    from sftcurate.core.export import export
    from sftcurate.flows.curate import select_pipeline

    long_answer = " ".join(f"word{i}" for i in range(200))
    records = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(6)] + [
        {"prompt": "long one", "response": long_answer}, {"prompt": " ".join(["context"] * 200), "response": "x"}]
    write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = CurateConfig.model_validate({"source": {"uri": str(tmp_path / "pool.jsonl"), "heldout_fraction": 0.0},
                                       "selection": {"method": "uniform", "budget": 7},
                                       "models": {"target": "tiny-gpt2", "max_length": 32}})
    examples_uri, selection_uri = select_pipeline(cfg, None)
    markdown, _ = curation_report(examples_uri, selection_uri, "text-test")
    # the long answer is cut; the record whose prompt alone fills max_length has no room for an answer: dropped
    assert "Template `plain`, at most 32 tokens per example" in markdown
    assert "2 records were longer: 1 cut, 1 dropped, 0 kept whole (source.too_long: cut)" in markdown
    export(selection_uri, str(tmp_path / "out.jsonl"))
    exported = {r["prompt"]: r["response"] for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert len(exported) == 7 and records[-1]["prompt"] not in exported  # every kept record, not the dropped one
    cut = exported["long one"]
    assert long_answer.startswith(cut) and len(cut) < len(long_answer)  # exported as it was selected and trained
    (row,) = [r for r in load_examples(examples_uri).to_pylist() if r["prompt"] == "long one"]
    assert row["response"] == cut and row["prompt_tokens"] + row["response_tokens"] <= 32


def test_a_chat_whose_later_context_does_not_fit_is_cut_after_its_last_whole_answer(tmp_path, store_root,
                                                                                       chat_model):
    long_question = " ".join(f"word{i}" for i in range(200))
    messages = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": long_question}, {"role": "assistant", "content": "second answer"}]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}, chat(1)])
    uri = run_ingest(str(tmp_path / "chat.jsonl"), chat_model, max_length=96)
    assert examples_meta(uri).too_long_cut == 1
    (row,) = [r for r in load_examples(uri).to_pylist() if r["response"] == "first answer"]
    assert json.loads(row["raw"])["messages"] == messages[:2]  # exported as it trains: up to the whole answer


def test_a_chat_template_that_refuses_a_record_names_the_row(chat_model):
    import copy

    from sftcurate.core.training_text import ExampleText, TemplateError, fit_examples
    from sftcurate.infra.models import resolve_tokenizer

    tok = copy.deepcopy(resolve_tokenizer(chat_model))
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with "
                         "a user turn') }}{% endif %}" + CHATML)
    texts = [ExampleText({"prompt": "p", "response": "r"}, "prompt_response", "p", "r"),
             ExampleText({"text": "a passage"}, "text", "", "a passage")]
    with pytest.raises(TemplateError, match=r"^data.jsonl: line 2: the target's chat template refuses .*start with a "
                                            r"user turn.*set models.template to plain or a format string$"):
        fit_examples(tok, "auto", 128, "cut", texts, {}, ["data.jsonl: line 1", "data.jsonl: line 2"])


def test_multi_turn_chats_under_a_format_string_and_a_cut_under_plain():
    from sftcurate.core.formats import normalize
    from sftcurate.core.training_text import ExampleText, fit_examples
    from sftcurate.infra.models import resolve_tokenizer

    tok = resolve_tokenizer("tiny-gpt2")
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first q"},
                           {"role": "assistant", "content": "first a"}, {"role": "user", "content": "second q"},
                           {"role": "assistant", "content": " ".join(f"w{i}" for i in range(80))}]}
    text = ExampleText(record, "messages", *normalize(record, "messages", {}))
    (formatted,) = fit_examples(tok, "Q: {prompt}\nA: {response}", 1024, "cut", [text], {}).texts
    e = formatted.encode(tok)
    assert tok.decode(e.input_ids).startswith("Q: Be brief.\n\nfirst q\nA: first a" + tok.eos_token +
                                              "Q: second q\nA: w0")
    assert tok.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m]).startswith("first a" + tok.eos_token + "w0")
    short = {"messages": record["messages"][:4] + [{"role": "assistant", "content": "w0"}]}
    limit = len(ExampleText(short, "messages", *normalize(short, "messages", {})).encode(tok).input_ids) + 10
    fitted = fit_examples(tok, "plain", limit, "cut", [text], {})
    (cut,) = fitted.texts
    assert fitted.cut == 1 and cut.encode(tok).n_loss == fitted.loss_tokens[0]
    assert limit - 3 <= len(cut.encode(tok).input_ids) <= limit  # room for the second answer's first words
    turns = cut.record["messages"]
    assert turns[:4] == record["messages"][:4] and record["messages"][4]["content"].startswith(turns[4]["content"])
    assert 0 < len(turns[4]["content"]) < len(record["messages"][4]["content"])  # the second answer cut, first whole
