import pytest
import torch
from conftest import tiny_config

from fedcollm.config import preset_tasks
from fedcollm.data.batching import encode_pair, fit_response, response_parts
from fedcollm.data.tasks import GenExample, MCExample
from fedcollm.errors import ConfigError
from fedcollm.evaluate import (
    accuracy,
    choice_logprobs,
    choice_requests,
    eval_length,
    evaluate_tasks,
    score_requests,
)
from fedcollm.generation import generate, prompt_ids


def _ex(answer, choices=("aa", "b")):
    return MCExample("i", "arc_easy", "q", tuple(choices), tuple(" " + c for c in choices), answer)


def test_acc_and_acc_norm_follow_lm_eval():
    # sums: choice 1 wins on acc; per character ("aaaaaaa" = 7 chars vs "b" = 1) choice 0 wins on acc_norm
    ex = [_ex(0, ("aaaaaaa", "b"))]
    res = accuracy(ex, [[-5.0, -4.0]])
    assert res == {"acc": 0.0, "acc_norm": 1.0, "n": 1, "metric": "acc", "score": 0.0}


def test_acc_norm_divides_by_the_choice_text_not_the_continuation_with_its_space():
    # "ab" vs "abcd": per choice-text character -2.1/2 = -1.05 < -4.0/4 = -1.0, so lm-eval picks choice 1;
    # dividing by the continuation with its leading space (-2.1/3 = -0.70 > -4.0/5 = -0.80) would pick choice 0
    ex = [_ex(1, ("ab", "abcd"))]
    assert accuracy(ex, [[-2.1, -4.0]])["acc_norm"] == 1.0


@pytest.mark.parametrize("batch_size", [2, 7])
def test_choice_logprobs_match_an_unpadded_forward(data_dir, tokenizer, models, batch_size):
    """Packed scoring (context once, then every choice, each seeing only the context and itself) gives each
    choice the log-prob of a separate unpadded forward of context + choice, across groups and left padding."""
    from fedcollm.data.tasks import load_eval_split

    llm, _ = models
    examples = load_eval_split("arc_easy", preset_tasks()["arc_easy"], data_dir, limit=5)
    scores = choice_logprobs(llm, tokenizer, examples, max_length=200, batch_size=batch_size)  # no truncation
    for ex, sc in zip(examples, scores):
        for c in range(len(ex.choices)):
            ids, n = encode_pair(tokenizer, ex.context, ex.continuations[c], 200)
            assert abs(sc[c] - _alone(llm, ids, n)) < 1e-3


def _alone(model, ids: list[int], n: int) -> float:
    """Summed log-prob of the last n of `ids` in one unpadded forward pass of `ids`: what lm-eval computes."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[len(ids) - n - 1 + j, ids[len(ids) - n + j]].item() for j in range(n))


LONG = MCExample("long", "arc_easy", "Question: " + "why is the sky blue and the grass green? " * 8 + "\nAnswer:",
                 ("light", "a long story of light and leaves"), (" light", " a long story of light and leaves"), 1)


def _scored(monkeypatch) -> list:
    """What evaluate_tasks' packed scoring returns, call by call."""
    import fedcollm.evaluate as evaluate

    seen, real = [], evaluate.score_requests
    monkeypatch.setattr(evaluate, "score_requests", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    return seen


def _whole(tokenizer, ex: MCExample) -> tuple[list[int], list[list[int]]]:
    """The item's whole context tokens and each choice's continuation tokens, lm-eval style."""
    conts = []
    for cont in ex.continuations:
        ids, n = encode_pair(tokenizer, ex.context, cont, 1 << 30)
        conts.append(ids[-n:])
    return tokenizer(ex.context, add_special_tokens=False)["input_ids"], conts


def test_an_item_over_eval_max_length_is_counted_and_scored_on_its_tail_as_before(data_dir, tokenizer, models,
                                                                                  monkeypatch, caplog):
    llm, _ = models
    cfg = tiny_config(data_dir, run={"eval_max_length": 32})
    ctx, conts = _whole(tokenizer, LONG)
    assert len(ctx) > 40  # over the cap with any choice
    scored = _scored(monkeypatch)
    res = evaluate_tasks(llm, tokenizer, {"arc_easy": [LONG, _ex(0)]}, cfg, "capped")["arc_easy"]
    assert res["n"] == 2 and res["truncated"] == 1
    assert "capped arc_easy: 1 of 2 items exceed the evaluation length of 32 tokens" in caplog.text
    kept = ctx[-(32 - max(map(len, conts))):]  # the context's tail that leaves room for the longest choice
    assert len(kept) + max(map(len, conts)) == 32
    for c, cont in enumerate(conts):
        assert abs(scored[0][0][c] - _alone(llm, kept + cont, len(cont))) < 1e-3


def test_by_default_an_item_is_scored_whole_at_the_models_context_length(data_dir, tokenizer, models, monkeypatch,
                                                                         caplog):
    llm, _ = models
    cfg = tiny_config(data_dir)  # model.max_length 64 (training) does not cut evaluation
    assert cfg.run.eval_max_length is None and eval_length(cfg, llm, tokenizer) == 256  # tiny_llama's positions
    ctx, conts = _whole(tokenizer, LONG)
    assert len(ctx) + max(map(len, conts)) > cfg.model.max_length
    scored = _scored(monkeypatch)
    res = evaluate_tasks(llm, tokenizer, {"arc_easy": [LONG, _ex(0)]}, cfg)["arc_easy"]
    assert res["truncated"] == 0 and "exceed the evaluation length" not in caplog.text
    for c, cont in enumerate(conts):
        assert abs(scored[0][0][c] - _alone(llm, ctx + cont, len(cont))) < 1e-3


def test_packed_scoring_holds_to_its_token_budget(tokenizer, models, monkeypatch):
    """Long items go fewer to a forward pass (one longer than the budget alone), with unchanged scores."""
    import fedcollm.evaluate as evaluate

    llm, _ = models
    requests = choice_requests(tokenizer, [LONG, _ex(0), _ex(1, ("b", "cc")), LONG], 256)
    widths, real = [], evaluate.packed_choice_logprobs
    monkeypatch.setattr(evaluate, "packed_choice_logprobs",
                        lambda model, group, pad: widths.append([len(c) + sum(map(len, x)) for c, x in group])
                        or real(model, group, pad))
    bounded = score_requests(llm, requests, tokenizer.pad_token_id, batch_size=8, batch_tokens=100)
    assert sorted(len(w) for w in widths) == [1, 1, 2] and sorted(map(max, widths))[1] > 100  # each LONG alone
    assert all(len(w) * max(w) <= 100 for w in widths if len(w) > 1)
    widths.clear()
    whole = score_requests(llm, requests, tokenizer.pad_token_id, batch_size=8)
    assert len(widths) == 1 and all(abs(a - b) < 1e-3 for x, y in zip(bounded, whole) for a, b in zip(x, y))


GEN_TASK = {"gen": {"kind": "generation", "path": "gen", "eval_split": "test", "context": "{q}",
                    "continuation": " {response}", "response_field": "a", "metrics": ["rouge_l", "perplexity"],
                    "max_new_tokens": 8}}
LONG_GEN = GenExample("long", "gen", "Instruction: " + "explain why the sky is blue. " * 10 + "\nResponse:",
                      " Because of light.", ("Because of light.",))


@pytest.mark.parametrize("cap", [32, None])
def test_generation_prompts_and_perplexity_fit_the_evaluation_length_and_count_cuts(data_dir, tokenizer, models,
                                                                                    cap):
    """Capped, the prompt keeps its tail so that it and max_new_tokens fit, and the reference pair is cut as in
    training; by default both are whole. Either way the item's generation and NLL are those of the kept tokens."""
    llm, _ = models
    cfg = tiny_config(data_dir, data={"eval_tasks": ["gen"]}, run={"eval_max_length": cap}, tasks=GEN_TASK)
    full = tokenizer(LONG_GEN.context, add_special_tokens=False)["input_ids"]
    prompt, answer = response_parts(tokenizer, LONG_GEN)
    assert len(full) > 32
    res = evaluate_tasks(llm, tokenizer, {"gen": [LONG_GEN]}, cfg)["gen"]
    assert res["truncated"] == (cap is not None)
    kept = full[-(32 - 8):] if cap else full  # prompt + max_new_tokens fit
    assert prompt_ids(tokenizer, LONG_GEN, eval_length(cfg, llm, tokenizer), 8) == (kept, cap is not None)
    assert res["items"][0]["generation"] == generate(llm, tokenizer, [kept], 8, [], 1)[0].text
    ids, n = fit_response(prompt, answer, 32) if cap else (prompt + answer, len(answer))
    assert -res["items"][0]["nll"] == pytest.approx(_alone(llm, ids, n), abs=1e-3)


def test_a_generation_budget_that_leaves_no_prompt_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="max_new_tokens = 8 leaves no room for a prompt .* 8 tokens"):
        prompt_ids(tokenizer, LONG_GEN, 8, 8)


def test_the_report_names_truncated_items_under_their_table_and_is_unchanged_without():
    from fedcollm.report import to_markdown

    base = {"setting": {}, "tasks": ["arc_easy"], "generation_tasks": ["notes"], "n_eval": {"arc_easy": 6, "notes": 4},
            "llm": {"zero_shot": {"arc_easy": 0.5}}, "slm": {"zero_shot": {"arc_easy": 0.25}},
            "generation": {"llm": {"zero_shot": {"notes": {"rouge_l": 0.1, "n": 4}}}}}
    none_cut = to_markdown(base | {"truncated": {"llm": {"zero_shot": {"arc_easy": 0, "notes": 0}},
                                                 "slm": {"zero_shot": {"arc_easy": 0}}}})
    assert none_cut == to_markdown(base) and "truncated" not in none_cut.lower() and "cut to" not in none_cut
    md = to_markdown(base | {"truncated": {"llm": {"zero_shot": {"arc_easy": 2, "notes": 3}},
                                           "slm": {"zero_shot": {"arc_easy": 0}}}})
    note = "Items scored on text cut to the evaluation length (run.eval_max_length): "
    table1, rest = md.split("## Table 1")[1].split("## Table 2")
    table2, generation = rest.split("## Generation task notes")
    assert note + "Zero-Shot LLM arc_easy 2 of 6." in table1 and note not in table2
    assert note + "Zero-Shot LLM notes 3 of 4." in generation
    assert md.replace("\n\n" + note + "Zero-Shot LLM arc_easy 2 of 6.", "").replace(
        "\n\n" + note + "Zero-Shot LLM notes 3 of 4.", "") == none_cut


def test_the_client_mean_reports_the_most_truncated_items_of_any_client():
    from fedcollm.methods.base import mean_over_clients

    block = {"acc": 0.5, "n": 4, "metric": "acc", "curve": {"acc": 0.5, "n": 2, "metric": "acc"}}
    mean = mean_over_clients([{"t": block | {"truncated": 1}}, {"t": block | {"truncated": 3}}])["t"]
    assert mean["truncated"] == 3 and mean["n"] == 4 and "truncated" not in mean["curve"]
