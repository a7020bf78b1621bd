"""Sequence alignment and distribution mapping (FedMKT): DTW paths, 1:1 pairs, the position convention,
sparse targets and the soft-target loss, on hand-made tokenizations with hand-computed expectations."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from fedcollm.alignment.sequence import (
    aligned_fraction,
    dtw_align,
    fedmkt_loss,
    keep_exact,
    map_topk_to_student,
    next_token_positions,
    one_to_one,
    soft_target_ce,
)

# "The unhappy cat sat" split two ways: the student cuts "unhappy", the teacher does not.
STUDENT = ["The", " un", "happy", " cat", " sat"]
TEACHER = ["The", " unhappy", " cat", " sat"]


def _reference_dtw(a, b, dist):
    """FuseLLM's loop, cell by cell, as the oracle for the vectorised programme."""
    n, m = len(a), len(b)
    acc = [[math.inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0
    for i in range(n):
        for j in range(m):
            acc[i + 1][j + 1] = dist(a[i], b[j]) + min(acc[i][j + 1], acc[i + 1][j], acc[i][j])
    i, j, path = n - 1, m - 1, [(n - 1, m - 1)]
    while i > 0 or j > 0:
        opts = [acc[i][j] if i and j else math.inf, acc[i][j + 1] if i else math.inf, acc[i + 1][j] if j else math.inf]
        move = opts.index(min(opts))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        path.append((i, j))
    return path[::-1]


def _lev(x, y):
    row = list(range(len(y) + 1))
    for i, cx in enumerate(x, 1):
        prev, row[0] = row[0], i
        for j, cy in enumerate(y, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (cx != cy))
    return row[-1]


def test_dtw_hand_computed_paths():
    # costs: ab|a=1, ab|bc=2, c|a=1, c|bc=1 -> diagonal (2) beats both detours (3, 4)
    assert dtw_align(["ab", "c"], ["a", "bc"]) == [(0, 0), (1, 1)]
    # " un" is closer to "The" (3) than to "unhappy" (5): total 0 + 3 + 2 + 0 + 0 = 5
    assert dtw_align(STUDENT, TEACHER) == [(0, 0), (1, 0), (2, 1), (3, 2), (4, 3)]
    assert dtw_align([], ["a"]) == [] and dtw_align(["a"], []) == []
    assert dtw_align(["x"], ["a", "b", "c"]) == [(0, 0), (0, 1), (0, 2)]


def test_dtw_equals_reference_loop_including_ties():
    rng = random.Random(0)
    for _ in range(200):  # a 2-letter alphabet makes many equal costs, so the tie order is exercised
        a = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(1, 9))]
        b = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(1, 9))]
        assert dtw_align(a, b) == _reference_dtw(a, b, _lev), (a, b)


def test_dtw_strips_word_markers_before_the_distance():
    sp = ["\u2581The", "\u2581un", "happy", "\u2581cat"]
    bpe = ["The", "\u0120unhappy", "\u0120cat"]
    assert dtw_align(sp, bpe) == _reference_dtw(sp, bpe, lambda x, y: _lev(x.strip("\u2581"), y.strip("\u0120")))
    # stripped: ab|a=1, ab|ba=2, ba|ba=0, ba|a=1, so leaving the diagonal (1+2+1) for 1+1+0+1 pays off
    a, b = ["\u2581ab", "\u2581ab", "ba"], ["\u0120a", "\u0120ba", "a"]
    assert dtw_align(a, b) == [(0, 0), (1, 0), (2, 1), (2, 2)]
    assert dtw_align(a, b, markers="") == [(0, 0), (1, 1), (2, 2)]


def test_one_to_one_needs_both_sides_single():
    path = [(0, 0), (1, 0), (2, 1), (3, 2), (3, 3)]
    # A0 and A1 share B0; A3 meets B2 and B3; only A2-B1 is 1:1
    assert one_to_one(path, 4).tolist() == [-1, -1, 1, -1]
    assert one_to_one([], 3).tolist() == [-1, -1, -1]


def test_position_convention_on_a_word_split_two_ways():
    token_map = one_to_one(dtw_align(STUDENT, TEACHER), len(STUDENT))
    assert token_map.tolist() == [-1, -1, 1, 2, 3]  # "happy" <-> " unhappy" is 1:1 by DTW
    exact = keep_exact(token_map, STUDENT, TEACHER)
    assert exact.tolist() == [-1, -1, -1, 2, 3]
    # student position 2 (read "The un happy", predicts " cat") takes teacher position 1 (read "The unhappy");
    # student position 3 (predicts " sat") takes teacher position 2
    assert next_token_positions(exact).tolist() == [-1, -1, 1, 2]
    # without the exact-text check, student position 1 (predicts "happy") would take the teacher's " unhappy"
    assert next_token_positions(token_map).tolist() == [-1, 0, 1, 2]


def test_a_token_aligned_to_the_first_teacher_token_has_no_teacher_position():
    assert next_token_positions(torch.tensor([-1, 0, 1, -1, 3])).tolist() == [-1, 0, -1, 2]


def test_map_topk_hand_computed():
    values = torch.tensor([[4.0, 3.0, 2.0], [9.0, 8.0, 7.0], [3.0, 2.0, 1.0]], dtype=torch.float16)
    t_ids = torch.tensor([[0, 1, 2], [0, 1, 2], [3, 1, 2]], dtype=torch.int32)
    id_map = torch.tensor([6, -1, 2, 4])  # teacher 1 has no student counterpart; teacher 3 -> student 4
    positions = torch.tensor([-1, 2, 0])
    out = map_topk_to_student(values, t_ids, id_map, positions, torch.tensor([5, 6, 7]), temperature=2.0)
    assert out.aligned.tolist() == [False, True, True]
    assert out.ids[0].tolist()[0] == 5 and out.probs[0].tolist() == [1.0, 0.0, 0.0]
    # row 2 of the teacher: ids -> [4, -1, 2], logits [3, 2, 1] / 2, the unmapped one dropped
    p = torch.softmax(torch.tensor([1.5, 0.5]), 0)
    assert out.ids[1, :1].tolist() == [4] and out.ids[1, 2].item() == 2
    assert torch.allclose(out.probs[1], torch.tensor([p[0], 0.0, p[1]]))
    # row 0: ids -> [6, -1, 2], logits [4, 3, 2] / 2
    q = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    assert torch.allclose(out.probs[2], torch.tensor([q[0], 0.0, q[1]]))
    assert torch.allclose(out.probs.sum(-1), torch.ones(3))


def test_map_topk_duplicates_keep_the_highest_logit_whatever_the_order():
    values = torch.tensor([[1.0, 5.0, 2.0]])  # not sorted: the 5.0 comes second
    t_ids = torch.tensor([[0, 1, 2]])
    id_map = torch.tensor([3, 3, 8])  # teacher 0 and 1 both become student 3
    out = map_topk_to_student(values, t_ids, id_map, torch.tensor([0]), torch.tensor([0]))
    p = torch.softmax(torch.tensor([5.0, 2.0]), 0)
    live = out.probs[0] > 0
    assert out.ids[0, live].tolist() == [3, 8]
    assert torch.allclose(out.probs[0, live], p)


def test_map_topk_falls_back_to_gold_when_nothing_maps():
    out = map_topk_to_student(torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]]), torch.tensor([-1, -1]),
                              torch.tensor([0]), torch.tensor([9]))
    assert not out.aligned.item() and out.ids[0, 0].item() == 9 and out.probs[0].tolist() == [1.0, 0.0]


def test_unaligned_target_is_the_gold_next_token_not_the_input_token():
    """FuseLLM puts the one-hot on the input token at the position (FuseAI issue #27): one step behind."""
    student_ids = torch.tensor([10, 11, 12, 13])
    out = map_topk_to_student(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                              torch.full((3,), -1), student_ids[1:])
    assert out.ids[:, 0].tolist() == [11, 12, 13]
    assert out.ids[:, 0].tolist() != student_ids[:-1].tolist()  # the reference's [10, 11, 12]


def test_map_topk_end_to_end_on_the_word_split():
    positions = next_token_positions(keep_exact(one_to_one(dtw_align(STUDENT, TEACHER), 5), STUDENT, TEACHER))
    # teacher vocab = its tokens in order; student vocab = its tokens in order; " cat" and " sat" map across
    id_map = torch.tensor([0, -1, 3, 4])
    teacher_ids = torch.tensor([[1, 0], [2, 3], [3, 2], [3, 2]])  # teacher row j predicts token j+1 best
    teacher_values = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    student_ids = torch.tensor([0, 1, 2, 3, 4])
    out = map_topk_to_student(teacher_values, teacher_ids, id_map, positions, student_ids[1:])
    assert out.aligned.tolist() == [False, False, True, True]
    assert out.ids[2].tolist() == [3, 4] and out.ids[3].tolist() == [4, 3]  # " cat" then " sat" ranked first
    assert out.ids[:2, 0].tolist() == [1, 2]  # one-hot on " un", "happy"
    assert aligned_fraction(out.aligned) == 0.5


def test_map_topk_rejects_a_position_past_the_teacher_rows():
    with pytest.raises(ValueError, match="position 2 is past the teacher's 2 rows"):
        map_topk_to_student(torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                            torch.tensor([2]), torch.tensor([0]))


def test_aligned_fraction():
    aligned = torch.tensor([True, False, True, True])
    assert aligned_fraction(aligned) == 0.75
    assert aligned_fraction(aligned, torch.tensor([1, 1, 0, 0])) == 0.5
    assert aligned_fraction(aligned, torch.zeros(4)) == 0.0


def test_soft_target_ce_is_forward_kl_plus_teacher_entropy_on_dense_targets():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 6, generator=g)
    teacher_p = torch.softmax(torch.randn(2, 3, 6, generator=g), -1)
    ids = torch.arange(6).expand(2, 3, 6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    got = soft_target_ce(student, ids, teacher_p, mask)
    per_tok = (F.kl_div(F.log_softmax(student, -1), teacher_p, reduction="none").sum(-1)
               - (teacher_p * teacher_p.log()).sum(-1))
    assert torch.allclose(got, per_tok[mask.bool()].mean())
    # the sparse form of a distribution with zeros gives the same value as its dense form
    sparse_ids, sparse_p = torch.tensor([[[4, 1, 0]]]), torch.tensor([[[0.7, 0.3, 0.0]]])
    dense = torch.zeros(1, 1, 6).scatter(-1, sparse_ids[..., :2], sparse_p[..., :2])
    one = torch.ones(1, 1)
    assert torch.allclose(soft_target_ce(student[:1, :1], sparse_ids, sparse_p, one),
                          soft_target_ce(student[:1, :1], ids[:1, :1], dense, one))


def test_soft_target_ce_on_one_hot_targets_is_the_usual_ce():
    g = torch.Generator().manual_seed(1)
    student, gold = torch.randn(2, 4, 7, generator=g), torch.randint(0, 7, (2, 4), generator=g)
    ids = torch.stack([gold, torch.zeros_like(gold)], -1)
    probs = torch.stack([torch.ones(2, 4), torch.zeros(2, 4)], -1)
    assert torch.allclose(soft_target_ce(student, ids, probs, torch.ones(2, 4)),
                          F.cross_entropy(student.reshape(-1, 7), gold.reshape(-1)))
    assert soft_target_ce(student, ids, probs, torch.zeros(2, 4)).item() == 0.0


def test_fedmkt_loss_weights():
    assert fedmkt_loss(torch.tensor(2.0), torch.tensor(4.0)).item() == pytest.approx(0.9 * 2 + 0.1 * 4)
    assert fedmkt_loss(torch.tensor(2.0), torch.tensor(4.0), kd_weight=0.5).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="kd_weight"):
        fedmkt_loss(torch.tensor(2.0), torch.tensor(4.0), kd_weight=1.5)
