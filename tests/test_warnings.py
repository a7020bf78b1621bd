"""A normal run shows no library deprecation warnings: against the tree before this test, every model that peft
wrapped printed transformers' FutureWarning that `is_gradient_checkpointing` is deprecated (peft reads it; see
`fedcollm.models.lora.peft_wrapping`)."""

import warnings

from fedcollm import cli
from fedcollm.models.tiny import tiny_pair

METHODS = ["zero_shot", "standalone", "fedavg", "centralized", "fedcollm", "fedmkt"]


def _deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
            if issubclass(w.category, (DeprecationWarning, FutureWarning))]


def test_a_run_of_every_method_and_an_eval_of_its_adapter_warn_of_no_deprecation(tiny_build, tokenizer, tmp_path,
                                                                                   data_dir):
    run = tmp_path / "run"
    slm_dir = tmp_path / "slm"
    tiny_pair(seed=0)[1].save_pretrained(slm_dir)  # the SLM the tiny build trains, for `fedcollm eval --adapter`
    tokenizer.save_pretrained(slm_dir)
    common = ["--set", f"data.data_dir='{data_dir}'", "--limit", "4", "--set", "model.max_length=64",
              "--set", "model.dtype=fp32", "--set", "model.device=cpu"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main(["run", "--out", str(run), *common, "--set", "data.train_per_task=24", "--set", "federation.clients=2",
                  "--set", "federation.rounds=1", "--set", f"run.methods={METHODS}", "--set", "fedmkt.top_k=8"])
        cli.main(["eval", str(slm_dir), "--adapter", str(run / "fedcollm" / "round_001" / "slm"), *common])
    assert not _deprecations(caught), "\n".join(_deprecations(caught))
