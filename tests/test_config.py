import pytest

from fedcollm.config import Config, ConfigError, describe
from fedcollm.experiment import default_config_path


def test_embedded_default_loads():
    cfg = Config.from_toml(default_config_path())
    assert cfg.model.llm == "smollm2-135m" and cfg.federation.clients == 4
    assert cfg.model.lora.r == 8 and cfg.model.lora.alpha == 16 and cfg.model.lora.dropout == 0.05


def test_overrides_are_typed_and_validated():
    cfg = Config().override(["federation.rounds=5", "distill.kl_direction=reverse", "data.eval_limit=none",
                             "data.tasks=['arc_easy']", "distill.llm_lr=2e-4"])
    assert cfg.federation.rounds == 5 and cfg.distill.kl_direction == "reverse"
    assert cfg.data.eval_limit is None and cfg.data.tasks == ["arc_easy"] and cfg.distill.llm_lr == 2e-4
    with pytest.raises(ConfigError, match="federation.rounds"):
        Config().override(["federation.rounds=0"])
    with pytest.raises(ConfigError, match="no such config field"):
        Config().override(["federation.round=3"])
    with pytest.raises(ConfigError, match="expected int"):
        Config().override(["federation.clients=four"])


def test_toml_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("[data]\ntasks = ['arc_easy', 'mmlu']\n")
    with pytest.raises(ConfigError, match=r"data.tasks: unknown task 'mmlu': declare it in a \[tasks.mmlu\] table"):
        Config.from_toml(bad)
    bad.write_text("[federation]\nclientz = 3\n")
    with pytest.raises(ConfigError, match=r"c.toml.federation: unknown field\(s\) clientz"):
        Config.from_toml(bad)
    bad.write_text("[federation\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.from_toml(bad)


def test_config_round_trips_through_dict():
    cfg = Config().override(["model.lora.r=16", "run.methods=['fedavg','fedcollm']"])
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_every_field_is_documented_in_the_reference():
    import dataclasses
    import typing

    from fedcollm import config as c

    doc = describe()
    sections = dict(c.config_sections())
    assert {"model", "model.lora", "data", "federation", "distill", "fedmkt", "dp", "secagg", "derive", "run",
            "tasks.NAME"} <= set(sections)
    for name, cls in sections.items():
        assert f"\n## [{name}]\n" in doc
        docs, hints = c._field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(hints[f.name]):
                assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
                assert f"| `{f.name}` |" in doc, f"{cls.__name__}.{f.name} missing from the reference"


def test_the_reference_renders_defaults_as_values_not_source_text():
    doc = describe()
    assert "default_factory" not in doc and "field(" not in doc
    assert '| `tasks` | `["commonsenseqa", "openbookqa", "arc_challenge", "arc_easy"]` |' in doc
    assert '| `methods` | `["zero_shot", "fedcollm"]` |' in doc
    assert "| `target_modules` | `[]` |" in doc and "| `train_per_task` | `none` |" in doc
    assert "| `data_dir` | `$FEDCOLLM_DATA` if set, else `none` |" in doc  # not this machine's environment
    assert "\\|D^a\\|" in doc  # a | in a docstring does not end the table cell
    for line in doc.splitlines():  # one row per line: a multi-line docstring is joined
        assert not line.startswith("    ")


def test_docs_configuration_md_is_the_generated_reference():
    import subprocess
    import sys
    from pathlib import Path

    from fedcollm.config import REFERENCE_COMMAND

    path = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert path.read_text(encoding="utf-8") == describe(), f"{path} is stale: regenerate it with `{REFERENCE_COMMAND}`"
    printed = subprocess.run([sys.executable, "-m", "fedcollm.config"], capture_output=True, text=True, check=True)
    assert printed.stdout == describe() and printed.stderr == ""
