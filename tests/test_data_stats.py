"""`jaxrec data-stats`: numbers for the ML-100K-format fixture (and the real ML-100K with
JAXREC_DATA) and a PNG that decodes."""

import json
import struct
import zlib

import numpy as np

from fixtures.data_roots import fixture_path, full_data_path
from jaxrec.data import plot, stats


def _decode_png(data: bytes) -> np.ndarray:
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  pos, chunks = 8, {}
  while pos < len(data):
    (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
    body = data[pos + 8:pos + 8 + length]
    assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
    chunks[kind] = chunks.get(kind, b"") + body
    pos += 12 + length
  width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
  rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + width * 3)
  assert (rows[:, 0] == 0).all()
  return rows[:, 1:].reshape(height, width, 3)


def test_png_round_trip():
  image = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
  np.testing.assert_array_equal(_decode_png(plot.png_bytes(image)), image)


def _run(tmp_path, path: str) -> tuple[dict, np.ndarray]:
  code = stats.main(["--workdir", str(tmp_path), "data.source=ml100k", f"data.path={path}", "data.cold_item_fraction=0.1"])
  assert code == 0
  out = tmp_path / "data_stats"
  assert sorted(p.name for p in out.iterdir()) == ["item_popularity.png", "stats.json"]  # no temporary files left
  image = _decode_png((out / "item_popularity.png").read_bytes())
  assert image.shape == (420, 800, 3)
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
  assert (image == plot.COLD).all(axis=-1).sum() > 1_000 and (image == plot.WARM).all(axis=-1).sum() > 10_000
  assert "data/interactions" in capsys.readouterr().out


def test_data_stats_on_full_ml100k(tmp_path):
  result, image = _run(tmp_path, full_data_path("ml-100k"))
  assert result["data/interactions"] == 100_000 and result["data/users"] == 943 and result["data/items"] == 1_682
  assert result["stats/interactions_per_user/p0"] == 20 and result["stats/interactions_per_user/p100"] == 737
  assert result["stats/interactions_per_item/p50"] == 27 and result["stats/interactions_per_item/p100"] == 583
  assert result["stats/cold_items"] == 168 and result["stats/warm_items"] + result["data/items_without_train"] == 1_682
  assert (image == plot.COLD).all(axis=-1).sum() > 100 and (image == plot.WARM).all(axis=-1).sum() > 10_000
