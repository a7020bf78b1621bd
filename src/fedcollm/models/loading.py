"""Load causal LMs from a registry name, a local HF directory, a GGUF file or a hub id.

GGUF weights are dequantized once and cached as safetensors under `$FEDCOLLM_CACHE/models/`, so later
loads take seconds instead of the 15-60 s a GGUF dequantization costs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from fedcollm.errors import ConfigError, ModelError
from fedcollm.models.registry import REGISTRY, resolve_gguf

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("FEDCOLLM_CACHE", Path.home() / ".cache" / "fedcollm"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device = {device!r}, but torch sees no CUDA device here; use auto or cpu")
    return torch.device(device)


def cpu_model() -> str:
    """The CPU's model name (recorded beside timings, and part of what a measured dtype choice depends on)."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())


def cpu_supports_bf16() -> bool:
    """bf16 matmuls are fast only with native instructions (avx512_bf16 / AMX); emulated they are slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _step_seconds(model, dtype: torch.dtype, repeats: int = 2) -> float:
    """Mean seconds of a forward+backward through every layer (gradients reach the input embeddings, as LoRA
    training's reach every layer) on an 8 x 64 batch in `dtype`; the first pass warms up and is not counted."""
    import time

    from fedcollm.data.batching import last_positions

    model.to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(repeats + 1):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        t0 = time.perf_counter()
        model(inputs_embeds=embeds, logits_to_keep=last_positions(64, 8, ids.device)).logits.float().logsumexp(-1).sum().backward()
        seconds.append(time.perf_counter() - t0)
    model.to(torch.float32)
    return sum(seconds[1:]) / repeats


def measured_cpu_dtype(spec: str | Path) -> torch.dtype:
    """fp32 or bf16, whichever trains model `spec` (as load_model takes it) faster on this CPU: where bf16 is native, a model
    may still be slower in it (issue 8 measured a 10-layer SLM 1.7x slower in bf16 and a 30-layer LLM equal).
    Timed once per model, CPU, torch version and thread count; the choice is kept in
    $FEDCOLLM_CACHE/dtype-choices.json so every process on this machine (e.g. each Flower client) agrees."""
    import json

    from transformers import AutoModelForCausalLM

    from fedcollm.fileio import atomic_write_json

    source = materialize(str(spec))
    cpu = cpu_model()
    key = f"{Path(source).resolve() if Path(source).exists() else source}|{cpu}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    path = cache_dir() / "dtype-choices.json"
    choices = json.loads(path.read_text()) if path.exists() else {}
    if key not in choices:
        model = _from_pretrained(AutoModelForCausalLM, str(spec), dtype=torch.float32).eval()
        timing = {name: _step_seconds(model, dt) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        choices[key] = {"dtype": min(timing, key=timing.get), "seconds": timing}
        log.info("dtype auto for %s on %s: %s (fwd+bwd fp32 %.3f s, bf16 %.3f s)", spec, cpu,
                 choices[key]["dtype"], timing["fp32"], timing["bf16"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, choices)
    return torch.bfloat16 if choices[key]["dtype"] == "bf16" else torch.float32


def resolve_dtype(dtype: str, device: torch.device, model: str | Path | None = None) -> torch.dtype:
    """model.dtype as a torch dtype. auto: bf16 on CUDA where supported; on a CPU with native bf16, whichever of
    fp32/bf16 measures faster for `model` (bf16 unmeasured when no model is named); fp32 on other CPUs, where
    bf16 is emulated and far slower."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if not cpu_supports_bf16():
            return torch.float32
        return measured_cpu_dtype(model) if model is not None else torch.bfloat16
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ConfigError(f"model.dtype: unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    return table[dtype]


@contextmanager
def cache_lock(target: Path):
    """Hold an exclusive lock on `target` (a file beside it) across processes: several clients of one machine
    that start together must not each spend minutes deriving or converting, or half-write, the same cached model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish {target.name}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF file with transformers and save plain safetensors + tokenizer into `target`, once: under
    the cache lock, so processes that start together convert it once and the others wait."""
    with cache_lock(target):
        if not (target / "config.json").exists():  # not converted while we waited
            _convert_gguf_unlocked(gguf_path, target)


def _convert_gguf_unlocked(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once) in %s", gguf_path.name, target)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The dequantized weights are plain tensors, but transformers marks the model as GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def materialize(spec: str) -> Path | str:
    """A local directory (or hub id) that `from_pretrained` can read for model `spec`."""
    path = Path(spec).expanduser()
    if spec in REGISTRY:
        target = cache_dir() / "models" / spec
        if not (target / "config.json").exists():
            gguf = resolve_gguf(spec, cache_dir() / "gguf")
            _convert_gguf(gguf, target)
        return target
    if path.is_file() and path.suffix == ".gguf":
        target = cache_dir() / "models" / f"gguf-{path.stem}-{path.stat().st_size}"
        if not (target / "config.json").exists():
            _convert_gguf(path, target)
        return target
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model {spec}: {path} has no config.json, so it is not a Hugging Face model directory")
        return path
    if path.suffix == ".gguf" or spec.startswith((".", "/", "~")):
        raise ModelError(f"model {spec}: path does not exist")
    return spec  # a hub id; works only where a hub is reachable


def _from_pretrained(loader, spec: str, **kwargs):
    """`loader.from_pretrained` on what `spec` names; a name that is nothing here becomes one clear line."""
    source = materialize(spec)
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:  # transformers' answer to an unknown hub id without a hub, or a damaged model folder
        raise ModelError(f"model {spec}: cannot load it ({str(err).splitlines()[0]}); use a registry name "
                         f"({', '.join(REGISTRY)}), derived:BASE:N, a local model folder or a .gguf file") from err


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, spec)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               quantize: str = "none"):
    """Model `spec` in eval mode on `device`, its weights in `dtype`, or with `quantize` (model.quantize) its base
    weights in 4 or 8 bits (`quantized`)."""
    from transformers import AutoModelForCausalLM

    if quantize != "none":
        return quantized(spec, dtype, torch.device(device), quantize)
    model = _from_pretrained(AutoModelForCausalLM, spec, dtype=dtype)
    return model.to(device).eval()


def quantized(spec: str, dtype: torch.dtype, device: torch.device, quantize: str):
    """Model `spec` with its linear layers' weights in 4bit (NF4, double-quantized, computing in `dtype`) or 8bit
    (LLM.int8) through bitsandbytes, prepared for k-bit training as QLoRA is (peft: every weight frozen, the layers
    left unquantized in fp32). Without bitsandbytes, or on a device it does not support, one line says so."""
    from importlib.util import find_spec

    missing = [name for name in ("bitsandbytes", "accelerate") if find_spec(name) is None]
    if missing:
        raise ModelError(f"model.quantize = {quantize} needs {' and '.join(missing)} (not installed here): pip "
                         f"install 'fedcollm[quant]', or set model.quantize = none")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype) if quantize == "4bit"
              else BitsAndBytesConfig(load_in_8bit=True))
    try:
        model = _from_pretrained(AutoModelForCausalLM, spec, dtype=dtype, quantization_config=config,
                                 device_map={"": str(device)})
    except (ImportError, RuntimeError, ValueError) as err:  # transformers' answers to an unsupported platform
        raise ModelError(f"model.quantize = {quantize}: bitsandbytes cannot load model {spec} on {device} here "
                         f"({str(err).splitlines()[0]}); set model.quantize = none, or use a device it supports "
                         f"(CUDA)") from err
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False).eval()


def registry_tokenizer(name: str):
    """The tokenizer of registry model `name`, read from its GGUF once (without converting the weights) and from
    $FEDCOLLM_CACHE/tokenizers afterwards: what vocabulary mapping needs of a model."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    saved = cache_dir() / "tokenizers" / name
    if not (saved / "tokenizer.json").exists():
        gguf = resolve_gguf(name, cache_dir() / "gguf")
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)
