"""Reading dataset files fast, and failing with the file, line number and expectation.

The fast path hands a whole file to numpy's C parser. Only when that fails do we walk the lines
in Python, so the error names the first bad line exactly (numpy's row numbers skip blank lines
and say nothing about what the format should have been).

Every loader reads its text files through ``read_bytes``, which drops a UTF-8 byte-order mark
(Windows editors and Excel's "UTF-8 CSV" add one), whatever encoding the bytes are decoded with
later; every line splitter accepts CRLF as well as LF endings.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np


class DataError(ValueError):
  """A dataset file is missing or malformed; the message names the file, the line and what was expected."""

  def __init__(self, path: str | os.PathLike, line: int | None, expected: str, got: str | None = None):
    self.path, self.line, self.expected, self.got = os.fspath(path), line, expected, got
    where = self.path if line is None else f"{self.path}, line {line}"
    message = f"{where}: expected {expected}"
    if got is not None:
      message += f"; got {got}"
    super().__init__(message)


def require_file(path: str | os.PathLike, what: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(path, None, what, got="no such file")
  return path


UTF8_BOM = b"\xef\xbb\xbf"


def strip_bom(data: bytes) -> bytes:
  """Without a leading UTF-8 BOM, which would otherwise glue itself to the first id or header name."""
  return data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data


def read_bytes(path: str | os.PathLike, what: str) -> bytes:
  with open(require_file(path, what), "rb") as f:
    return strip_bom(f.read())


def _line_of(data: bytes, offset: int) -> int:
  return data.count(b"\n", 0, offset) + 1


def _show(line: bytes | str) -> str:
  text = line.decode("latin-1") if isinstance(line, bytes) else line
  text = text.rstrip("\r\n")
  return repr(text if len(text) <= 120 else text[:117] + "...")


def decode(data: bytes, path: str | os.PathLike, encodings: Sequence[str]) -> str:
  """Decodes with the first encoding that fits; the error names the line of the first bad byte.

  MovieLens ships latin-1, but re-encoded UTF-8 copies circulate; trying strict UTF-8 first reads
  both correctly, because latin-1 accents (a lone 0xE9 before ASCII) are never valid UTF-8.
  """
  first_error = None
  for encoding in encodings:
    try:
      return data.decode(encoding)
    except UnicodeDecodeError as e:
      first_error = first_error or e
  e = first_error
  line = _line_of(data, e.start)
  end = data.find(b"\n", e.start)
  bad = data[data.rfind(b"\n", 0, e.start) + 1:end if end >= 0 else len(data)]
  raise DataError(path, line, f"text in {' or '.join(encodings)}",
                  got=f"byte 0x{data[e.start]:02x} that is not valid {e.encoding}: {_show(bad)}")


def _is_number(token: bytes) -> bool:
  try:
    float(token)
    return True
  except ValueError:
    return False


def int_table(path: str | os.PathLike, columns: Sequence[str], sep: str, *,
              header: Sequence[str] | None = None, data: bytes | None = None) -> np.ndarray:
  """Parses a headerless-or-headed table of integers into int64 ``[rows, len(columns)]``.

  ``header``: if given, the first line may (not must) be exactly these names; any later copy of a
  header line is an error (concatenated files). Blank lines are ignored.
  """
  if data is None:
    data = read_bytes(path, f"a file of {len(columns)} {sep!r}-separated integer columns ({', '.join(columns)})")
  body, first_line = data, 1
  first = data.split(b"\n", 1)[0].rstrip(b"\r")
  names = tuple(t.strip() for t in first.decode("latin-1").split(sep))
  if header is not None and names == tuple(header):
    body, first_line = (data.split(b"\n", 1) + [b""])[1], 2
  # numpy's tokenizer only takes one-character delimiters; "::" has no single-colon neighbours
  # in valid rows, so collapsing it keeps the column count (a stray ":" still fails to parse).
  delimiter, table = sep, None
  if len(sep) > 1:
    # A tab where "::" belongs would otherwise pass as a separator after the collapse.
    if b"\t" in body:
      _raise_first_bad_line(path, data, columns, sep, header, first_line)
    body, delimiter = body.replace(sep.encode(), b"\t"), "\t"
  if not body.strip():
    raise DataError(path, None, f"{len(columns)} {sep!r}-separated integers ({', '.join(columns)})",
                    got="no data lines" + (" after the header" if first_line == 2 else " (an empty file)"))
  try:
    table = np.loadtxt(io.BytesIO(body), dtype=np.int64, delimiter=delimiter, comments=None, ndmin=2,
                       encoding="latin-1")
  except ValueError:
    pass
  if table is not None and (table.size == 0 or table.shape[1] == len(columns)):
    return table.reshape(-1, len(columns))
  _raise_first_bad_line(path, data, columns, sep, header, first_line)


def _raise_first_bad_line(path, data: bytes, columns: Sequence[str], sep: str, header, first_line: int):
  expected = f"{len(columns)} {sep!r}-separated integers ({', '.join(columns)})"
  header_bytes = sep.encode().join(h.encode() for h in header) if header is not None else None
  for number, raw in enumerate(data.split(b"\n"), start=1):
    if number < first_line:
      continue
    line = raw.rstrip(b"\r")
    if not line.strip():
      continue
    if header_bytes is not None and line == header_bytes:
      raise DataError(path, number, expected, got=f"a duplicate header line {_show(line)}")
    fields = line.split(sep.encode())
    if len(fields) != len(columns):
      raise DataError(path, number, expected, got=f"{len(fields)} field(s) in {_show(line)}")
    for name, field in zip(columns, fields):
      try:
        if sep != "\t" and b"\t" in field:
          raise ValueError(field)
        int(field)
      except ValueError:
        kind = ("a stray tab in" if b"\t" in field and sep != "\t" else
                "a non-integer number" if _is_number(field) else "non-numeric text")
        if number == 1 and header_bytes is None and all(not _is_number(f) for f in fields):
          raise DataError(path, number, expected + " (this format has no header line)",
                          got=f"a header-like line {_show(line)}") from None
        raise DataError(path, number, expected, got=f"{kind} {field.decode('latin-1')!r} as {name} in {_show(line)}") from None
  # numpy refused the file but every line splits and parses here: report the file as a whole.
  raise DataError(path, None, expected, got="rows numpy could not read as integers")


def split_lines(text: str, path: str | os.PathLike, sep: str, num_fields: int, what: str,
                first_line: int = 1) -> list[tuple[int, list[str]]]:
  """Splits text lines into exactly ``num_fields`` fields; returns (line number, fields) pairs."""
  rows = []
  for number, line in enumerate(text.split("\n"), start=first_line):
    line = line.rstrip("\r")
    if not line.strip():
      continue
    fields = line.split(sep)
    if len(fields) != num_fields:
      raise DataError(path, number, f"{num_fields} {sep!r}-separated fields ({what})",
                      got=f"{len(fields)} field(s) in {_show(line)}")
    rows.append((number, fields))
  if not rows:
    raise DataError(path, None, f"{num_fields} {sep!r}-separated fields ({what})", got="no lines (an empty file)")
  return rows


def json_lines(text: str, path: str | os.PathLike, expected: str):
  """(line number, object) of each non-blank line of a JSON lines text; a line that is not a JSON
  object raises DataError naming it, with ``expected`` saying what the file should hold."""
  import json
  for number, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(path, number, expected, got=f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise DataError(path, number, expected, got=f"a JSON {type(record).__name__}")
    yield number, record


def parse_int(field: str, path: str | os.PathLike, line: int, name: str) -> int:
  try:
    return int(field)
  except ValueError:
    raise DataError(path, line, f"an integer {name}", got=repr(field)) from None
