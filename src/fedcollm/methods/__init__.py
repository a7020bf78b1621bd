"""The methods of the paper's tables, by the names `run.methods` uses."""

from fedcollm.methods.base import Method
from fedcollm.methods.centralized import Centralized
from fedcollm.methods.federated import FedAvg, FedCoLLM, Standalone
from fedcollm.methods.fedmkt import FedMKT

METHOD_CLASSES: dict[str, type[Method]] = {m.name: m for m in (Method, Standalone, FedAvg, Centralized, FedCoLLM,
                                                               FedMKT)}

__all__ = ["METHOD_CLASSES", "Method"]
