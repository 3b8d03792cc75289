"""`jaxrec data-stats`: numbers for the ML-100K-format fixture (and the real ML-100K with
JAXREC_DATA) and a labelled log-log item-popularity chart."""

import io
import json

import numpy as np
from matplotlib.colors import to_rgb
from PIL import Image

from fixtures.data_roots import fixture_path, full_data_path
from jaxrec.data import stats
from jaxrec.report import plots


def _decode_png(data: bytes) -> np.ndarray:
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _pixels(image: np.ndarray, color: str) -> int:
  return int((image == np.round(np.array(to_rgb(color)) * 255)).all(axis=-1).sum())


def test_item_popularity_is_counts_against_rank_on_log_log_axes():
  counts = np.array([5, 0, 100, 1, 20])
  cold = np.array([False, False, False, True, True])
  fig = plots.item_popularity(counts, cold)
  (ax,) = fig.axes
  assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
  assert ax.get_xlabel().startswith("item popularity rank") and ax.get_ylabel() == "interactions per item"
  assert "126 interactions over 5 items" in ax.get_title()
  assert ax.get_title().endswith("items without interactions (not on the log axes): 1")
  (line,) = ax.get_lines()  # the zero-count item has no place on a log axis
  assert list(line.get_xdata()) == [1, 2, 3, 4] and list(line.get_ydata()) == [100, 20, 5, 1]
  (marks,) = ax.collections
  assert marks.get_offsets().tolist() == [[2, 20], [4, 1]]  # the cold items, where they rank
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["all items (5)", "cold items (2, held out of training)"]


def _run(tmp_path, path: str) -> tuple[dict, np.ndarray]:
  code = stats.main(["--workdir", str(tmp_path), "data.source=ml100k", f"data.path={path}", "data.cold_item_fraction=0.1"])
  assert code == 0
  out = tmp_path / "data_stats"
  assert sorted(p.name for p in out.iterdir()) == ["item_popularity.png", "stats.json"]  # no temporary files left
  image = _decode_png((out / "item_popularity.png").read_bytes())
  assert image.shape == (480, 800, 3)
  return json.loads((out / "stats.json").read_text()), image


def test_data_stats_on_ml100k_fixture(tmp_path, capsys):
  result, image = _run(tmp_path, fixture_path("ml-100k"))
  assert result["data/interactions"] == 577 and result["data/users"] == 30 and result["data/items"] == 60
  assert result["stats/interactions_per_user/p0"] == 8 and result["stats/interactions_per_user/p100"] == 29
  assert result["stats/interactions_per_item/p50"] == 9 and result["stats/interactions_per_item/p100"] == 29
  # Items 59 and 60 are never rated: two items without interactions, and with the 6 cold items
  # they are the 8 without training rows.
  assert result["stats/items_without_interactions"] == 2 and result["data/items_without_train"] == 8
  assert result["stats/cold_items"] == 6 and result["stats/warm_items"] == 52
  assert (result["data/train"], result["data/valid"], result["data/test"]) == (425, 40, 112)
  assert _pixels(image, plots.COLD_COLOR) > 50 and _pixels(image, plots.WARM_COLOR) > 500  # the cold marks, the curve
  assert "data/interactions" in capsys.readouterr().out


def test_data_stats_on_full_ml100k(tmp_path):
  result, image = _run(tmp_path, full_data_path("ml-100k"))
  assert result["data/interactions"] == 100_000 and result["data/users"] == 943 and result["data/items"] == 1_682
  assert result["stats/interactions_per_user/p0"] == 20 and result["stats/interactions_per_user/p100"] == 737
  assert result["stats/interactions_per_item/p50"] == 27 and result["stats/interactions_per_item/p100"] == 583
  assert result["stats/cold_items"] == 168 and result["stats/warm_items"] + result["data/items_without_train"] == 1_682
  assert _pixels(image, plots.COLD_COLOR) > 1_000 and _pixels(image, plots.WARM_COLOR) > 300
