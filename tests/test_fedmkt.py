"""FedMKT as a method object: target alignment and selection (pure), the client and server hooks on tiny models,
per-client rejection of a malformed top-k, and whole in-process runs with their byte counts."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_FEDMKT

from fedcollm.algorithms.training import public_topk
from fedcollm.alignment.exchange import FIELDS, PREFIX, from_tensors, to_tensors
from fedcollm.alignment.sequence import SparseTargets
from fedcollm.alignment.transfer import answer_rows, collate_targets, select_targets
from fedcollm.comm import Payload, pack, states_equal, unpack
from fedcollm.config import Config
from fedcollm.engines.inprocess import InProcessTransport, SimulatedClient, run_method
from fedcollm.errors import ConfigError
from fedcollm.methods.fedmkt import (
    FedMKT,
    adapter_part,
    covering,
    topk_ce,
    transfer_targets,
)
from fedcollm.models.lora import load_adapter_state
from fedcollm.runs import RunDir

MKT = TINY_FEDMKT
K = MKT["top_k"]


@pytest.fixture
def wb(make_workbench, tmp_path):
    return make_workbench(str(tmp_path), fedmkt=MKT, run={"methods": ["fedmkt"]})


def _topk_of(tensors, wb):
    return covering(from_tensors(tensors, "test", len(wb.tokenizer), K), wb.aux_data, "test")


# ---- pure pieces ---------------------------------------------------------------------------------------------

def test_answer_rows_follow_exact_one_to_one_pairs_across_tokenizations():
    strings = ["Q", ":", " the", " cat", " c", "at"]
    src = ([0, 1, 2, 3], 2)  # answer " the cat" as two tokens
    dst = ([0, 1, 2, 4, 5], 3)  # the same text with " cat" split in two
    assert answer_rows(src, dst, strings, strings).tolist() == [0, -1, -1]
    assert answer_rows(src, src, strings, strings).tolist() == [0, 1]


def _sparse(ids: list[list[int]], probs: list[list[float]]) -> SparseTargets:
    return SparseTargets(torch.tensor(ids), torch.tensor(probs), torch.ones(len(ids), dtype=torch.bool))


def test_selection_strategies_pick_by_ce():
    own = [_sparse([[1, 2]], [[0.5, 0.5]]), _sparse([[3, 4]], [[0.5, 0.5]])]
    teacher = [_sparse([[5, 6]], [[0.9, 0.1]]), _sparse([[7, 8]], [[0.9, 0.1]])]
    own_ce, teacher_ce = torch.tensor([1.0, 1.0]), torch.tensor([[0.5, 1.0]])  # teacher better on e0, tied on e1

    dual = select_targets("dual_min_ce", own_ce, own, teacher_ce, [teacher])
    assert dual[0][0].tolist() == [[5, 6]] and dual[1] is None  # a tie keeps nothing
    greater = select_targets("greater", own_ce, own, teacher_ce, [teacher])
    assert greater[0][0].tolist() == [[5, 6]] and greater[1][0].tolist() == [[3, 4]]  # a tie goes to the learner
    mixed = select_targets("weighted_mean", own_ce, own, teacher_ce, [teacher])
    assert mixed[0][0].tolist() == [[1, 2, 5, 6]]
    w = torch.softmax(torch.exp(-torch.tensor([1.0, 0.5])), 0)
    assert torch.allclose(mixed[0][1], torch.tensor([[0.5 * w[0], 0.5 * w[0], 0.9 * w[1], 0.1 * w[1]]]))
    assert torch.allclose(mixed[1][1].sum(-1), torch.ones(1))


def test_collated_targets_sit_on_the_right_aligned_answer_rows():
    ids, probs, mask = collate_targets([(torch.tensor([[4]]), torch.tensor([[1.0]])), None], keep=3)
    assert ids.shape == (2, 3, 1) and ids[0, 2, 0] == 4 and probs[0, 2, 0] == 1.0
    assert mask.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_one_tokenizer_maps_the_topk_onto_itself(wb):
    top = public_topk(wb.slm, wb.aux_data, K, len(wb.tokenizer), 4)
    targets = transfer_targets((top, wb.aux_data, wb.tokenizer), wb.aux_data, wb.tokenizer, 1.0)
    assert len(targets) == len(wb.aux_data)
    for e, t in enumerate(targets):
        values, ids = top.example(e)
        assert t.aligned.all()
        assert torch.equal(t.ids, ids.long())
        assert torch.allclose(t.probs, torch.softmax(values.float(), -1))


def test_two_tokenizers_align_through_the_vocabulary_map(wb, tmp_path):
    """A sender whose top logit is always its gold next token: on the receiver's answer rows the top target is the
    receiver's gold next token, taken from the sender where the tokens align 1:1 and one-hot where they do not."""
    from fedcollm.alignment.exchange import TopK
    from fedcollm.data.batching import SFTData
    from fedcollm.models.tiny import tiny_tokenizer

    examples = wb.split.aux
    coarse = tiny_tokenizer([ex.context + ex.continuations[ex.answer] for ex in examples], vocab=300)
    src, dst = SFTData(examples, coarse, 64), wb.aux_data
    values, ids = [], []
    for token_ids, n in src.encoded:
        gold = torch.tensor(token_ids[len(token_ids) - n:])
        ids.append(torch.stack([gold, (gold + 1) % len(coarse), (gold + 2) % len(coarse)], -1).to(torch.int32))
        values.append(torch.tensor([[3.0, 2.0, 1.0]] * n, dtype=torch.float16))
    top = TopK.from_examples(values, ids, torch.ones(len(examples)), torch.arange(len(examples)))
    targets = transfer_targets((top, src, coarse), dst, wb.tokenizer, 1.0)
    aligned = torch.cat([t.aligned for t in targets])
    assert 0 < float(aligned.float().mean()) < 1  # the tokenizations differ, and share some answer tokens
    for t, (token_ids, n) in zip(targets, dst.encoded):
        assert t.ids[:, 0].tolist() == token_ids[len(token_ids) - n:]
        p = torch.softmax(torch.tensor([3.0, 2.0, 1.0]), -1)
        assert torch.allclose(t.probs[t.aligned], p.expand(int(t.aligned.sum()), 3))
        assert (t.probs[~t.aligned][:, 0] == 1).all()


def test_public_topk_is_the_models_top_logits_and_ce(wb):
    from fedcollm.data.batching import answer_logits, collate

    top = public_topk(wb.slm, wb.aux_data, K, len(wb.tokenizer), 3)
    ids, n = wb.aux_data.encoded[5]
    batch = collate([(ids, n)], wb.aux_data.pad_id)
    with torch.no_grad():
        logits = answer_logits(wb.slm, batch)[0, -n:, :len(wb.tokenizer)]
    values, got = top.example(5)
    assert torch.equal(got.long(), logits.topk(K).indices)
    assert torch.allclose(values.float(), logits.topk(K).values, atol=1e-2)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(answer_logits(wb.slm, batch)[0, -n:], torch.tensor(ids[-n:]))
    assert abs(float(top.ce[5]) - float(ce)) < 1e-4


# ---- hooks ----------------------------------------------------------------------------------------------------

def test_client_fit_uploads_its_adapter_and_a_topk_covering_the_public_set(wb):
    res = SimulatedClient(wb, 0).resources
    reply = unpack(pack(FedMKT.client_fit(res, Payload(wb.slm_init), 1)))
    assert reply.num_examples == len(wb.client_data[0])
    assert set(adapter_part(reply.tensors)) == set(wb.slm_init)
    assert {k for k in reply.tensors if k.startswith(PREFIX)} == {PREFIX + f for f in FIELDS}
    top = _topk_of(reply.tensors, wb)
    assert top.values.dtype == torch.float16 and top.ids.dtype == torch.int32
    load_adapter_state(wb.slm, adapter_part(reply.tensors))  # the top-k is the fine-tuned SLM's
    again = public_topk(wb.slm, wb.aux_data, K, len(wb.tokenizer), 4)
    assert torch.equal(again.ids, top.ids) and torch.equal(again.ce, top.ce)

    # with the LLM's top-k in the task the client distils first, so it ends elsewhere than by SFT alone
    llm_top = public_topk(wb.llm, wb.aux_data, K, len(wb.tokenizer), 4)
    distilled = FedMKT.client_fit(res, Payload(wb.slm_init | to_tensors(llm_top)), 1)
    assert not states_equal(adapter_part(distilled.tensors), adapter_part(reply.tensors))


def _round_one(wb, method: FedMKT):
    names = [f"client_{k}" for k in range(3)]
    states = method.initial_states(names)
    tasks = {c: Payload(method.client_task(states, c)) for c in names}
    assert all(set(t.tensors) == set(wb.slm_init) for t in tasks.values())  # round 1 carries no LLM top-k
    replies = {c: unpack(pack(FedMKT.client_fit(SimulatedClient(wb, k).resources, tasks[c], 1)))
               for k, c in enumerate(names)}
    accepted = {c: method.check_reply(tasks[c], replies[c], c, len(wb.client_data[k])) for k, c in enumerate(names)}
    return states, method.aggregate(states, accepted, 1), replies


NEXT_ROUND = MKT | {"slm_when": "next_round"}


def test_server_distils_the_llm_with_dual_min_ce_and_sends_its_topk(make_workbench, tmp_path):
    """The order before issue 27 (slm_when = next_round): the LLM's top-k after its update rides in the next
    round's task, and the server leaves the clients' adapters as uploaded."""
    wb = make_workbench(str(tmp_path), fedmkt=NEXT_ROUND, run={"methods": ["fedmkt"]})
    method = FedMKT(wb)
    before, states, replies = _round_one(wb, method)
    assert all(states_equal(states[c], adapter_part(replies[c].tensors)) for c in replies)  # each keeps its own
    llm_top = public_topk(wb.llm, wb.aux_data, K, len(wb.tokenizer), 4)  # the LLM's own, before distillation
    client_tops = [_topk_of(r.tensors, wb) for r in replies.values()]
    # every candidate is scored by the server from its top-k: a lower bound on the CE an honest client reports
    assert all((topk_ce(t, wb.aux_data) <= t.ce + 1e-5).all() for t in client_tops + [llm_top])
    llm_ce = topk_ce(llm_top, wb.aux_data)
    best_client_ce = torch.stack([topk_ce(t, wb.aux_data) for t in client_tops]).min(0).values

    states, info, timing = method.server_update(states, 1)
    assert info["teachers"] == 3 and info["aligned_fraction"] == 1.0
    assert info["distilled_fraction"] == pytest.approx(float((best_client_ce < llm_ce).float().mean()))
    assert not states_equal(states["llm"], before["llm"]) and timing["server_kd_s"] > 0

    task = method.client_task(states, "client_1")
    assert states_equal(adapter_part(task), states["client_1"])
    sent = _topk_of(task, wb)
    load_adapter_state(wb.llm, states["llm"])
    assert torch.equal(sent.ids, public_topk(wb.llm, wb.aux_data, K, len(wb.tokenizer), 4).ids)


def test_after_llm_each_slm_distils_from_the_llm_updated_in_the_same_round(wb):
    """FATE-LLM's order (the default): after the LLM's update, each client's adapter distils from that LLM's top-k,
    selected against its own upload, exactly as a client would run it; the next task carries only the adapter."""
    from dataclasses import replace

    from fedcollm.methods.fedmkt import distil_from

    method = FedMKT(wb)
    _, states, replies = _round_one(wb, method)
    uploads = {c: replace(t := _topk_of(r.tensors, wb), ce=topk_ce(t, wb.aux_data)) for c, r in replies.items()}
    new_states, info, timing = method.server_update(dict(states), 1)
    assert timing["server_slm_kd_s"] > 0
    assert info["budget"].slm_steps == 3 * wb.cfg.fedmkt.slm_epochs * wb.aux_data.steps_per_epoch(MKT["batch_size"])
    load_adapter_state(wb.llm, new_states["llm"])
    llm_top = public_topk(wb.llm, wb.aux_data, K, len(wb.tokenizer), 4)
    llm_top = replace(llm_top, ce=topk_ce(llm_top, wb.aux_data))
    from fedcollm.algorithms.training import unit_seed
    from fedcollm.models.lora import adapter_state

    held = wb.held("client_1")
    load_adapter_state(held.model, states["client_1"])
    distil_from(held.model, held.public, uploads["client_1"], [llm_top], wb.cfg.fedmkt, 1, MKT["slm_lr"],
                unit_seed(wb.cfg.run.seed, 1, 1), "expected", slm=True)
    assert states_equal(new_states["client_1"], adapter_state(held.model))
    assert not states_equal(new_states["client_1"], states["client_1"])
    assert not any(k.startswith(PREFIX) for k in method.client_task(new_states, "client_1"))


def test_choice_target_and_pool_teach_the_slms_from_the_llms_choice_distribution(make_workbench, tmp_path):
    wb = make_workbench(str(tmp_path), fedmkt=MKT | {"target": "choices", "pool_epochs": 1.0},
                        data={"public_pool": 3}, run={"methods": ["fedmkt"]})
    assert wb.split.pool and all(ex.answer == -1 for ex in wb.split.pool)
    method = FedMKT(wb)
    _, states, _ = _round_one(wb, method)
    new_states, info, _ = method.server_update(dict(states), 1)
    pool_steps = -(-len(wb.split.pool) // MKT["batch_size"])
    aux_steps = wb.aux_data.steps_per_epoch(MKT["batch_size"])
    assert info["budget"].slm_steps == 3 * (aux_steps + pool_steps)
    assert all(not states_equal(new_states[c], states[c]) for c in ("client_0", "client_1", "client_2"))


def test_shared_adapters_are_averaged(make_workbench, tmp_path):
    from fedcollm.aggregate import fedavg

    wb = make_workbench(str(tmp_path), fedmkt=MKT | {"share_adapters": True}, run={"methods": ["fedmkt"]})
    _, states, replies = _round_one(wb, FedMKT(wb))
    assert set(states) == {"llm", "slm"}
    # equal weights: 3 clients are fewer than 1 / federation.max_share, which no weighting could respect
    expected = fedavg([(adapter_part(r.tensors), 1) for r in replies.values()])
    assert all(torch.allclose(states["slm"][k], expected[k], atol=1e-7) for k in expected)


# ---- engine ---------------------------------------------------------------------------------------------------

class OutOfVocabClient(SimulatedClient):
    """Uploads top-k ids past its vocabulary."""

    def fit(self, blob, round_idx, method):
        payload = unpack(super().fit(blob, round_idx, method))
        payload.tensors[PREFIX + "ids"][0, 0] = 10**6
        return pack(payload)


def test_a_malformed_topk_is_rejected_naming_its_client_and_the_round_goes_on(make_workbench, tmp_path, caplog):
    wb = make_workbench(str(tmp_path), fedmkt=MKT, run={"methods": ["fedmkt"]}, federation={"rounds": 1})
    clients = [SimulatedClient(wb, 0), OutOfVocabClient(wb, 1), SimulatedClient(wb, 2)]
    with caplog.at_level("WARNING"):
        run_method(wb, "fedmkt", RunDir(tmp_path), InProcessTransport(clients))
    [record] = RunDir(tmp_path).read_metrics("fedmkt")
    assert record["rejected"] == 1 and record["accepted"] == 2 and record["teachers"] == 2
    assert "top-k from client_1: field topk.ids has ids outside" in caplog.text
    states = RunDir(tmp_path).load_round("fedmkt", 1, {c: wb.slm_init for c in ("client_0", "client_1")})
    assert states_equal(states["client_1"], wb.slm_init)  # the rejected client keeps its adapter
    assert not states_equal(states["client_0"], wb.slm_init)


@pytest.mark.parametrize("order", ["after_llm", "next_round"])
def test_two_rounds_in_process_count_adapters_and_logits_both_ways(make_workbench, tmp_path, order):
    from fedcollm.report import build_results

    wb = make_workbench(str(tmp_path), fedmkt=MKT | {"slm_when": order}, run={"methods": ["fedmkt"]})
    run = RunDir(tmp_path)
    run.write_config(wb.cfg.to_json())
    final = run_method(wb, "fedmkt", run)
    r1, r2 = RunDir(tmp_path).read_metrics("fedmkt")
    adapter = len(pack(Payload(wb.slm_init)))
    answer_tokens = sum(n for _, n in wb.aux_data.encoded)
    logits = 6 * K * answer_tokens  # fp16 value + int32 id per kept logit
    assert r1["bytes_down"] == 3 * adapter  # round 1: the adapters only
    if order == "next_round":
        assert r2["bytes_down"] > 3 * (adapter + logits)  # then the LLM's top-k too
    else:
        assert r2["bytes_down"] == 3 * adapter  # the server taught the adapters already
    assert r1["bytes_up"] > 3 * (adapter + logits) and r2["bytes_up"] > 3 * (adapter + logits)
    assert r2["teachers"] == 3 and "kd_last" in r2
    assert set(final) == {"llm", "slm", "slm_clients"} and len(final["slm_clients"]) == 3
    assert final["llm"]["arc_easy"]["n"] == 6
    results = build_results(run, {}, {})
    assert results["llm"]["fedmkt"] == {"arc_easy": final["llm"]["arc_easy"]["acc"]}
    assert results["slm"]["fedmkt"] == {"arc_easy": final["slm"]["arc_easy"]["acc"]}


def test_fedmkt_refuses_secagg_and_dp():
    with pytest.raises(ConfigError, match="secagg.enabled"):
        Config.from_dict({"run": {"methods": ["fedmkt"]}, "secagg": {"enabled": True}})
    with pytest.raises(ConfigError, match="dp.noise_multiplier"):
        Config.from_dict({"run": {"methods": ["fedmkt"]}, "dp": {"noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="fedmkt.selection"):
        Config.from_dict({"fedmkt": {"selection": "best"}})


# ---- heterogeneous clients: other model families and tokenizers ------------------------------------------------

HETERO = {"run": {"methods": ["fedmkt"]}, "fedmkt": NEXT_ROUND}


def test_the_server_aligns_the_llm_topk_into_each_clients_vocabulary(make_hetero_workbench, tmp_path):
    """What client_1 (Qwen2, 400 ids) is sent is the LLM's top-k already on its answer rows and in its vocabulary:
    valid for its vocabulary, with some rows aligned and some not, and its targets are those the client would
    have computed itself with the LLM's tokenizer."""
    wb = make_hetero_workbench(str(tmp_path), **HETERO)
    held = wb.held("client_1")
    assert len(held.tokenizer) == 400 and held.model.config.model_type == "qwen2"
    method = FedMKT(wb)
    states = method.initial_states(["client_0", "client_1", "client_2"]) | {"llm": dict(wb.llm_init)}
    task = method.client_task(states, "client_1")
    sent = covering(from_tensors(task, "server", len(held.tokenizer), K), held.public, "server")
    assert 0 < float(sent.aligned.float().mean()) < 1
    llm_top = public_topk(wb.llm, wb.aux_data, K, len(wb.tokenizer), 4)
    theirs = transfer_targets((llm_top, wb.aux_data, wb.tokenizer), held.public, held.tokenizer, 1.0)
    from fedcollm.alignment.transfer import row_targets

    for ours, their in zip(row_targets(sent, held.public.encoded, 1.0), theirs):
        assert torch.equal(ours.aligned, their.aligned) and torch.equal(ours.ids, their.ids)
        assert torch.allclose(ours.probs, their.probs)


@pytest.mark.parametrize("order", ["after_llm", "next_round"])
def test_two_rounds_with_clients_of_other_families_and_tokenizers(make_hetero_workbench, tmp_path, order):
    from fedcollm.evaluate import evaluate_tasks
    from fedcollm.methods.base import curve_items

    wb = make_hetero_workbench(str(tmp_path), **HETERO | {"fedmkt": MKT | {"slm_when": order}})
    run = RunDir(tmp_path)
    final = run_method(wb, "fedmkt", run)
    records = run.read_metrics("fedmkt")
    assert [r["teachers"] for r in records] == [3, 3] and [r["rejected"] for r in records] == [0, 0]
    assert all(0 < r["aligned_fraction"] < 1 for r in records)  # the clients' rows only partly align to the LLM's
    if order == "next_round":  # round 2 carries the LLM's (realigned) top-k
        assert records[1]["bytes_down"] > records[0]["bytes_down"]
    else:  # the server moved it onto each client's rows and taught the adapters itself
        assert records[1]["bytes_down"] == records[0]["bytes_down"] and records[1]["timing"]["server_slm_kd_s"] > 0
    refs = {"llm": wb.llm_init} | {c: wb.held(c).init for c in ("client_0", "client_1", "client_2")}
    states = run.load_round("fedmkt", 2, refs)
    assert not states_equal(states["llm"], wb.llm_init)
    assert states["client_1"].keys() != states["client_0"].keys()  # a Qwen2 adapter beside Llama ones
    for c in ("client_0", "client_1"):  # each SLM is scored with its own tokenizer
        held = wb.held(c)
        load_adapter_state(held.model, states[c])
        own = evaluate_tasks(held.model, held.tokenizer, wb.eval_sets, wb.cfg, c, curve_items(wb.cfg))
        assert final["slm_clients"][c]["arc_easy"]["acc"] == own["arc_easy"]["acc"]


def test_averaging_methods_refuse_clients_of_other_models():
    clients = {"model": {"client_slms": ["a", "b"]}, "federation": {"clients": 2}}
    for methods in (["fedcollm"], ["fedavg"]):
        with pytest.raises(ConfigError, match="model.client_slms: .* average one SLM adapter"):
            Config.from_dict(clients | {"run": {"methods": methods}})
    with pytest.raises(ConfigError, match="model.client_slms: fedmkt with fedmkt.share_adapters"):
        Config.from_dict(clients | {"run": {"methods": ["fedmkt"]}, "fedmkt": {"share_adapters": True}})
    ok = Config.from_dict(clients | {"run": {"methods": ["standalone", "fedmkt"]}})
    assert ok.client_models() == ["a", "b"]
    same = Config.from_dict({"model": {"slm": "a", "client_slms": ["a", "a"]}, "federation": {"clients": 2},
                             "run": {"methods": ["fedcollm"]}})  # every client on model.slm: one adapter
    assert same.client_models() == ["a", "a"]


def _hetero_fedcollm_workbench(data_dir, tokenizer, other, tmp_path, **distill):
    from conftest import tiny_config

    from fedcollm.models.tiny import tiny_llama
    from fedcollm.workbench import Workbench

    cfg = tiny_config(data_dir, str(tmp_path), distill={"top_k": 8, **distill})
    return Workbench.from_models(cfg, tiny_llama(), tiny_llama(vocab=len(other)), tokenizer, slm_tokenizer=other)


def test_heterogeneous_fedcollm_distils_both_models_through_the_alignment(data_dir, tokenizer, client_tokenizers,
                                                                         tmp_path):
    """LLM (512 ids) and SLM (300 ids) with different tokenizers: FedCoLLM's server phase moves each model's
    top-k onto the other's tokens and trains both; the record shows how much of D^a aligned, and the budget."""
    from fedcollm.experiment import _run_all
    from fedcollm.runs import RunDir

    wb = _hetero_fedcollm_workbench(data_dir, tokenizer, client_tokenizers[0], tmp_path)
    RunDir(tmp_path).write_config(wb.cfg.to_json())
    results = _run_all(wb, RunDir(tmp_path))  # the run and its report (which times each model on its own D^a)
    assert set(results["llm"]["fedcollm"]) == {"arc_easy"} and results["timing"]["fwd_bwd_g_s"] > 0
    records = RunDir(tmp_path).read_metrics("fedcollm")
    assert all(0 < r["aligned_fraction"][m] <= 1 for r in records for m in ("llm", "slm"))
    assert len(wb.aux_data) == 8
    assert [r["budget"]["llm_steps"] for r in records] == [3, 3]  # 1.5 epochs: 2 batches of 4, then 1
    final = RunDir(tmp_path).load_round("fedcollm", 2, {"llm": None, "slm": None})
    for which, init in (("llm", wb.llm_init), ("slm", wb.slm_init)):
        assert any(not torch.equal(final[which][k], init[k]) for k in init)


def test_heterogeneous_fedcollm_at_lambda_zero_is_plain_fine_tuning_on_the_public_set(data_dir, tokenizer,
                                                                                     client_tokenizers, tmp_path):
    from fedcollm.algorithms.training import distill_steps, unit_seed
    from fedcollm.methods import method_class
    from fedcollm.models.lora import adapter_state, load_adapter_state

    wb = _hetero_fedcollm_workbench(data_dir, tokenizer, client_tokenizers[0], tmp_path, kd_weight=0.0)
    states, _, _ = method_class("fedcollm")(wb).server_update({"llm": wb.llm_init, "slm": wb.slm_init}, 1)
    slm, d = wb.held("slm"), wb.cfg.distill
    load_adapter_state(slm.model, wb.slm_init)
    distill_steps(slm.model, slm.public, [None] * len(slm.public), d.epochs, d.slm_lr, d.batch_size, 0.0,
                  unit_seed(wb.cfg.run.seed, 1, -1))
    plain = adapter_state(slm.model)
    for key in plain:
        torch.testing.assert_close(states["slm"][key], plain[key])
