"""The embedded default data: a seeded recommendation world whose items are described in English.

Items are written from latent topics with ordinary words (a cooking item talks about soup and
ovens), so a pretrained text encoder can tell related items apart without any interaction data.
Users prefer a few topics, drift slowly between them over time, and favour popular items a little.
With ``topic_drift`` > 0 a user's topic also steps to its successor on a fixed ring of topics
(``successor``), so the next item's topic is predictable from the last items, not from the bag.
A fraction of items is marked cold: they exist in the catalog and users do interact with them,
but the split keeps every one of those interactions out of training.
"""

from __future__ import annotations

import numpy as np

from jaxrec.config import SyntheticConfig
from jaxrec.data.dataset import Dataset

# Each topic: (name, nouns, adjectives). Words are everyday English so that the text encoder's
# pretraining, not this file, is what makes "oven" close to "recipe".
_TOPICS = (
    ("cooking", ("recipe", "oven", "soup", "bread", "kitchen", "chef", "spices", "pasta", "dinner", "baking"),
     ("spicy", "homemade", "savory", "delicious", "crispy")),
    ("space", ("planet", "rocket", "astronaut", "galaxy", "telescope", "orbit", "moon", "star", "comet", "mission"),
     ("cosmic", "distant", "lunar", "interstellar", "orbital")),
    ("football", ("goal", "stadium", "striker", "league", "coach", "match", "referee", "team", "season", "penalty"),
     ("winning", "rival", "championship", "decisive", "fierce")),
    ("gardening", ("garden", "roses", "soil", "seeds", "vegetables", "flowers", "greenhouse", "compost", "tulips", "hedge"),
     ("blooming", "green", "organic", "fragrant", "seasonal")),
    ("ocean", ("sea", "whale", "coral", "sailor", "island", "waves", "dolphin", "reef", "harbor", "tide"),
     ("deep", "salty", "tropical", "stormy", "blue")),
    ("computers", ("software", "computer", "programmer", "algorithm", "network", "laptop", "database", "code", "server", "robot"),
     ("digital", "smart", "binary", "virtual", "automated")),
    ("medicine", ("doctor", "hospital", "nurse", "surgery", "patient", "vaccine", "disease", "clinic", "therapy", "medicine"),
     ("medical", "healing", "emergency", "clinical", "healthy")),
    ("finance", ("money", "bank", "investor", "stocks", "market", "profit", "tax", "economy", "loan", "budget"),
     ("wealthy", "financial", "risky", "global", "profitable")),
    ("horror", ("ghost", "monster", "vampire", "nightmare", "zombie", "curse", "graveyard", "witch", "demon", "haunting"),
     ("scary", "haunted", "dark", "terrifying", "creepy")),
    ("romance", ("love", "wedding", "kiss", "couple", "heart", "bride", "sweetheart", "date", "passion", "marriage"),
     ("romantic", "tender", "passionate", "loving", "sweet")),
    ("travel", ("journey", "passport", "hotel", "airport", "tourist", "map", "luggage", "beach", "vacation", "trip"),
     ("exotic", "faraway", "scenic", "adventurous", "relaxing")),
    ("animals", ("dog", "cat", "horse", "puppy", "kitten", "farm", "zoo", "lion", "rabbit", "bird"),
     ("furry", "wild", "playful", "loyal", "cute")),
    ("war", ("soldier", "battle", "army", "tank", "general", "war", "weapon", "invasion", "trench", "rifle"),
     ("military", "brutal", "heroic", "strategic", "armed")),
    ("music", ("guitar", "piano", "band", "concert", "singer", "song", "drums", "orchestra", "melody", "album"),
     ("musical", "loud", "acoustic", "rhythmic", "melodic")),
    ("weather", ("storm", "rain", "snow", "hurricane", "thunder", "tornado", "cloud", "flood", "blizzard", "lightning"),
     ("windy", "freezing", "rainy", "sunny", "icy")),
    ("art", ("painting", "museum", "artist", "sculpture", "canvas", "gallery", "portrait", "brush", "colors", "studio"),
     ("artistic", "colorful", "abstract", "creative", "classic")),
    ("crime", ("detective", "murder", "police", "thief", "robbery", "prison", "suspect", "gangster", "evidence", "heist"),
     ("criminal", "mysterious", "guilty", "undercover", "deadly")),
    ("school", ("teacher", "student", "classroom", "exam", "homework", "school", "library", "lesson", "professor", "campus"),
     ("educational", "academic", "studious", "clever", "young")),
    ("cars", ("car", "engine", "racing", "driver", "highway", "garage", "truck", "wheel", "speed", "motor"),
     ("fast", "powerful", "turbo", "roaring", "electric")),
    ("mountains", ("mountain", "climber", "summit", "glacier", "valley", "trail", "cliff", "peak", "avalanche", "cabin"),
     ("rocky", "alpine", "steep", "snowy", "remote")),
)

_FORMATS = ("book", "film", "podcast", "documentary", "series", "album", "game", "guide")
_TEMPLATES = (
    "A {adj} {fmt} about a {n1} and a {n2}, with {n3} and {n4}.",
    "This {fmt} follows a {adj} {n1} through {n2}, {n3} and a {adj2} {n4}.",
    "{Adj} stories of {n1}, {n2} and {n3}; a {fmt} for anyone who loves {n4}.",
    "In this {adj} {fmt}, a {n1} discovers {n2} and {n3} near the {n4}.",
)

AGE_BUCKETS = 6


def successor(topic, num_topics: int):
  """The topic a drifting user moves to next: the fixed ring ``t -> (t + 1) % num_topics``."""
  return (topic + 1) % num_topics


def item_topics(cfg: SyntheticConfig) -> np.ndarray:
  """Each item's main topic, int ``[num_items]``: the world's first draw, so the same as inside ``generate``.

  Not part of the Dataset (a model must not see it); tests and analyses use it as ground truth.
  """
  return np.random.default_rng(cfg.seed).integers(0, cfg.num_topics, size=cfg.num_items)


def generate(cfg: SyntheticConfig) -> tuple[Dataset, np.ndarray]:
  """Returns the dataset and the bool ``[num_items]`` mask of cold items (a pure function of cfg)."""
  if cfg.num_topics < 2 or cfg.num_topics > len(_TOPICS):
    raise ValueError(f"data.synthetic.num_topics must be in [2, {len(_TOPICS)}]; got {cfg.num_topics}")
  if cfg.num_items < cfg.num_topics or cfg.num_users < 1 or cfg.interactions_per_user < 4:
    raise ValueError("data.synthetic needs num_items >= num_topics, num_users >= 1, interactions_per_user >= 4")
  if not 0.0 <= cfg.topic_drift <= 1.0:
    raise ValueError(f"data.synthetic.topic_drift must be in [0, 1]; got {cfg.topic_drift}")
  rng = np.random.default_rng(cfg.seed)
  topics = _TOPICS[: cfg.num_topics]
  n_items, n_users, n_topics = cfg.num_items, cfg.num_users, cfg.num_topics

  # Items: a main topic (the first draw; ``item_topics`` repeats it), sometimes a secondary one
  # that colours the text.
  item_topic = rng.integers(0, n_topics, size=n_items)
  second_topic = np.where(rng.random(n_items) < 0.3, rng.integers(0, n_topics, size=n_items), item_topic)
  item_format = rng.integers(0, len(_FORMATS), size=n_items)
  titles, texts = [], []
  for i in range(n_items):
    _, nouns, adjs = topics[item_topic[i]]
    _, nouns2, adjs2 = topics[second_topic[i]]
    n = rng.choice(nouns, size=3, replace=False)
    adj, adj2 = rng.choice(adjs), rng.choice(adjs2)
    fmt = _FORMATS[item_format[i]]
    title = f"The {adj.capitalize()} {n[0].capitalize()}" if rng.random() < 0.5 else f"{n[0].capitalize()} of the {n[1].capitalize()}"
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    text = template.format(adj=adj, adj2=adj2, Adj=adj.capitalize(), fmt=fmt, n1=n[0], n2=n[1], n3=n[2], n4=rng.choice(nouns2))
    titles.append(f"{title} #{i}")
    texts.append(f"{title}. {text}")

  # Mild popularity skew inside each topic, so popularity alone is a weak recommender.
  popularity = rng.zipf(2.0, size=n_items).clip(max=20).astype(np.float64) ** 0.7

  # Users: an age bucket that tilts topic taste, and a concentrated topic preference.
  age = rng.integers(0, AGE_BUCKETS, size=n_users)
  age_tilt = rng.dirichlet(np.full(n_topics, 1.0), size=AGE_BUCKETS)
  prefs = rng.dirichlet(np.full(n_topics, 0.15), size=n_users) * 0.85 + age_tilt[age] * 0.15

  items_by_topic = [np.flatnonzero(item_topic == t) for t in range(n_topics)]
  weights_by_topic = [popularity[idx] / popularity[idx].sum() for idx in items_by_topic]

  users, items, stamps = [], [], []
  t0 = 1_600_000_000
  counts = np.maximum(4, rng.poisson(cfg.interactions_per_user, size=n_users))
  for u in range(n_users):
    seen = set()
    topic = rng.choice(n_topics, p=prefs[u])
    clock = t0 + int(rng.integers(0, 86_400 * 30))
    for step in range(counts[u]):
      # After each interaction (each step, kept or not) the topic steps along the ring with chance
      # topic_drift; no draw at all when it is 0, so the default world stays the one it always was.
      if step > 0 and cfg.topic_drift > 0 and rng.random() < cfg.topic_drift:
        topic = successor(topic, n_topics)
      elif rng.random() > 0.6:  # users keep a topic for a while, which makes history informative
        topic = rng.choice(n_topics, p=prefs[u])
      candidates = items_by_topic[topic]
      if len(candidates) == 0:
        continue
      item = int(rng.choice(candidates, p=weights_by_topic[topic]))
      if item in seen:
        continue
      seen.add(item)
      clock += int(rng.integers(60, 86_400))
      users.append(u)
      items.append(item)
      stamps.append(clock)

  cold = np.zeros(n_items, dtype=bool)
  n_cold = int(round(cfg.cold_item_fraction * n_items))
  if n_cold:
    cold[rng.choice(n_items, size=n_cold, replace=False)] = True

  # Category agrees with the topic only half the time: a noisy but real content signal.
  category = np.where(rng.random(n_items) < 0.5, item_topic, rng.integers(0, n_topics, size=n_items))
  dataset = Dataset(
      name="synthetic",
      users=np.asarray(users, np.int32),
      items=np.asarray(items, np.int32),
      timestamps=np.asarray(stamps, np.int64),
      item_text=tuple(texts),
      item_titles=tuple(titles),
      item_raw_ids=np.arange(n_items, dtype=np.int64),
      user_raw_ids=np.arange(n_users, dtype=np.int64),
      item_features={"category": (category + 1).astype(np.int32)[:, None],
                     "format": (item_format + 1).astype(np.int32)[:, None]},
      item_feature_sizes={"category": n_topics + 1, "format": len(_FORMATS) + 1},
      user_features={"age": (age + 1).astype(np.int32)[:, None]},
      user_feature_sizes={"age": AGE_BUCKETS + 1},
      # Every world draws formats and ages from the same fixed lists; its categories are its own topics.
      feature_vocabularies={"format": "synthetic-formats", "age": "synthetic-age-buckets"},
  )
  return dataset.validate(), cold
