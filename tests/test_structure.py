"""The package's layering: no module imports the CLI, methods are registered once in `fedcollm.methods`, the
pure modules import without peft, and Flower's private API is used only where listed, pinned to one version."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedcollm.config import Config, ConfigError, describe
from fedcollm.methods import REGISTRY, MethodSpec, method_class
from fedcollm.methods.base import Method
from fedcollm.report import accuracy_markdown, build_results, table_rows
from fedcollm.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fedcollm"


def _imported_modules(path: Path) -> set[str]:
    """Every module name `path` imports, relative imports resolved (`from a import b` counts as a and a.b)."""
    package = ["fedcollm", *path.relative_to(PACKAGE).parent.parts]  # what `from . import x` is relative to
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] if node.level else [])
            module = ".".join(filter(None, [base, node.module]))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_no_module_imports_the_cli():
    """The CLI sits on top: the engines reach the round orchestration through fedcollm.experiment, and what the CLI
    and other modules share (e.g. load_peft_adapter, in fedcollm.models.lora) lives below it."""
    upward = {str(path.relative_to(PACKAGE)): sorted(n for n in _imported_modules(path)
                                                     if n == "fedcollm.cli" or n.startswith("fedcollm.cli."))
              for path in PACKAGE.rglob("*.py") if path != PACKAGE / "cli.py"}
    assert not {path: names for path, names in upward.items() if names}


PURE = ["fedcollm.aggregate", "fedcollm.privacy", "fedcollm.comm", "fedcollm.distill.losses",
        "fedcollm.algorithms.training", "fedcollm.stats", "fedcollm.metrics"]
PURE_PACKAGES = ["fedcollm.alignment", "fedcollm.data"]
PROBE = """
import importlib, pkgutil, sys
import fedcollm.config, fedcollm.methods
assert "torch" not in sys.modules, "fedcollm.config or fedcollm.methods imported torch"
modules = sys.argv[1].split(",")
for package in sys.argv[2].split(","):
    modules += [info.name for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + ".")]
for name in modules:
    importlib.import_module(name)
    assert "peft" not in sys.modules, f"importing {name} imported peft"
print(" ".join(modules))
"""


def test_the_pure_modules_import_without_peft():
    """Losses, aggregation, privacy, alignment, the training steps, data and the wire format run without peft; the
    config and the method registry even without torch (a fresh interpreter: this one has imported both)."""
    done = subprocess.run([sys.executable, "-c", PROBE, ",".join(PURE), ",".join(PURE_PACKAGES)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"fedcollm.alignment.vocab", "fedcollm.data.batching"} <= set(done.stdout.split())


def test_every_registered_method_is_the_class_of_that_name():
    for name in REGISTRY:
        assert method_class(name).name == name


class Toy(Method):
    """A method registered by this test alone."""

    name = "toy"


def test_a_method_registered_in_methods_alone_is_accepted_and_reported(tmp_path, monkeypatch):
    """Config validation and the report's rows and labels come from the registry: a new method touches nothing else."""
    with monkeypatch.context() as patch:
        patch.setitem(REGISTRY, "toy", MethodSpec("Toy", ("slm",), f"{__name__}:Toy"))
        cfg = Config.from_dict({"run": {"methods": ["zero_shot", "toy"]}})
        assert method_class("toy") is Toy
        assert table_rows("slm")[-1] == "toy" and "toy" not in table_rows("llm")
        run = RunDir(tmp_path)
        run.write_config(cfg.to_json())
        run.write_final("toy", {"slm": {"arc_easy": {"acc": 0.5, "acc_norm": 0.25, "n": 4, "metric": "acc"}}})
        results = build_results(run, {}, {})
        assert results["slm"] == {"toy": {"arc_easy": 0.5}} and results["llm"] == {}
        assert any(line.startswith("| Toy | ") for line in accuracy_markdown(results))
    with pytest.raises(ConfigError, match="unknown method 'toy'"):
        Config.from_dict({"run": {"methods": ["toy"]}})


def test_the_config_checks_read_a_methods_facts_from_its_registration(monkeypatch):
    """Sharing one adapter, SecAgg+ and DP support are MethodSpec fields: a new method's rules need no config.py
    edit, and the configuration reference lists it."""
    other_slms = {"model": {"client_slms": ["a", "b"]}, "federation": {"clients": 2}}
    dp = {"dp": {"noise_multiplier": 1.0}}
    monkeypatch.setitem(REGISTRY, "toy", MethodSpec("Toy", ("slm",), f"{__name__}:Toy", shares_adapter=True))
    assert Config.from_dict(dp | {"run": {"methods": ["toy"]}}).shares_adapter("toy")  # DP has an adapter to noise
    with pytest.raises(ConfigError, match="model.client_slms: toy average one SLM adapter"):
        Config.from_dict(other_slms | {"run": {"methods": ["toy"]}})
    with pytest.raises(ConfigError, match="would be noised: add fedavg or fedcollm or toy, or set it to 0"):
        Config.from_dict(dp | {"run": {"methods": ["standalone"]}})
    assert "any of zero_shot, standalone, fedavg, centralized, fedcollm, fedmkt, toy (" in describe()

    switched = MethodSpec("Toy", ("slm",), f"{__name__}:Toy", shares_adapter="fedmkt.share_adapters",
                          supports_secagg=False, supports_dp=False, uploads="votes")
    monkeypatch.setitem(REGISTRY, "toy", switched)  # shares an adapter only as the named option says
    assert Config.from_dict(other_slms | {"run": {"methods": ["toy"]}}).client_models() == ["a", "b"]
    with pytest.raises(ConfigError, match="model.client_slms: toy with fedmkt.share_adapters average one SLM"):
        Config.from_dict(other_slms | {"run": {"methods": ["toy"]}, "fedmkt": {"share_adapters": True}})
    with pytest.raises(ConfigError, match=r"secagg.enabled: SecAgg\+ sums adapters, but Toy uploads votes, which "
                                          r"cannot be summed: drop toy from run.methods or turn SecAgg\+ off"):
        Config.from_dict({"secagg": {"enabled": True}, "run": {"methods": ["toy"]}})
    with pytest.raises(ConfigError, match="dp.noise_multiplier: DP here noises the shared adapter, but Toy uploads "
                                          "votes that it would not cover: drop toy from run.methods or set it to 0"):
        Config.from_dict(dp | {"run": {"methods": ["fedavg", "toy"]}})


def test_every_config_option_a_registration_names_is_a_boolean():
    assert sum(spec.headline for spec in REGISTRY.values()) == 1, "one method is the one under study"
    for name, spec in REGISTRY.items():
        if isinstance(spec.shares_adapter, str):
            section, key = spec.shares_adapter.split(".")
            assert isinstance(getattr(getattr(Config(), section), key), bool), f"{name}: {spec.shares_adapter}"


# Flower's documented API (flower.ai/docs/framework/ref-api): these packages, by their exported names.
FLOWER_PUBLIC = {"flwr", "flwr.app", "flwr.clientapp", "flwr.clientapp.mod", "flwr.serverapp",
                 "flwr.serverapp.strategy", "flwr.client", "flwr.client.mod", "flwr.common", "flwr.server",
                 "flwr.server.strategy", "flwr.server.workflow", "flwr.simulation"}
# Where fedcollm reaches into Flower's private modules, and why; each must be re-checked on a Flower upgrade.
FLOWER_PRIVATE_USERS = {
    "engines/flower/worker.py": "the long-lived ClientApp runner: the SuperNode runtime API's task steps",
    "engines/flower/superlink.py": "the SuperLink launcher that serves the Fleet API alone on a second port",
    "engines/flower/secagg.py": "SecAgg+ through the legacy strategy path (its records and client manager)",
    "engines/flower/client_app.py": "the legacy FitIns/FitRes layout that secaggplus_mod masks",
    "engines/flower/records.py": "the protobuf size of a message, for the communication table",
    "engines/flower/transport.py": "the error code of a reply from a node that is gone",
}
NOTES = "docs/flower-1.42-notes.md"


def _flower_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every flwr import in `path`: `from m import n`, `import m` and `importlib.import_module("m")`
    (with the attributes read off the module it returns)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, handles = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "flwr":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "flwr"]
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and node.value.args
              and getattr(node.value.func, "attr", getattr(node.value.func, "id", None)) == "import_module"
              and isinstance(node.value.args[0], ast.Constant) and str(node.value.args[0].value).startswith("flwr")):
            module = node.value.args[0].value
            found.append((module, None))
            handles |= {target.id: module for target in node.targets if isinstance(target, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in handles:
            found.append((handles[node.value.id], node.attr))
    return found


def _is_public(module: str, name: str | None) -> bool:
    return module in FLOWER_PUBLIC and (name is None or module != "flwr" or f"flwr.{name}" in FLOWER_PUBLIC)


def _sources() -> dict[str, Path]:
    return {str(p.relative_to(PACKAGE)): p for p in PACKAGE.rglob("*.py")} | {
        str(p.relative_to(ROOT)): p for p in (ROOT / "benchmarks").glob("*.py")}


def test_only_the_listed_modules_use_flowers_private_api():
    private = {where: sorted({m for m, n in _flower_imports(path) if not _is_public(m, n)})
               for where, path in _sources().items()}
    unlisted = {where: modules for where, modules in private.items() if modules and where not in FLOWER_PRIVATE_USERS}
    assert not unlisted, (f"{unlisted}: Flower's private modules change without notice between releases; use its "
                          f"public API ({', '.join(sorted(FLOWER_PUBLIC))}), or list the module in "
                          f"FLOWER_PRIVATE_USERS with the reason and the facts it relies on in {NOTES}")
    assert all(private[where] for where in FLOWER_PRIVATE_USERS), "a listed module no longer needs the listing"


def test_flower_is_the_pinned_version():
    """The private API in FLOWER_PRIVATE_USERS was checked against one Flower release: another must be re-checked."""
    flwr = pytest.importorskip("flwr")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {req.split("==", 1)[1] for reqs in extras.values() for req in reqs if req.startswith("flwr==")}
    assert len(pins) == 1, f"pyproject.toml pins flwr at {sorted(pins)}: pin one version"
    assert flwr.__version__ in pins, (
        f"flwr {flwr.__version__} is installed, but pyproject.toml pins flwr=={pins.pop()}: fedcollm uses Flower's "
        f"private API in {', '.join(FLOWER_PRIVATE_USERS)}; re-check each (worker.py above all: it reproduces "
        f"Flower's ClientApp task steps) against the new release and {NOTES} before moving the pin")


def _missing(module: str, name: str | None) -> str | None:
    """What keeps `from module import name` (or `import module`) from working, or None."""
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        return f"module {module} is gone ({err})"
    if name is None:
        return None
    if hasattr(found, name):
        unlisted = _is_public(module, name) and name not in getattr(found, "__all__", [name])
        return f"{name} is not among {module}'s public names (__all__)" if unlisted else None
    try:
        importlib.import_module(f"{module}.{name}")  # a submodule: `from flwr import app`
    except ImportError:
        return f"{module} has no {name}"
    return None


def test_every_flower_symbol_fedcollm_uses_still_imports():
    """On an upgrade, name each moved symbol and the module to re-check, rather than fail an import somewhere."""
    pytest.importorskip("flwr")
    moved = [f"{module}{'.' + name if name else ''} (used by {where}): {why}"
             for where, path in _sources().items() for module, name in _flower_imports(path)
             if (why := _missing(module, name))]
    assert not moved, ("Flower moved or dropped what fedcollm imports:\n  " + "\n  ".join(moved) +
                       f"\nre-check each module named (engines/flower/worker.py above all: it reproduces Flower's "
                       f"ClientApp task steps) against the installed Flower and {NOTES}")
