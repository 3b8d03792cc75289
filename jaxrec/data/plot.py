"""The item-popularity chart as a PNG, drawn with numpy and written with zlib.

matplotlib is not a dependency of jaxrec and one chart does not justify it; a PNG is a zlib
stream of filtered scanlines behind three CRC-checked chunks, which takes a dozen lines.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

import numpy as np

WARM = (49, 104, 176)
COLD = (230, 120, 30)
INK = (40, 40, 40)
GRID = (222, 222, 222)

# 3x5 glyphs (capitals, digits, the punctuation labels use), five rows of three cells, "#" = ink.
GLYPHS = {
    "0": ("###", "# #", "# #", "# #", "###"), "1": (" # ", "## ", " # ", " # ", "###"),
    "2": ("###", "  #", "###", "#  ", "###"), "3": ("###", "  #", "###", "  #", "###"),
    "4": ("# #", "# #", "###", "  #", "  #"), "5": ("###", "#  ", "###", "  #", "###"),
    "6": ("###", "#  ", "###", "# #", "###"), "7": ("###", "  #", "  #", "  #", "  #"),
    "8": ("###", "# #", "###", "# #", "###"), "9": ("###", "# #", "###", "  #", "###"),
    "A": ("###", "# #", "###", "# #", "# #"), "B": ("## ", "# #", "## ", "# #", "## "),
    "C": ("###", "#  ", "#  ", "#  ", "###"), "D": ("## ", "# #", "# #", "# #", "## "),
    "E": ("###", "#  ", "## ", "#  ", "###"), "F": ("###", "#  ", "## ", "#  ", "#  "),
    "G": ("###", "#  ", "# #", "# #", "###"), "H": ("# #", "# #", "###", "# #", "# #"),
    "I": ("###", " # ", " # ", " # ", "###"), "J": ("  #", "  #", "  #", "# #", "###"),
    "K": ("# #", "# #", "## ", "# #", "# #"), "L": ("#  ", "#  ", "#  ", "#  ", "###"),
    "M": ("# #", "###", "###", "# #", "# #"), "N": ("## ", "# #", "# #", "# #", "# #"),
    "O": ("###", "# #", "# #", "# #", "###"), "P": ("###", "# #", "###", "#  ", "#  "),
    "Q": ("###", "# #", "# #", "###", "  #"), "R": ("## ", "# #", "## ", "# #", "# #"),
    "S": ("###", "#  ", "###", "  #", "###"), "T": ("###", " # ", " # ", " # ", " # "),
    "U": ("# #", "# #", "# #", "# #", "###"), "V": ("# #", "# #", "# #", "# #", " # "),
    "W": ("# #", "# #", "###", "###", "# #"), "X": ("# #", "# #", " # ", "# #", "# #"),
    "Y": ("# #", "# #", " # ", " # ", " # "), "Z": ("###", "  #", " # ", "#  ", "###"),
    "(": (" # ", "#  ", "#  ", "#  ", " # "), ")": (" # ", "  #", "  #", "  #", " # "),
    ":": ("   ", " # ", "   ", " # ", "   "), ",": ("   ", "   ", "   ", " # ", "#  "),
    "-": ("   ", "   ", "###", "   ", "   "), ".": ("   ", "   ", "   ", "   ", " # "),
    "@": ("###", "# #", "###", "#  ", "###"), "/": ("  #", "  #", " # ", "#  ", "#  "),
    "%": ("# #", "  #", " # ", "#  ", "# #"), "+": ("   ", " # ", "###", " # ", "   "),
    "=": ("   ", "###", "   ", "###", "   "), "_": ("   ", "   ", "   ", "   ", "###"),
}


def _glyph(ch: str) -> np.ndarray:
  rows = GLYPHS.get(ch.upper(), ("   ",) * 5)
  return np.array([[c == "#" for c in row] for row in rows])


def _text(img: np.ndarray, x: int, y: int, text: str, color=INK, scale: int = 2) -> None:
  for i, ch in enumerate(text):
    g = np.kron(_glyph(ch), np.ones((scale, scale), bool))
    x0 = x + i * 4 * scale
    h, w = g.shape
    if 0 <= y and y + h <= img.shape[0] and 0 <= x0 and x0 + w <= img.shape[1]:
      img[y:y + h, x0:x0 + w][g] = color


def _short(n: int) -> str:
  return f"{n // 1000}K" if n >= 1000 and n % 1000 == 0 else str(n)


def popularity_image(counts: np.ndarray, cold: np.ndarray, width: int = 800, height: int = 420) -> np.ndarray:
  """uint8 RGB [height, width, 3]: interactions per item (log scale) against popularity rank;
  a column is orange in proportion to the cold items among the ranks it covers."""
  img = np.full((height, width, 3), 255, np.uint8)
  left, right, top, bottom = 70, 20, 40, 50
  pw, ph = width - left - right, height - top - bottom
  order = np.argsort(-counts, kind="stable")
  counts, cold = counts[order].astype(np.float64), cold[order]
  top_value = max(1.0, counts.max(initial=1.0))
  decades = int(np.ceil(np.log10(top_value + 1))) or 1

  def y_of(value):
    return top + ph - np.round(np.log10(np.asarray(value, np.float64) + 1) / decades * ph).astype(int)

  for d in range(decades + 1):
    y = int(y_of(10 ** d - 1))
    img[y, left:left + pw] = GRID
    _text(img, 8, max(0, y - 5), _short(10 ** d - 1 if d == 0 else 10 ** d), scale=2)
  n = len(counts)
  if n:
    cols = np.minimum((np.arange(n) * pw) // n, pw - 1)
    height_px = np.zeros(pw)
    cold_share = np.zeros(pw)
    np.maximum.at(height_px, cols, counts)
    np.add.at(cold_share, cols, cold.astype(np.float64))
    per_col = np.bincount(cols, minlength=pw)
    covered = per_col > 0
    cold_share[covered] /= per_col[covered]
    # Columns a small catalog leaves empty repeat the item to their left.
    filled = np.maximum.accumulate(np.where(covered, np.arange(pw), 0))
    height_px, cold_share = height_px[filled], cold_share[filled]
    for x in range(pw):
      y = int(y_of(height_px[x]))
      color = np.round(np.array(WARM) * (1 - cold_share[x]) + np.array(COLD) * cold_share[x]).astype(np.uint8)
      img[y:top + ph, left + x] = color
  img[top:top + ph + 1, left] = INK
  img[top + ph, left:left + pw] = INK
  for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
    x = left + int(frac * (pw - 1))
    img[top + ph:top + ph + 5, x] = INK
    label = str(int(round(frac * n)))
    _text(img, max(0, x - 4 * len(label)), top + ph + 10, label)
  _text(img, left, 10, f"INTERACTIONS PER ITEM (LOG) BY RANK, {n} ITEMS")
  _text(img, left + pw - 150, top + ph + 30, "ORANGE: COLD", color=COLD)
  return img


def png_bytes(rgb: np.ndarray) -> bytes:
  """Encodes uint8 RGB [H, W, 3] as a PNG (8-bit truecolour, no filtering)."""
  height, width, _ = rgb.shape
  raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1).tobytes()

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_atomic(path: str, data: bytes) -> None:
  """Writes via a temporary file in the same directory, so a crash never leaves half a file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
