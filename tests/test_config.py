import dataclasses

import pytest

from jaxrec.config import Config, ConfigError, from_dict, load_config, to_dict

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_typed_overrides():
  cfg = load_config(None, ["train.steps=7", "model.mlp_dims=512,256", "train.learning_rate=1",
                           "model.use_text=false", "encoder.mode=none", "data.synthetic.num_items=33",
                           "eval.ks=(5, 10)", "train.batch_size=1_024"])
  assert cfg.train.steps == 7
  assert cfg.model.mlp_dims == (512, 256)
  assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
  assert cfg.model.use_text is False
  assert cfg.data.synthetic.num_items == 33
  assert cfg.eval.ks == (5, 10)
  assert cfg.train.batch_size == 1024
  assert Config().train.steps != 7  # frozen defaults untouched


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "unknown config key 'train.stpes'; did you mean 'train.steps'?"),
    ("steps=3", "unknown config key 'steps'; did you mean 'train.steps'?"),
    ("data.synthetic.num_itemz=1", "did you mean 'data.synthetic.num_items'?"),
    ("train.steps=abc", "config key 'train.steps' expects int, got 'abc'"),
    ("model.use_text=maybe", "config key 'model.use_text' expects bool"),
    ("model.mlp_dims=1,x", "config key 'model.mlp_dims' expects tuple"),
    ("model=3", "config key 'model' is a group"),
    ("train.steps", "is not of the form key=value"),
    ("encoder.mode=partial", "config key 'encoder.mode' must be one of frozen, lora, full, none"),
    ("train.steps=0", "config key 'train.steps' must be positive"),
    ("data.history_len=-1", "config key 'data.history_len' must be >= 0"),
])
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(ConfigError) as e:
    load_config(None, [override])
  assert message in str(e.value)


def test_config_files(tmp_path):
  cfg = load_config(CONFIGS / "tiny.py", ["train.steps=3"])
  assert cfg.train.steps == 3 and cfg.model.use_text is False
  default = load_config(CONFIGS / "default.py")
  assert default == Config(workdir="runs/default", train=dataclasses.replace(Config().train, steps_per_call=10))
  bad = tmp_path / "bad.py"
  bad.write_text("x = 1\n")
  with pytest.raises(ConfigError, match="defines no get_config"):
    load_config(bad)
  with pytest.raises(ConfigError, match="config file not found"):
    load_config(tmp_path / "missing.py")
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config():\n  return 1/0\n")
  with pytest.raises(ConfigError, match="broken.py failed to run: ZeroDivisionError"):
    load_config(broken)


def test_round_trip_through_dict():
  cfg = load_config(None, ["model.mlp_dims=8,4", "eval.ks=1,2"])
  assert from_dict(to_dict(cfg)) == cfg
  data = to_dict(cfg)
  data["train"]["nope"] = 1
  with pytest.raises(ConfigError, match="unknown config key 'nope'"):
    from_dict(data)


def test_cross_field_validation():
  with pytest.raises(ConfigError, match="needs encoder.mode"):
    load_config(None, ["encoder.mode=none"])
  with pytest.raises(ConfigError, match="both false"):
    load_config(None, ["model.use_text=false", "model.use_item_ids=false", "encoder.mode=none"])
  assert dataclasses.is_dataclass(load_config(None, ["model.use_text=false", "encoder.mode=none"]))
