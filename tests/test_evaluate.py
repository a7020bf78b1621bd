import pytest
import torch

from fedcollm.data.tasks import MCExample
from fedcollm.evaluate import accuracy, choice_logprobs


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
    from fedcollm.config import preset_tasks
    from fedcollm.data.batching import encode_pair
    from fedcollm.data.tasks import load_eval_split

    llm, _ = models
    examples = load_eval_split("arc_easy", preset_tasks()["arc_easy"], data_dir, limit=5)
    scores = choice_logprobs(llm, tokenizer, examples, max_length=200, batch_size=batch_size)  # no truncation
    for ex, sc in zip(examples, scores):
        for c in range(len(ex.choices)):
            ids, n = encode_pair(tokenizer, ex.context, ex.continuations[c], 200)
            with torch.no_grad():
                logp = torch.log_softmax(llm(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            expected = sum(logp[len(ids) - n - 1 + j, ids[len(ids) - n + j]].item() for j in range(n))
            assert abs(sc[c] - expected) < 1e-3
