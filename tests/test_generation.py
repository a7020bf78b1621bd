"""Generation tasks: prompt/response rows declared in TOML, trained on response tokens, scored on what a model
writes (batched generation pinned against one prompt at a time; metrics pinned against the libraries)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_toml, write_notes_task, write_rows

from fedcollm.config import Config, preset_tasks
from fedcollm.data.batching import SFTData, encode_response
from fedcollm.data.tasks import GenExample, load_split
from fedcollm.errors import ConfigError, DataError
from fedcollm.generation import Decoding, generate, prompt_ids, response_nll
from fedcollm.metrics import exact_match, rouge_l, score_text, token_f1
from fedcollm.models.tiny import tiny_llama


@pytest.fixture
def notes_toml(tmp_path, data_dir) -> Path:
    """A config file declaring the generation task `notes` only in TOML, with Alpaca as D^a."""
    task = write_notes_task(tmp_path / "notes", data_dir)
    path = tmp_path / "notes.toml"
    path.write_text(tiny_toml(data_dir, data={"tasks": ["notes"], "aux_tasks": ["alpaca"], "train_per_task": 24,
                                              "eval_limit": 6}, run={"out_dir": str(tmp_path / "run")}) + task,
                    encoding="utf-8")
    return path


@pytest.fixture
def notes_config(notes_toml) -> Config:
    return Config.from_toml(notes_toml)


def test_toml_task_trains_a_fedcollm_round_on_alpaca_aux_and_scores_every_metric(notes_config, tokenizer):
    from fedcollm.engines.inprocess import run_method
    from fedcollm.models.tiny import tiny_pair
    from fedcollm.runs import RunDir
    from fedcollm.workbench import Workbench

    cfg = notes_config.override(["federation.rounds=1"])
    llm, slm = tiny_pair(seed=0)
    wb = Workbench.from_models(cfg, llm, slm, tokenizer)
    assert {ex.task for ex in wb.split.aux} == {"alpaca"} and all(isinstance(ex, GenExample) for ex in wb.split.aux)
    run = RunDir(Path(cfg.run.out_dir))
    final = run_method(wb, "fedcollm", run)
    record = run.read_metrics("fedcollm")[-1]
    assert record["budget"]["llm_steps"] > 0 and record["kd_first"]["kl_g"] > 0
    for which in ("llm", "slm"):
        block = final[which]["notes"]
        assert block["metric"] == "rouge_l" and block["n"] == 6 and len(block["items"]) == 6
        for m in ("rouge_l", "token_f1", "exact_match"):
            assert 0 <= block[m] <= 1
            assert block[m] == pytest.approx(sum(it[m] for it in block["items"]) / 6)
        assert math.isfinite(block["perplexity"]) and block["perplexity"] > 1
        item = block["items"][0]
        assert {"id", "prompt", "reference", "generation", "nll", "tokens"} <= set(item)
        assert block["generation"]["tokens"] > 0


def test_optional_field_picks_the_short_prompt_and_references_are_scored(notes_config):
    spec = notes_config.task_specs(["notes"])["notes"]
    examples = load_split("notes", spec, "test", None)
    assert examples[0].context.endswith("Reply:") and "Details" not in examples[0].context
    assert "Details: urgent" in examples[1].context
    assert examples[0].target.startswith(" ") and examples[0].references[0] == examples[0].target[1:]
    best = score_text(examples[0].references[1], examples[0].references, ["exact_match"])
    assert best == {"exact_match": 1.0}  # the second reference alone matches


def test_training_covers_the_response_and_its_end_only(tokenizer):
    ex = GenExample("1", "t", "Question: what is two and two?\nAnswer:", " four", ("four",))
    ids, n = encode_response(tokenizer, ex, 64)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[-n:-1]) == " four"
    assert tokenizer.decode(ids[:-n]) == ex.context


def test_an_overlong_pair_keeps_the_response_start_after_its_prompt(tokenizer, caplog):
    ex = GenExample("1", "t", "Question: " + "why " * 80 + "?\nAnswer:", " " + "because " * 80, ("x",))
    ids, n = encode_response(tokenizer, ex, 32)
    assert len(ids) == 32 and n == 16  # the prompt keeps half
    assert tokenizer.decode(ids[:16]).endswith("?\nAnswer:")
    assert tokenizer.decode(ids[16:]).startswith(" because")
    SFTData([ex], tokenizer, 32)
    assert "fill model.max_length = 32" in caplog.text and "id '1'" in caplog.text


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tokenizer):
    model = tiny_llama(hidden=64, layers=2, vocab=len(tokenizer), seed=5).double()
    texts = ["Question: Which gas do plants take in?\nAnswer:", "Why?", "Question: What melts ice fastest in a "
             "warm room on a sunny day?\nAnswer:", "Name a planet.", "Q: 2+2?\nA:"]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    batched = generate(model, tokenizer, prompts, 12, [], batch_size=5)
    alone = [generate(model, tokenizer, [p], 12, [], batch_size=1)[0] for p in prompts]
    assert [g.ids for g in batched] == [g.ids for g in alone]  # token for token
    assert [g.text for g in batched] == [g.text for g in alone] and all(g.tokens == 12 for g in alone)
    assert len({g.text for g in batched}) > 1  # the prompts lead to different texts
    stop = [alone[0].text[3:5]]  # ends one row early: the batch pads it after, and the padding is not counted
    batched = generate(model, tokenizer, prompts, 12, stop, batch_size=5)
    alone = [generate(model, tokenizer, [p], 12, stop, batch_size=1)[0] for p in prompts]
    assert [g.ids for g in batched] == [g.ids for g in alone] and batched[0].tokens < 12


def test_sampling_is_seeded_and_stop_sequences_cut(tokenizer):
    model = tiny_llama(hidden=64, layers=2, vocab=len(tokenizer), seed=5)
    prompts = [tokenizer("Question: why?\nAnswer:", add_special_tokens=False)["input_ids"]] * 3
    first = generate(model, tokenizer, prompts, 10, [], 3, Decoding(True, 1.0, 1.0, seed=1))
    again = generate(model, tokenizer, prompts, 10, [], 3, Decoding(True, 1.0, 1.0, seed=1))
    other = generate(model, tokenizer, prompts, 10, [], 3, Decoding(True, 1.0, 1.0, seed=2))
    assert [g.text for g in first] == [g.text for g in again] != [g.text for g in other]
    greedy = generate(model, tokenizer, prompts[:1], 10, [], 1)[0].text
    stop = greedy.strip()[2:4]
    cut = generate(model, tokenizer, prompts[:1], 10, [stop], 1)[0].text
    assert stop not in cut and greedy.strip().startswith(cut)


def test_perplexity_is_the_reference_tokens_mean_nll(tokenizer):
    model = tiny_llama(hidden=64, layers=2, vocab=len(tokenizer), seed=5)
    exs = [GenExample(str(i), "t", f"Question {i}: name it.\nAnswer:", " a long answer" * (i + 1), ("x",))
           for i in range(3)]
    batched = response_nll(model, tokenizer, exs, 64, batch_size=3)
    for ex, (nll, count, cut) in zip(exs, batched):
        ids, n = encode_response(tokenizer, ex, 64)
        assert not cut
        logits = model(torch.tensor([ids])).logits[0, -n - 1:-1]
        assert count == n
        assert nll == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[-n:]),
                                                                      reduction="sum").item(), rel=1e-4)


PAIRS = [("The cat sat on the mat.", "the cat sat on a mat"), ("Paris", "paris, France"),
         ("running quickly home", "he runs home quickly"), ("", "nothing"), ("An apple!", "apple"),
         ("42 dollars", "$42")]


def test_rouge_l_is_rouge_scores_own():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for pred, ref in PAIRS:
        assert rouge_l(pred, ref) == scorer.score(ref, pred)["rougeL"].fmeasure
    assert rouge_l("running quickly home", "he runs home quickly") > 0  # stemming: running ~ runs


def test_exact_match_and_f1_are_squads_as_torchmetrics_computes_them():
    from torchmetrics.functional.text import squad

    for pred, ref in PAIRS:
        theirs = squad([{"prediction_text": pred, "id": "q"}],
                       [{"answers": {"answer_start": [0], "text": [ref]}, "id": "q"}])
        assert 100 * exact_match(pred, ref) == pytest.approx(theirs["exact_match"].item())
        assert 100 * token_f1(pred, ref) == pytest.approx(theirs["f1"].item())
    assert exact_match("An apple!", "apple") == 1.0 and exact_match("Paris", "paris, France") == 0.0


@pytest.mark.parametrize("row, message", [
    ({"id": "1", "request": "hi"}, "missing field 'reply'"),
    ({"id": "1", "request": "hi", "reply": "  "}, "field 'reply' is empty"),
    ({"id": "1", "request": "hi", "reply": 3}, "field 'reply' must be a string"),
    ({"id": "1", "reply": "ok"}, "missing field 'request'"),
    ({"id": "1", "request": "hi", "reply": "ok", "details": 5}, "field 'details' must be a string"),
    ({"id": "1", "request": "hi", "reply": "ok", "also": "x"}, "field 'also' must be a list"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    spec = preset_tasks()["alpaca"].__class__(path=str(tmp_path), kind="generation", context="{request} {details}",
                                              optional_fields=["details"], response_field="reply",
                                              references_field="also")
    write_rows(tmp_path, "test", [{"id": "0", "request": "fine", "reply": "fine"}, row])
    with pytest.raises(DataError, match=rf"test.jsonl, line 2: {message}"):
        load_split("x", spec, "test", None)


def test_non_utf8_and_empty_response_policy(tmp_path, caplog):
    spec_cls = preset_tasks()["alpaca"].__class__
    (tmp_path / "test.jsonl").write_bytes(b'{"id": "1", "request": "caf\xe9", "response": "ok"}\n')
    with pytest.raises(DataError, match=r"test.jsonl, line 1: not valid UTF-8 \(byte 0xe9"):
        load_split("x", spec_cls(path=str(tmp_path), kind="generation", context="{request}"), "test", None)
    write_rows(tmp_path, "test", [{"id": "1", "request": "a", "response": "ok"}, {"id": "2", "request": "b",
                                                                                  "response": ""}])
    kept = load_split("x", spec_cls(path=str(tmp_path), kind="generation", context="{request}",
                                    empty_responses="skip"), "test", None)
    assert [ex.id for ex in kept] == ["1"] and "skipped 1 row(s) with an empty 'response'" in caplog.text


@pytest.mark.parametrize("task, message", [
    ({"kind": "generation", "context": "{q}", "continuation": " {choice}"}, "must contain {response} exactly once"),
    ({"kind": "generation", "context": "{q} {response}"}, "must not use {response}"),
    ({"kind": "generation", "context": "{q}", "metrics": ["bleu"]}, "metrics: one or more of"),
    ({"kind": "generation", "context": "{q}", "optional_fields": ["x"]}, "optional_fields: x appear in no template"),
    ({"kind": "generation", "context": "{q} {x}", "optional_fields": ["x"], "context_without_optional": "{x}"},
     "must not use the optional fields"),
    ({"kind": "essay", "context": "{q}"}, "kind: choice or generation"),
    ({"context": "{q}", "chat_template": True}, "chat_template: applies to generation tasks"),
])
def test_bad_generation_task_tables_are_refused(task, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"tasks": {"t": {"path": "p"} | task}, "data": {"tasks": ["arc_easy"]}})


def test_a_template_naming_an_absent_field_names_it(tmp_path):
    spec = preset_tasks()["alpaca"].__class__(path=str(tmp_path), kind="generation", context="{instruction}")
    write_rows(tmp_path, "test", [{"id": "1", "prompt": "hi", "response": "ok"}])
    with pytest.raises(DataError, match="line 1: missing field 'instruction'"):
        load_split("x", spec, "test", None)


def test_choice_channels_refuse_generation_tasks():
    with pytest.raises(ConfigError, match="distill.target: choices needs every task to have choices, but "
                                          "generation task\\(s\\) alpaca"):
        Config.from_dict({"data": {"tasks": ["arc_easy"], "aux_tasks": ["alpaca"]}, "distill": {"target": "choices"}})


def test_chat_template_wraps_prompt_and_response_and_stops_at_end_of_turn(tokenizer):
    from fedcollm.generation import stop_texts

    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>", eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    ex = GenExample("1", "t", "Say hi", " hi", ("hi",), chat=True)
    ids, n = encode_response(tok, ex, 64)
    assert tok.decode(ids[:-n]) == "<s>user: Say hi</s>\n<s>assistant:"
    assert tok.decode(ids[-n:]) == "  hi</s>\n"
    assert stop_texts(tok, ex, ["\n\n"]) == ["\n\n", "</s>"]
    ids, cut = prompt_ids(tok, ex, 64, 8)
    assert tok.decode(ids) == "<s>user: Say hi</s>\n<s>assistant:" and not cut
    with pytest.raises(DataError, match="chat_template = true, but tokenizer"):
        encode_response(tokenizer, ex, 64)


def test_every_method_runs_a_generation_task_and_the_report_shows_metrics_and_generations(tiny_build, notes_toml,
                                                                                          tmp_path):
    from fedcollm import cli
    from fedcollm.methods import REGISTRY

    cli.main(["run", "--config", str(notes_toml), "--out", str(tmp_path / "all"), "--set", "federation.rounds=1",
              "--set", f"run.methods={list(REGISTRY)}", "--set", "fedmkt.top_k=8"])
    res = json.loads((tmp_path / "all" / "results.json").read_text())
    assert res["tasks"] == [] and res["generation_tasks"] == ["notes"]
    assert set(res["generation"]["slm"]) == {"zero_shot", "standalone", "fedavg", "fedcollm", "fedmkt"}
    assert set(res["generation"]["llm"]) == {"zero_shot", "centralized", "fedcollm", "fedmkt"}
    for rows in res["generation"].values():
        for row in rows.values():
            assert set(row["notes"]) >= {"rouge_l", "token_f1", "exact_match", "perplexity", "tokens_per_s"}
    trained = res["generation"]["slm"]["standalone"]["notes"]["perplexity"]
    assert trained != res["generation"]["slm"]["zero_shot"]["notes"]["perplexity"]
    sample = res["samples"]["notes"][0]
    assert {"zero_shot slm", "fedcollm llm", "fedmkt slm client_0"} <= set(sample["written"])
    md = (tmp_path / "all" / "results.md").read_text()
    assert "## Generation task notes" in md and "- reference:" in md and "Table 1" not in md


def test_fedmkt_aligns_generation_answers_across_three_vocabularies(make_hetero_workbench, tmp_path, data_dir):
    """Clients of two other tokenizers: the response tokens and their end-of-text tokens go through the vocabulary
    map and the sequence alignment both ways, and every client's SLM is scored with its own tokenizer."""
    import tomllib

    from fedcollm.engines.inprocess import run_method
    from fedcollm.runs import RunDir

    notes = tomllib.loads(write_notes_task(tmp_path / "notes", data_dir))["tasks"]
    wb = make_hetero_workbench(str(tmp_path / "run"), tasks=notes, fedmkt={"top_k": 8, "batch_size": 4},
                               data={"tasks": ["notes"], "aux_tasks": ["alpaca"], "train_per_task": 16,
                                     "eval_limit": 4}, federation={"rounds": 1}, run={"methods": ["fedmkt"]})
    run = RunDir(tmp_path / "run")
    final = run_method(wb, "fedmkt", run)
    record = run.read_metrics("fedmkt")[-1]
    assert record["teachers"] == 3 and 0 < record["aligned_fraction"] < 1
    for c in ("client_0", "client_1", "client_2"):
        block = final["slm_clients"][c]["notes"]
        assert block["n"] == 4 and math.isfinite(block["perplexity"])


def test_eval_prints_a_generation_tasks_metrics(notes_toml, tokenizer, tmp_path, capsys):
    from fedcollm import cli

    tiny_llama(vocab=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cli.dispatch(["eval", str(tmp_path / "model"), "--config", str(notes_toml), "--limit", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("evaluation length 256 tokens")  # the tiny model's own context, not model.max_length
    assert out[-1].startswith("notes")
    assert all(m in out[-1] for m in ("rouge_l", "token_f1", "exact_match", "perplexity"))
    assert out[-1].endswith("(n=2, truncated=0)")
    cli.dispatch(["eval", str(tmp_path / "model"), "--config", str(notes_toml), "--limit", "2",
                  "--set", "run.eval_max_length=16"])  # prompts of more than 16 - max_new_tokens 8 tokens
    assert capsys.readouterr().out.strip().endswith("(n=2, truncated=2)")


def test_a_generation_task_evaluated_beside_a_trained_choice_task(tiny_build, notes_toml, tmp_path):
    from fedcollm import cli

    cli.main(["run", "--config", str(notes_toml), "--out", str(tmp_path / "mixed"), "--set", "federation.rounds=1",
              "--set", "data.tasks=['arc_easy']", "--set", "data.eval_tasks=['notes']",
              "--set", "data.aux_tasks=[]", "--set", "run.methods=['zero_shot','fedavg']"])
    res = json.loads((tmp_path / "mixed" / "results.json").read_text())
    assert res["tasks"] == ["arc_easy"] and res["generation_tasks"] == ["notes"]
    assert set(res["slm"]["fedavg"]) == {"arc_easy"} and set(res["generation"]["slm"]["fedavg"]["notes"]) >= {
        "rouge_l", "perplexity"}
    assert res["n_eval"] == {"arc_easy": 6, "notes": 6}
    md = (tmp_path / "mixed" / "results.md").read_text()
    assert "Table 1" in md and "## Generation task notes" in md
