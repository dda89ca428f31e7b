"""Config: YAML + overrides, typed, and every bad value fails before work starts, naming file and key."""
import logging

import pytest
import yaml

from virchow_fast.config import ConfigError, derive, load_config, save_resolved


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    for name in ("debug", "vit_h14_virchow2", "vit_g14_virchow2g"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.name == name


def test_override_types_and_nesting(tmp_path):
    cfg = load_config(_write(tmp_path, "model: {depth: 2}\n"), ["optim.base_lr=3e-4", "data.crops.hflip=0.0",
                                                                  "data.mags=[40, 20]", "data.mag_weights=[1, 1]",
                                                                  "data.mag_mpp=[0.25, 0.5]"])
    assert cfg.model.depth == 2
    assert cfg.optim.base_lr == pytest.approx(3e-4)
    assert cfg.data.crops.hflip == 0.0
    assert cfg.data.mags == [40.0, 20.0]


@pytest.mark.parametrize("text, overrides, needle", [
    ("model: {depht: 3}\n", [], "model.depht: unknown key"),
    ("", ["optim.nope=1"], "optim.nope: unknown key"),
    ("model: {depth: three}\n", [], "model.depth: expected an integer"),
    ("model: {qkv_bias: 1}\n", [], "model.qkv_bias: expected true/false"),
    ("data: {crops: {global_size: 225}}\n", [], "data.crops.global_size: 225 is not a positive multiple"),
    ("model: {embed_dim: 100, num_heads: 3}\n", [], "model.embed_dim: 100 is not divisible"),
    ("", ["loss.centering=kmeans"], "loss.centering: 'kmeans' is not one of"),
    ("", ["data.crops.hflip=1.5"], "data.crops.hflip: must be a probability"),
    ("data: {source: slides}\n", [], "data.paths: needs at least one path"),
    ("- 1\n- 2\n", [], "top level must be a mapping"),
])
def test_bad_values_name_file_and_key(tmp_path, text, overrides, needle):
    path = _write(tmp_path, text or "name: t\n")  # an empty file is an error of its own
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(path) in str(err.value)
    assert needle in str(err.value)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["optim.base_lr"])


def test_derived_values_and_resolved_file(tmp_path):
    cfg = load_config("configs/vit_h14_virchow2.yaml")
    d = derive(cfg, world_size=128)
    assert d.global_batch == 32 * 128
    assert d.peak_lr == pytest.approx(2e-4 * (4096 / 1024) ** 0.5)
    assert d.total_steps == cfg.train.epochs * cfg.train.steps_per_epoch
    assert (d.global_tokens, d.local_tokens) == (261, 54)
    save_resolved(cfg, d, tmp_path / "resolved.yaml")
    saved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert saved["config"]["model"]["embed_dim"] == 1280
    assert saved["derived"]["peak_lr"] == pytest.approx(d.peak_lr)
    # the saved config loads back to the same values
    again = load_config(_write(tmp_path, yaml.safe_dump(saved["config"])))
    assert again == cfg


@pytest.mark.parametrize("text, overrides, needle", [
    ("", ["optim.base_lr=.inf"], "optim.base_lr: must be a finite number"),
    ("optim: {base_lr: .nan}\n", [], "optim.base_lr: must be a finite number"),
    ("", ["loss.kde_kappa=-.inf"], "loss.kde_kappa: must be a finite number"),
    ("", ["data.crops.hflip=nan"], "data.crops.hflip: must be a finite number"),
    ("", ["data.mag_mpp=[0.25, -0.5, 1.0, 2.0]"], "data.mag_mpp: must be positive"),
    ("", ["data.mags=[40, 0, 10, 5]"], "data.mags: must be positive"),
    ("", ["data.crops.local_size=406"], "data.crops.local_size: 406 px"),
    ("", ["loss.regularizer_weight=-0.05"], "loss.regularizer_weight: must be >= 0"),
    ("", ["loss.ibot_weight=-1"], "loss.ibot_weight: must be >= 0"),
    ("", ["loss.kde_kappa=0"], "loss.kde_kappa: must be positive"),
    ("", ["optim.base_lr=1e38"], "optim.base_lr: must be in (0, 1], got 1e+38"),
    ("", ["optim.min_lr=-1e-6"], "optim.min_lr: must be in [0, 1]"),
    ("", ["optim.eps=0"], "optim.eps: must be positive"),
    ("", ["optim.clip_grad=-3"], "optim.clip_grad: must be >= 0"),
    ("optim: {weight_decay_end: -0.2}\n", [], "optim.weight_decay_end: must be >= 0"),
    ("", ["optim.warmup_epochs=-1"], "optim.warmup_epochs: must be >= 0"),
])
def test_impossible_values_name_file_and_key(tmp_path, text, overrides, needle):
    path = _write(tmp_path, text + "name: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(err.value).startswith(f"{path}: ") and needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_config_file_fails_instead_of_training_on_defaults(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"is empty"):
        load_config(path)


def test_duplicate_key_fails_naming_key_and_lines(tmp_path):
    path = _write(tmp_path, "optim:\n  base_lr: 1.0e-3\n  min_lr: 1.0e-6\n  base_lr: 5.0e-3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: line 4: duplicate key 'base_lr' (first on line 2)"
    path = _write(tmp_path, "model: {depth: 2}\nmodel: {depth: 3}\n")
    with pytest.raises(ConfigError, match=r"line 2: duplicate key 'model' \(first on line 1\)"):
        load_config(path)


def test_broken_yaml_is_one_line(tmp_path):
    path = _write(tmp_path, "model:\n  depth: [2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: not valid YAML") and "\n" not in str(err.value)


def test_warmups_longer_than_the_training_warn(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("virchow_fast"), "propagate", True)  # the CLI's own handler may be set
    path = _write(tmp_path, "train: {epochs: 2}\noptim: {warmup_epochs: 3}\nloss: {warmup_teacher_temp_epochs: 1}\n")
    with caplog.at_level("WARNING", logger="virchow_fast"):
        load_config(path)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "optim.warmup_epochs=3" in said[0] and "train.epochs=2" in said[0], said
    caplog.clear()
    with caplog.at_level("WARNING", logger="virchow_fast"):
        load_config(path, ["optim.warmup_epochs=2"])
    assert not caplog.records


def test_choices_are_literals_and_yaml_bare_on_off_reads_as_the_word():
    """YAML 1.1 reads a bare on/off as a bool: for a choice field that offers the word it is the word."""
    cfg = load_config("debug", ["parallel.activation_checkpointing=off", "parallel.fsdp=on", "optim.fused=off"])
    assert (cfg.parallel.activation_checkpointing, cfg.parallel.fsdp, cfg.optim.fused) == ("off", "on", "off")
    with pytest.raises(ConfigError, match=r"parallel.activation_checkpointing: True is not one of off, selective"):
        load_config("debug", ["parallel.activation_checkpointing=on"])
    with pytest.raises(ConfigError, match=r"data.source: 'disk' is not one of synthetic, slides, shards, demo"):
        load_config("debug", ["data.source=disk"])
