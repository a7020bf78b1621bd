"""`fedcollm export`: each exported form gives the adapted model's logits, read back by readers other than the
writer (plain transformers and peft without fedcollm, gguf's reader, transformers' GGUF loader, llama.cpp)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import patch_tiny_build
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
)

from fedcollm import cli
from fedcollm.config import LoraConfig
from fedcollm.errors import ModelError
from fedcollm.export.gguf import write_gguf
from fedcollm.export.hf import merge, write_adapter, write_model_folder
from fedcollm.models.lora import add_lora, peft_wrapping
from fedcollm.models.tiny import tiny_llama, tiny_pair, tiny_qwen2

PROMPT = "Which gas do plants take in from the air? carbon dioxide"


def with_adapter(model, seed: int = 0):
    """`model` under a LoRA adapter whose B is random (a fresh one is zero), so the adapter changes the logits."""
    peft_model = add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return peft_model.eval()


def tiny_gemma3():
    """A 2-layer Gemma 3 whose head_dim is 256, as Gemma-3-270M's: llama.cpp scales attention by head_dim and
    transformers' GGUF loader by the default query_pre_attn_scalar (256), so the two agree only there."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                              sliding_window=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, initializer_range=0.15)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # norms away from their zero init: a missed 1 + w shift must show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)
    return model


ARCHS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.fixture
def prompt_ids(tokenizer):
    return tokenizer(PROMPT, return_tensors="pt").input_ids


# ---- the Hugging Face folders ------------------------------------------------------------------------------------


def test_merge_gives_the_adapted_models_logits(prompt_ids):
    adapted = with_adapter(tiny_llama())
    with adapted.disable_adapter():
        base = logits(adapted, prompt_ids)
    expected = logits(adapted, prompt_ids)
    assert (expected - base).abs().max() > 1e-2  # the adapter matters, so a merge that dropped it would fail
    merged = merge(adapted)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, prompt_ids), expected, atol=1e-5, rtol=1e-5)


LOAD_WITHOUT_FEDCOLLM = """
import os, sys
sys.modules["fedcollm"] = None  # as on a machine without fedcollm: any import of it fails
try:
    import fedcollm
    raise SystemExit("fedcollm imported")
except ImportError:
    pass
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

os.chdir(sys.argv[1])  # the documented loads, from inside the export folder
tokenizer = AutoTokenizer.from_pretrained("merged")
ids = tokenizer(sys.argv[2], return_tensors="pt").input_ids
models = {"merged": AutoModelForCausalLM.from_pretrained("merged"),
          "base+adapter": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "adapter"),
          "auto": AutoPeftModelForCausalLM.from_pretrained("adapter")}
with torch.no_grad():
    torch.save({"ids": ids} | {name: m.eval()(ids).logits[0] for name, m in models.items()}, "logits.pt")
"""


def test_folders_load_with_plain_transformers_and_peft(tmp_path, tokenizer, prompt_ids):
    """merged/, and base/ + adapter/ (directly, and through base_model_name_or_path), in a process where fedcollm
    cannot be imported, each give the adapted model's logits."""
    from safetensors.torch import load_file

    model = tiny_llama()
    write_model_folder(model, tokenizer, tmp_path / "base")  # before the adapter wraps it, as export_run does
    adapted = with_adapter(model)
    expected = logits(adapted, prompt_ids)
    write_adapter(adapted, tmp_path / "adapter", "# card\n")
    write_model_folder(merge(adapted), tokenizer, tmp_path / "merged")
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_FEDCOLLM, str(tmp_path), PROMPT], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    assert torch.equal(got.pop("ids"), prompt_ids)
    for name, values in got.items():
        torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5, msg=name)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "./base"
    assert (tmp_path / "adapter" / "README.md").read_text() == "# card\n"
    assert not any("lora" in key for key in load_file(tmp_path / "base" / "model.safetensors"))


# ---- GGUF --------------------------------------------------------------------------------------------------------

BLOCK_ERROR = {GGMLQuantizationType.Q8_0: 1 / 254, GGMLQuantizationType.Q4_0: 1 / 8}
"""Largest error of a quantized weight as a fraction of its block's largest |weight| (rounding to the nearest of
255 steps; Q4_0 maps the block's signed extreme to -8 and clips the opposite one at +7, 1/8 off), before the f16
rounding of the block's scale."""


def assert_within_type_error(read: np.ndarray, expected: np.ndarray, qtype: GGMLQuantizationType, name: str):
    if qtype == GGMLQuantizationType.F32:  # exact but for Gemma's norms: (1 + w) - 1 rounds
        np.testing.assert_allclose(read, expected, rtol=1e-6, atol=1e-7, err_msg=name)
    elif qtype == GGMLQuantizationType.F16:
        np.testing.assert_allclose(read, expected, rtol=1e-3, atol=1e-7, err_msg=name)
    else:
        blocks, got = expected.reshape(-1, 32), read.reshape(-1, 32)
        bound = np.abs(blocks).max(axis=1, keepdims=True) * (BLOCK_ERROR[qtype] + 2e-3)
        assert (np.abs(got - blocks) <= bound + 1e-8).all(), f"{name}: off by more than {qtype.name}'s block error"


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
def test_gguf_tensors_read_back_as_the_merged_weights(tmp_path, tokenizer, arch, gguf_type):
    """gguf's reader and dequantizer, with transformers' GGUF name map and its undoing of llama.cpp's layout (Q/K
    permutation, Gemma's 1 + w), give back every merged weight within the type's error."""
    merged = merge(with_adapter(ARCHS[arch]()))
    path = tmp_path / "model.gguf"
    write_gguf(merged, tokenizer, path, gguf_type)
    reader = GGUFReader(path)
    config = merged.config
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.block_count"].contents() == config.num_hidden_layers
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == config.vocab_size
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    hf_names = get_gguf_hf_weights_map(merged, processor)
    state = merged.state_dict()
    types = set()
    for tensor in reader.tensors:
        data = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name).weights
        assert_within_type_error(data, state[hf_names[tensor.name]].numpy(), tensor.tensor_type, tensor.name)
        types.add(tensor.tensor_type)
    assert {hf_names[t.name] for t in reader.tensors} == set(state) - {"lm_head.weight"}  # tied: no output tensor
    assert GGMLQuantizationType[gguf_type.upper()] in types


LOGIT_ERROR = {"f16": 0.01, "q8_0": 0.05}
"""Largest logit difference from the merged model allowed per type, as a fraction of the largest |logit| (the tiny
models measured at most 0.002 and 0.025). q4_0 has no bound here: on these tiny random models it moves the logits
by up to half their range; its weights are checked block by block above."""


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, tokenizer):
    """Per architecture: the merged tiny model and its f16 and q8_0 GGUF files in one folder."""
    files = {}
    for arch, make in ARCHS.items():
        folder = tmp_path_factory.mktemp(arch)
        merged = merge(with_adapter(make()))
        for gguf_type in LOGIT_ERROR:
            write_gguf(merged, tokenizer, folder / f"model-{gguf_type}.gguf", gguf_type)
        files[arch] = (merged, folder)
    return files


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("gguf_type", list(LOGIT_ERROR))
def test_transformers_gguf_loader_gives_the_merged_logits(gguf_files, tokenizer, prompt_ids, arch, gguf_type):
    """transformers' own GGUF reader (config from the metadata, tensors de-permuted) agrees with the merged model,
    and its tokenizer, built from the tokenizer metadata, encodes the prompt to the same ids."""
    merged, folder = gguf_files[arch]
    name = f"model-{gguf_type}.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    expected = logits(merged, prompt_ids)
    error = (logits(loaded, prompt_ids) - expected).abs().max() / expected.abs().max()
    assert error < LOGIT_ERROR[gguf_type]
    assert AutoTokenizer.from_pretrained(folder, gguf_file=name)(PROMPT).input_ids == prompt_ids[0].tolist()


def test_gguf_tokenizer_of_a_registry_model_is_copied_from_its_source(tmp_path):
    """With a source GGUF (here SmolLM2's own) every tokenizer.* key is copied, while the hyperparameters come from
    the exported model: a 2-layer model over SmolLM2's vocabulary stays a 2-layer model."""
    from fedcollm.models.registry import MissingModelPackage, resolve_gguf

    try:
        source = resolve_gguf("smollm2-135m", tmp_path / "gguf")
    except MissingModelPackage as err:
        pytest.skip(str(err))
    original = GGUFReader(source)
    model = tiny_llama(hidden=32, layers=2, vocab=len(original.fields["tokenizer.ggml.tokens"].data))
    write_gguf(model, None, tmp_path / "m.gguf", "f16", source)
    written = GGUFReader(tmp_path / "m.gguf")
    keys = [k for k in original.fields if k.startswith("tokenizer.")]
    assert {"tokenizer.ggml.pre", "tokenizer.ggml.merges", "tokenizer.chat_template"} <= set(keys)
    assert {k: written.fields[k].contents() for k in keys} == {k: original.fields[k].contents() for k in keys}
    assert written.fields["llama.block_count"].contents() == 2 and written.fields["llama.embedding_length"].contents() == 32


def test_unsupported_architecture_and_tokenizer_are_refused(tmp_path, tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported"):
        write_gguf(gpt2, tokenizer, tmp_path / "m.gguf", "f16")
    words = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ModelError, match="cannot name this tokenizer's pre-tokenizer"):
        write_gguf(tiny_llama(vocab=3), PreTrainedTokenizerFast(tokenizer_object=words), tmp_path / "m.gguf", "f16")


def llama_cpp():
    """(ffi, lib) of llama.cpp's C API through llama-cpp-py-sync, a wheel that bundles libllama; skips where it is not
    installed or its library does not load (its Linux wheels need glibc >= 2.38)."""
    bindings = pytest.importorskip("llama_cpp_py_sync._cffi_bindings")
    try:
        return bindings.get_ffi(), bindings.get_lib()
    except (OSError, RuntimeError) as err:
        pytest.skip(f"llama-cpp-py-sync's libllama does not load here: {err}")


def llama_cpp_last_logits(path: Path, text: str) -> tuple[list[int], np.ndarray]:
    """llama.cpp's tokens of `text` and its logits after the last one."""
    ffi, lib = llama_cpp()
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
    assert model != ffi.NULL, f"llama.cpp cannot load {path}"
    params = lib.llama_context_default_params()
    params.n_ctx = 64
    context = lib.llama_init_from_model(model, params)
    try:
        vocab = lib.llama_model_get_vocab(model)
        tokens = ffi.new("llama_token[64]")
        count = lib.llama_tokenize(vocab, text.encode(), len(text.encode()), tokens, 64, False, True)  # special: as HF
        assert lib.llama_decode(context, lib.llama_batch_get_one(tokens, count)) == 0
        n_vocab = lib.llama_vocab_n_tokens(vocab)
        values = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(context, -1), 4 * n_vocab), dtype=np.float32)
        return [tokens[i] for i in range(count)], values.copy()
    finally:
        lib.llama_free(context)
        lib.llama_model_free(model)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_gives_the_merged_logits(gguf_files, prompt_ids, arch):
    merged, folder = gguf_files[arch]
    tokens, values = llama_cpp_last_logits(folder / "model-f16.gguf", PROMPT)
    assert tokens == prompt_ids[0].tolist()
    expected = logits(merged, prompt_ids)[-1].numpy()
    assert np.abs(values - expected).max() / np.abs(expected).max() < LOGIT_ERROR["f16"]


# ---- the CLI on a tiny run ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer, data_dir):
    """A finished 1-round run of FedCoLLM and Standalone (2 clients) whose config names the tiny models' folders,
    so that export loads the very models the run trained."""
    root = tmp_path_factory.mktemp("export-run")
    for name, model in zip(("llm", "slm"), tiny_pair(seed=0)):
        write_model_folder(model, tokenizer, root / name)
    with pytest.MonkeyPatch.context() as patch:
        patch_tiny_build(patch, tokenizer)
        cli.main(["run", "--out", str(root / "run"), "--limit", "4", "--set", f"data.data_dir='{data_dir}'",
                  "--set", f"model.llm='{root / 'llm'}'", "--set", f"model.slm='{root / 'slm'}'",
                  "--set", "run.methods=['fedcollm','standalone']", "--set", "federation.rounds=1",
                  "--set", "federation.clients=2", "--set", "data.train_per_task=24", "--set", "distill.epochs=1",
                  "--set", "model.max_length=64", "--set", "model.lora.dropout=0.0"])
    return root


def test_cli_exports_the_co_tuned_slm_by_default(tiny_run, tokenizer, prompt_ids, capsys):
    from peft import PeftModel

    run = tiny_run / "run"
    cli.main(["export", str(run)])
    out = run / "export" / "fedcollm-slm-r1"
    assert f"exported to {out}" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"adapter", "base", "merged", "model-f16.gguf", "model-q8_0.gguf",
                                               "README.md"}
    readme = (out / "README.md").read_text()
    assert "method `fedcollm`, round 1" in readme and "global SLM" in readme and str(tiny_run / "slm") in readme
    with peft_wrapping():
        trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_run / "slm"),
                                            run / "fedcollm" / "round_001" / "slm").eval()
    expected = logits(trained, prompt_ids)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out / "merged"), prompt_ids), expected,
                               atol=1e-5, rtol=1e-5)
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-q8_0.gguf")
    assert (logits(from_gguf, prompt_ids) - expected).abs().max() / expected.abs().max() < LOGIT_ERROR["q8_0"]


def test_cli_exports_a_clients_own_slm(tiny_run, prompt_ids):
    run = tiny_run / "run"
    out = tiny_run / "client1"
    cli.main(["export", str(run), "--method", "standalone", "--client", "1", "--formats", "merged", "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"merged", "README.md"}
    assert "client 1's SLM" in (out / "README.md").read_text()
    other = tiny_run / "client0"
    cli.main(["export", str(run), "--method", "standalone", "--client", "0", "--formats", "merged", "--out", str(other)])
    assert not torch.equal(logits(AutoModelForCausalLM.from_pretrained(out / "merged"), prompt_ids),
                           logits(AutoModelForCausalLM.from_pretrained(other / "merged"), prompt_ids))


EXPORT_ERRORS = [
    (["--round", "3"], "--round 3: fedcollm has no completed round 3 in {run} (completed: 1)"),
    (["--method", "fedavg"], "--method fedavg: {run} holds no adapter of it; methods with adapters: fedcollm, standalone"),
    (["--method", "standalone", "--client", "2"], "--client 2: the run has 2 clients (0..1)"),
    (["--client", "0"], "keeps no per-client SLMs: drop --client"),
    (["--method", "standalone"], "keeps one SLM per client: pass --client K"),
    (["--model", "llm", "--client", "0"], "--client: names a client's SLM; the LLM is the server's"),
    (["--formats", "adapter,onnx"], "--formats: onnx given; choose from adapter, merged, gguf"),
    (["--gguf-types", "f16,q2_k"], "--gguf-types: q2_k given; choose from f16, q8_0, q4_0"),
]


@pytest.mark.parametrize(("flags", "message"), EXPORT_ERRORS)
def test_cli_export_refuses_bad_flags_in_one_line(tiny_run, capsys, flags, message):
    run = tiny_run / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(run), *flags])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err
    assert line.startswith("fedcollm: error: ") and line.count("\n") == 1
    assert message.format(run=run) in line


def test_cli_export_refuses_a_missing_run_an_existing_output_and_an_ambiguous_method(tiny_run, tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.setenv("FEDCOLLM_CACHE", str(tmp_path / "cache"))  # where the missing run's traceback goes

    def error(*argv) -> str:
        with pytest.raises(SystemExit):
            cli.main(["export", *argv])
        return capsys.readouterr().err

    assert f"{tmp_path / 'nope'}: no such run directory" in error(str(tmp_path / "nope"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    assert f"{tmp_path / 'taken'}: already exists" in error(str(tiny_run / "run"), "--out", str(tmp_path / "taken"))
    both = tmp_path / "both"
    shutil.copytree(tiny_run / "run", both, ignore=shutil.ignore_patterns("export"))
    config = json.loads((both / "config.json").read_text())
    config["run"]["methods"].append("fedmkt")
    (both / "config.json").write_text(json.dumps(config))
    shutil.copytree(both / "fedcollm", both / "fedmkt")
    assert "methods fedcollm, standalone, fedmkt have adapters; choose one with --method" in error(str(both))


def test_provenance_of_a_derived_slm_names_its_layers_and_hub_original(tmp_path):
    from fedcollm.config import Config
    from fedcollm.export.run import Selection, adapter_card, provenance
    from fedcollm.runs import RunDir

    (tmp_path / "derive_info.json").write_text(json.dumps({"layers": [0, 5, 9],
                                                           "perplexity_held_out": {"healed": 42.0}}))
    config = Config.from_dict({"model": {"slm": "derived:smollm2-135m:3"}})
    selection = Selection(RunDir(tmp_path / "run"), config, "fedcollm", "slm", 2)
    about = provenance(selection, tmp_path / "derive_info.json")
    text = "\n".join(about)
    assert "method `fedcollm`, round 2, the global SLM's adapter (slm/ of round_002)" in text
    assert "decoder layers [0, 5, 9] of smollm2-135m" in text and "perplexity 42.0" in text
    assert "`HuggingFaceTB/SmolLM2-135M-Instruct` on the Hugging Face hub" in text
    assert adapter_card(selection, about).startswith("---\nlibrary_name: peft\nbase_model: HuggingFaceTB/SmolLM2-135M")
    assert selection.label == "fedcollm-slm-r2"


# ---- the real SmolLM2 (opt-in) -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_export(tmp_path):
    """SmolLM2-135M under a random adapter, exported through a run folder: prints the sizes and logit agreement."""
    from fedcollm.config import Config
    from fedcollm.export.run import export_run
    from fedcollm.models.loading import load_model, load_tokenizer
    from fedcollm.models.lora import adapter_state
    from fedcollm.models.registry import MissingModelPackage
    from fedcollm.runs import RunDir

    try:
        adapted = with_adapter(load_model("smollm2-135m"))
    except MissingModelPackage as err:
        pytest.skip(str(err))
    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = logits(adapted, ids)
    run = RunDir(tmp_path / "run")
    run.write_config(Config.from_dict({"model": {"llm": "smollm2-135m", "slm": "smollm2-135m"},
                                       "federation": {"rounds": 1}, "run": {"methods": ["fedcollm"]}}).to_json())
    run.save_round("fedcollm", 1, {"slm": adapter_state(adapted)}, {"slm": adapted})
    run.mark_done("fedcollm", 1, {"round": 1})
    out = export_run(run.path, gguf_types="f16,q8_0,q4_0")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
             for p in out.iterdir()}
    print("\nsizes (MB):", {name: round(size / 1e6, 1) for name, size in sorted(sizes.items())})
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    agreement = {"merged": logits(merged, ids)}
    for gguf_type in ("f16", "q8_0", "q4_0"):
        agreement[gguf_type] = logits(AutoModelForCausalLM.from_pretrained(out, gguf_file=f"model-{gguf_type}.gguf"), ids)
    for name, values in agreement.items():
        top1 = (values.argmax(-1) == expected.argmax(-1)).float().mean().item()
        error = ((values - expected).abs().max() / expected.abs().max()).item()
        print(f"{name}: max |logit diff| / max |logit| = {error:.2e}, top-1 agreement over {len(ids[0])} positions "
              f"{top1:.2f}")
        assert error < {"merged": 1e-5}.get(name, LOGIT_ERROR.get(name, 1))
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in (out / "adapter" / "README.md").read_text()
