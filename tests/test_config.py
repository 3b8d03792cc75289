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
    ("train.mixed_negatives=-1", "config key 'train.mixed_negatives' must be >= 0"),
    ("train.mixed_sampler=zipf", "config key 'train.mixed_sampler' must be one of uniform, popularity; got 'zipf'"),
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


@pytest.mark.parametrize("text, value", [("true", True), ("TRUE", True), ("True", True), ("1", True),
                                         ("false", False), ("False", False), (" 0 ", False)])
def test_bools_read_true_false_one_and_zero(text, value):
  assert load_config(None, [f"model.use_item_features={text}"]).model.use_item_features is value


@pytest.mark.parametrize("text", ["yes", "no", "on", "off", "y", "2", "", "flase"])
def test_other_bool_words_are_refused_naming_the_key_and_the_accepted_values(text):
  with pytest.raises(ConfigError) as e:
    load_config(None, [f"model.use_text={text}"])
  assert str(e.value) == f"config key 'model.use_text' expects bool (true, false, 1 or 0), got {text!r}"


@pytest.mark.parametrize("overrides", ["train.steps=5", b"train.steps=5"])
def test_overrides_given_as_one_string_are_refused(overrides):
  with pytest.raises(ConfigError) as e:
    load_config(CONFIGS / "tiny.py", overrides)
  assert str(e.value) == ("overrides must be a list of 'key=value' strings, e.g. ['train.steps=5']; "
                          "got the string 'train.steps=5'")


def test_describe_lists_every_key_in_order_with_type_value_default_and_comment():
  from jaxrec.config import all_keys, describe
  cfg = load_config(CONFIGS / "tiny.py", ["train.steps=5", "model.mlp_dims=8,4", "mesh.rules=()"])
  rows = {row.key: row for row in describe(cfg)}
  assert [row.key for row in describe(cfg)] == all_keys(cfg)
  steps = rows["train.steps"]
  assert (steps.type, steps.value, steps.default) == ("int", "5", "600")
  assert (rows["model.mlp_dims"].type, rows["model.mlp_dims"].value, rows["model.mlp_dims"].default) == (
      "tuple[int, ...]", "8,4", "256")
  assert (rows["model.use_text"].value, rows["model.use_text"].default) == ("false", "true")
  assert rows["data.path"].value == '""' and rows["mesh.rules"].value == "()"
  assert rows["data.synthetic.num_users"].value == "120"
  assert rows["data.split"].comment == "random | loo | temporal | predefined"
  assert rows["train.seed"].comment == ""
  # The comment after a field and its wrapped continuation lines...
  assert rows["data.history_len"].comment.endswith("0 = none (user id and features only, the TFRS tutorial's "
                                                   "query tower)")
  assert rows["model.use_item_features"].comment.endswith("false gives the classic pure-id model, which cannot tell "
                                                          "cold items apart")
  assert rows["checkpoint.best_metric"].comment.endswith("(evaluated every train.eval_every steps) in checkpoints/best")
  # ...and the block above a field, even where it follows another field's comment.
  assert rows["data.history"].comment.startswith("Which L items: recent")
  assert rows["encoder.lr_multiplier"].comment == "full mode: encoder lr = train.learning_rate * this"
  assert rows["encoder.shape_buckets"].comment.startswith("lora/full: the live encoder runs on each batch's distinct")
  assert rows["model.cold_item_rows"].comment.startswith("Id rows of items with no training interaction")


def test_field_comments_follow_the_layout_of_the_source(tmp_path, monkeypatch):
  from jaxrec.config import field_comments
  long_line = "x" * 60
  (tmp_path / "commented.py").write_text(
      "import dataclasses\n\n\n"
      "@dataclasses.dataclass\n"
      "class Commented:\n"
      "  plain: int = 0\n"
      "  # Above a, first line\n"
      "  # and second.\n"
      "  a: int = 1  # after a\n"
      f"  b: int = 2  # after b, a long comment that was wrapped {long_line}\n"
      "  # continued here\n"
      "  # Then the block above c.\n"
      "  c: int = 3\n"
      "  d: int = 4  # short, so the next line is not its\n"
      "  # lower-case block above e\n"
      "  e: int = 5\n"
      "  # separated from f by a blank line\n"
      "\n"
      "  f: str = '#not a comment'\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  from commented import Commented
  assert field_comments(Commented) == {
      "a": "Above a, first line and second. after a",
      "b": f"after b, a long comment that was wrapped {long_line} continued here",
      "c": "Then the block above c.",
      "d": "short, so the next line is not its",
      "e": "lower-case block above e",
  }


def test_the_config_table_is_aligned_and_marks_changed_values():
  from jaxrec.config import describe, format_description
  lines = format_description(describe(load_config(None, ["train.steps=5"])), width=160).splitlines()
  header = lines[0]
  assert header.split() == ["key", "type", "value", "default", "comment"]
  starts = [header.index(column) for column in ("type", "value", "default", "comment")]
  rows = [line for line in lines[1:] if line[2:3].strip()]
  assert len(rows) == len(describe(Config()))
  for line in rows:
    assert all(line[start - 2:start] == "  " and line[start] != " " for start in starts[:3]), line
  steps = next(line for line in rows if line[2:].startswith("train.steps "))
  assert steps.startswith("* ") and steps[starts[1]:].split()[:2] == ["5", "600"]
  assert all(line.startswith("  ") for line in rows if not line[2:].startswith("train.steps "))
  # Long comments wrap to the width, their further lines under the comment column.
  continued = [line for line in lines[1:] if not line[2:3].strip()]
  assert continued and all(line[:starts[3]].strip() == "" and line[starts[3]] != " " for line in continued)
  assert max(map(len, lines)) <= 160


def test_config_paths_resolve_from_the_shipped_configs_in_any_directory(tmp_path, monkeypatch):
  from jaxrec.config import call_python_file, configs_dir
  monkeypatch.chdir(tmp_path)
  assert configs_dir() == str(CONFIGS)
  tiny = load_config(CONFIGS / "tiny.py")
  assert load_config("configs/tiny.py") == tiny and load_config("tiny.py") == tiny
  assert load_config("configs/study/../ml100k_id.py").encoder.mode == "none"
  assert call_python_file("configs/study/tiny.py", "get_study", "study").name == "tiny"
  with pytest.raises(ConfigError, match=rf"config file not found: configs/nope.py \(nor among the shipped configs in "
                                        rf"{CONFIGS}\)"):
    load_config("configs/nope.py")
  # A file that exists where the path points wins over the shipped one.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tiny.py").write_text("from jaxrec.config import Config\n\n"
                                                "def get_config():\n  return Config(workdir='mine')\n")
  assert load_config("configs/tiny.py").workdir == "mine"


def test_configs_dir_is_the_packaged_folder_where_there_is_one(tmp_path, monkeypatch):
  from jaxrec import config
  package = tmp_path / "site-packages" / "jaxrec"
  (package / "configs").mkdir(parents=True)
  monkeypatch.setattr(config, "_PACKAGE_DIR", str(package))
  assert config.configs_dir() == str(package / "configs")
  (package / "configs").rmdir()
  assert config.configs_dir() == str(tmp_path / "site-packages" / "configs")


@pytest.mark.parametrize("name, folder", [("ml100k_text", "ml-100k"), ("ml100k_id", "ml-100k"), ("ml1m_text", "ml-1m"),
                                          ("ml1m_id", "ml-1m"),
                                          ("amazon_instruments_text", "amazon-musical-instruments-5core"),
                                          ("amazon_instruments_id", "amazon-musical-instruments-5core")])
def test_real_data_configs_read_JAXREC_DATA_else_the_shared_folder(name, folder, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXREC_DATA", str(tmp_path))
  assert load_config(CONFIGS / f"{name}.py").data.path == str(tmp_path / folder)
  monkeypatch.delenv("JAXREC_DATA")
  assert load_config(CONFIGS / f"{name}.py").data.path == str(CONFIGS.parent.parent / "shared" / "data" / folder)


def test_mixed_negatives_need_the_in_batch_softmax():
  cfg = load_config(None, ["train.mixed_negatives=64", "train.mixed_sampler=popularity"])
  assert (cfg.train.mixed_negatives, cfg.train.mixed_sampler) == (64, "popularity")
  assert (Config().train.mixed_negatives, Config().train.mixed_sampler) == (0, "uniform")
  with pytest.raises(ConfigError, match="config key 'train.mixed_negatives'=64 needs train.negatives=in_batch: "
                                        "the catalog softmax already scores every item"):
    load_config(None, ["train.negatives=catalog", "train.mixed_negatives=64"])
