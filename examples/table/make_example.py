"""Writes the small example dataset of ``configs/table_example.py`` (CSV files with a header):
``interactions.csv`` (user, item, timestamp, device), ``items.csv`` (item, title with commas in
quotes, genres joined by ``|``, year) and ``users.csv`` (user, segment).

The world: each user segment likes two genres and one era, so a model reading the user's segment,
the items' genres and the year beats popularity. Deterministic (seed 0); run from the repository
root: ``python examples/table/make_example.py``.
"""

import csv
import os

import numpy as np

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")
SEGMENTS = ("students", "parents", "retirees")


def main(out: str = os.path.dirname(os.path.abspath(__file__)), num_users: int = 60, num_items: int = 48) -> None:
  rng = np.random.default_rng(0)
  item_genres = [sorted(rng.choice(len(GENRES), size=rng.integers(1, 3), replace=False).tolist())
                 for _ in range(num_items)]
  item_year = rng.integers(1960, 2021, num_items)
  # Segment s likes genres 2s and 2s+1, and films of its era (older for older segments).
  user_segment = rng.integers(0, len(SEGMENTS), num_users)
  era = {0: 2005.0, 1: 1990.0, 2: 1970.0}
  with open(os.path.join(out, "items.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["item", "title", "genres", "year"])
    for i in range(num_items):
      # Titles with commas (quoted by the writer); one item without a year (imputed and flagged).
      title = f"Film {i}, part {i % 3 + 1}" if i % 4 else f'The "{GENRES[item_genres[i][0]]}" film, no. {i}'
      year = "" if i == 7 else str(item_year[i])
      w.writerow([f"m{i}", title, "|".join(GENRES[g] for g in item_genres[i]), year])
  with open(os.path.join(out, "users.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["user", "segment"])
    for u in range(num_users):
      w.writerow([f"u{u}", SEGMENTS[user_segment[u]]])
  rows = []
  for u in range(num_users):
    s = user_segment[u]
    liked = np.array([len({2 * s, 2 * s + 1} & set(g)) for g in item_genres], float)
    affinity = 3.0 * liked - np.abs(item_year - era[s]) / 10.0
    p = np.exp(affinity - affinity.max())
    p /= p.sum()
    count = int(rng.integers(6, 11))
    for t, i in enumerate(rng.choice(num_items, size=count, replace=False, p=p)):
      rows.append((f"u{u}", f"m{i}", 1_600_000_000 + 3600 * (u * 20 + t), ("phone", "tv", "laptop")[(u + t) % 3]))
  with open(os.path.join(out, "interactions.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["user", "item", "timestamp", "device"])
    w.writerows(rows)


if __name__ == "__main__":
  main()
