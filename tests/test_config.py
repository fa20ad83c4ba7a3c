"""Config: typed, validated before anything runs, errors that name the problem and the fix."""
import pytest

from keel.training.config import Config, ConfigError, dump_config, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.01\n  weight_decay: 0.2\n")
    cfg = load_config(path, ["optim.lr=0.5"])
    assert cfg.optim.lr == 0.5            # CLI beats file
    assert cfg.optim.weight_decay == 0.2  # file beats default
    assert cfg.optim.grad_clip == Config().optim.grad_clip
    assert cfg.train.name == "c"          # run name defaults to the file's stem


def test_unknown_key_in_file_names_the_nearest_valid_key(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'; did you mean 'optim\.lr'\?"):
        load_config(path)
    path = write(tmp_path, "optim:\n  zzz: 0.01\n")
    with pytest.raises(ConfigError, match=r"'optim\.zzz'; valid keys under optim: name, lr, weight_decay"):
        load_config(path)


def test_names_from_other_frameworks_point_to_ours(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim\.learning_rate'; did you mean 'optim\.lr'\?"):
        load_config(None, ["optim.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"'model\.num_layers'; did you mean 'model\.n_layers'\?"):
        load_config(write(tmp_path, "model:\n  num_layers: 4\n"))


def test_unknown_section_and_override_name_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'optim'"):
        load_config(write(tmp_path, "optimm:\n  lr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"did you mean 'model\.n_heads'"):
        load_config(None, ["model.n_head=4"])


def test_wrong_type_names_field_value_and_expected_type():
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'many' \(str\)"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"model\.tie_embeddings: expected bool, got 3"):
        load_config(None, ["model.tie_embeddings=3"])


def test_choice_fields_suggest_the_nearest_choice():
    with pytest.raises(ConfigError, match=r"schedule\.name: 'cosin' is not one of .*did you mean 'cosine'"):
        load_config(None, ["schedule.name=cosin"])


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 3e-4 as a string; users write it that way all the time.
    cfg = load_config(write(tmp_path, "optim:\n  lr: 3e-4\n"), ["optim.eps=1e-6"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.eps == pytest.approx(1e-6)


def test_value_ranges_are_checked():
    with pytest.raises(ConfigError, match=r"optim\.lr must be positive, got -0\.1"):
        load_config(None, ["optim.lr=-0.1"])
    with pytest.raises(ConfigError, match=r"global_batch_size=10 is not a multiple of train\.micro_batch_size=4"):
        load_config(None, ["train.global_batch_size=10", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"n_kv_heads=3 must divide model\.n_heads=8"):
        load_config(None, ["model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match=r"data\.seq_len=512 exceeds model\.max_seq_len=256"):
        load_config(None, ["data.seq_len=512"])


def test_override_syntax_and_missing_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"--set expects key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"optim\.lr is a value, not a section"):
        load_config(None, ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml' not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["model.n_kv_heads=2", "optim.betas=[0.8, 0.9]"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert again.optim.betas == (0.8, 0.9)


@pytest.mark.parametrize("preset", ["configs/tiny.yaml", "configs/llama-1b.yaml"])
def test_shipped_presets_are_valid(preset):
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / preset)
    assert cfg.model.dim % cfg.model.n_heads == 0
