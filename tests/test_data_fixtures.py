"""The committed data fixtures are exactly what tests/fixtures/make_fixtures.py writes, so a
hand edit (or a generator change without regenerating) shows up here, not as a puzzling
count mismatch in a loader test."""

from fixtures import make_fixtures
from fixtures.data_roots import FIXTURES

FOLDERS = ("ml-100k", "ml-1m", "ml-1m-ratings", "amazon-5core", "amazon-5core-gz", "peer-split")


def test_fixtures_regenerate_byte_for_byte(tmp_path):
  make_fixtures.main(tmp_path)
  written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
  committed = sorted(p.relative_to(FIXTURES) for folder in FOLDERS for p in (FIXTURES / folder).rglob("*") if p.is_file())
  assert written == committed
  changed = [str(p) for p in written if (tmp_path / p).read_bytes() != (FIXTURES / p).read_bytes()]
  assert changed == [], f"{', '.join(changed)} differ from what tests/fixtures/make_fixtures.py writes; rerun it"


def test_fixtures_stay_small():
  total = sum(p.stat().st_size for folder in FOLDERS for p in (FIXTURES / folder).rglob("*") if p.is_file())
  assert total < 300_000, f"data fixtures take {total:,} bytes; keep them under 300 KB"
