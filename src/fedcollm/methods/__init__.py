"""The methods of the paper's tables, registered once in `REGISTRY` under the names `run.methods` uses.

The registry imports nothing heavy: the config validates names and the report labels and orders its rows from it
without torch; `method_class` imports a method's implementation when a run needs it. Adding a method is a module
here and one entry below.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedcollm.methods.base import Method


@dataclass(frozen=True)
class MethodSpec:
    """What is known of a method before its code is imported."""

    title: str  # its row label in the report
    scores: tuple[str, ...]  # the models it is scored on, each a table row of the report: "llm", "slm"
    implementation: str  # "module:Class" of its Method subclass, whose `name` is its key in REGISTRY
    # its clients train one SLM adapter that the server averages and broadcasts (so every client runs model.slm, and
    # DP noises it); a "section.key" string names the boolean config option that turns this on
    shares_adapter: bool | str = False
    supports_secagg: bool = True  # SecAgg+ can protect what its clients upload (adapters, which it sums)
    supports_dp: bool = True  # DP's noise on the shared adapter covers all its clients upload
    uploads: str = "adapters"  # what its clients upload, as a config refusal names it
    headline: bool = False  # the method under study (one only): the report sets it against each row and times it


REGISTRY: dict[str, MethodSpec] = {  # in the order of the report's rows
    "zero_shot": MethodSpec("Zero-Shot", ("llm", "slm"), "fedcollm.methods.base:Method"),
    "standalone": MethodSpec("Standalone", ("slm",), "fedcollm.methods.federated:Standalone"),
    "fedavg": MethodSpec("FedAvg", ("slm",), "fedcollm.methods.federated:FedAvg", shares_adapter=True),
    "centralized": MethodSpec("Centralized", ("llm",), "fedcollm.methods.centralized:Centralized"),
    "fedcollm": MethodSpec("FedCoLLM", ("llm", "slm"), "fedcollm.methods.federated:FedCoLLM", shares_adapter=True,
                           headline=True),
    "fedmkt": MethodSpec("FedMKT", ("llm", "slm"), "fedcollm.methods.fedmkt:FedMKT",
                         shares_adapter="fedmkt.share_adapters", supports_secagg=False, supports_dp=False,
                         uploads="top-k logits on D^a"),
}


def headline() -> str:
    """The method under study: the registered one with `headline` set."""
    [name] = [m for m, spec in REGISTRY.items() if spec.headline]
    return name


def method_class(name: str) -> type[Method]:
    """The class of registered method `name` (importing it imports torch and the models)."""
    module, cls = REGISTRY[name].implementation.split(":")
    return getattr(import_module(module), cls)


__all__ = ["REGISTRY", "MethodSpec", "headline", "method_class"]
