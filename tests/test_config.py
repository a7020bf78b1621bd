import pytest

from fedcollm.cli import default_config_path
from fedcollm.config import Config, ConfigError, describe


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


def test_every_field_is_documented():
    import dataclasses

    from fedcollm import config as c

    doc = describe()
    for cls in (c.ModelConfig, c.LoraConfig, c.DataConfig, c.FederationConfig, c.DistillConfig, c.DeriveConfig,
                c.RunConfig, c.TaskConfig):
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(f.type) and f.name != "lora":
                assert f"`{f.name}`" in doc, f"{cls.__name__}.{f.name} undocumented"


def test_readme_config_reference_is_the_generated_one():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert describe().strip() in readme, "README's config table is stale: paste `fedcollm config-doc` output"
