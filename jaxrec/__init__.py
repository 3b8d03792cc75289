"""jaxrec: text-aware two-tower recommendation in JAX.

Public names are imported lazily so that `import jaxrec` (and the CLI's start-up) stays cheap.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "load_config": "jaxrec.config",
    "Config": "jaxrec.config",
    "ConfigError": "jaxrec.config",
    "train": "jaxrec.trainer",
    "evaluate": "jaxrec.recommender",
    "TextEncoder": "jaxrec.text_encoder",
    "topk": "jaxrec.retrieval",
    "ItemIndex": "jaxrec.retrieval",
    "IndexFormatError": "jaxrec.retrieval",
    "Dataset": "jaxrec.data.dataset",
}

__all__ = ["__version__", *_PUBLIC]


def __dir__():
  # The public names are attributes only once __getattr__ imports them; list them up front.
  return sorted({*globals(), *__all__})


def __getattr__(name):
  if name in _PUBLIC:
    import importlib
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f"module 'jaxrec' has no attribute {name!r}")
