"""The ``jaxrec`` command: a thin front end over the Python API.

Every command takes ``--config F`` and ``key=value`` overrides. Errors print one line naming the
problem and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from jaxrec.config import ConfigError, configs_dir

DEFAULT_CONFIG = os.path.join(configs_dir(), "default.py")  # shipped in the wheel, or the checkout's


class UsageError(Exception):
  pass


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxrec", description="Text-aware two-tower recommendation in JAX.")
  parser.add_argument("--debug", action="store_true", help="show full tracebacks")
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p, workdir_required=False):
    p.add_argument("--config", help="config file (Python, defines get_config())")
    p.add_argument("--workdir", required=workdir_required, help="run directory")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=200")

  p = sub.add_parser("train", help="train, evaluate and export; writes WORKDIR/metrics.json")
  common(p)
  p.add_argument("--resume-with-changes", action="store_true",
                 help="resume this workdir's run although optimisation settings (learning rate, schedule, "
                      "regularisation) changed; changes of data, model or seed are always refused")
  p = sub.add_parser("evaluate", help="full-ranking evaluation of a saved checkpoint")
  common(p, workdir_required=True)
  p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
  p.add_argument("--split", choices=("test", "valid"), help="which held-out split")
  p = sub.add_parser("recommend", help="top-k items for one user, or for an ad-hoc history, with titles")
  common(p, workdir_required=True)
  who = p.add_mutually_exclusive_group(required=True)
  who.add_argument("--user", help="user id as in the dataset")
  who.add_argument("--history", help="item ids as in the dataset, comma-separated, oldest first: recommends for "
                                     "a new user with this history through the exported query tower")
  p.add_argument("--k", type=int, default=10)
  p = sub.add_parser("export", help="write the ItemIndex artifact of a checkpoint")
  common(p, workdir_required=True)
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
  common(sub.add_parser("data-stats", help="dataset statistics and an item-popularity plot"))
  p = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
  common(p.add_parser("show", help="every key with its type, value (after --config and the overrides; with "
                                   "--workdir alone, that run's saved config), default and comment"))
  p = sub.add_parser("study", help="train and evaluate a grid of experiments; write tables and plots")
  from jaxrec import study
  study.add_arguments(p)
  p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
  return parser


def _load_config(args, from_workdir: bool):
  from jaxrec.config import from_dict, load_config, apply_overrides, validate
  overrides = list(args.overrides)
  if any(o.startswith("data.source=") for o in overrides) and not any(o.startswith("data.path=") for o in overrides):
    overrides.append("data.path=")  # the config's path belongs to its own source: the new one's default folder
  if any(o.startswith("data.source=") for o in overrides) and not any(o.startswith("data.union=") for o in overrides):
    overrides.append("data.union=")  # likewise the parts of a union source
  if from_workdir and not args.config:
    path = os.path.join(args.workdir, "config.json")
    if not os.path.isdir(args.workdir):
      raise UsageError(f"workdir not found: {args.workdir}")
    if not os.path.isfile(path):
      raise UsageError(f"no config.json in workdir {args.workdir}: train there first (jaxrec train --workdir {args.workdir})")
    try:
      with open(path) as f:
        cfg = from_dict(json.load(f))
    except (ValueError, TypeError, AttributeError) as e:  # broken JSON, or JSON that is not a config
      raise ConfigError(f"the workdir's config {path} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        f"pass the run's config file with --config (and the same overrides) instead") from e
    cfg = validate(apply_overrides(cfg, overrides))
  else:
    cfg = load_config(args.config or (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None), overrides)
  if args.workdir:
    from jaxrec.config import override
    cfg = override(cfg, "workdir", args.workdir)
  return cfg


def _print_metrics(result: dict, out=sys.stdout) -> None:
  ks = [k for k in (10, 20, 50) if f"recall@{k}" in result]
  rows = [("model", ""), ("popularity", "popularity/")]
  for group in ("", "warm/", "cold/", "in_source/", "new_to_source/"):
    if f"{group}recall@10" not in result:
      continue
    print(f"{'overall' if not group else group[:-1]:>8} {'':12}" + "".join(f"{'R@' + str(k):>8}{'N@' + str(k):>8}" for k in ks), file=out)
    for name, prefix in rows:
      key = prefix + group
      if f"{key}recall@10" in result:
        print(f"{'':8} {name:12}" + "".join(f"{result[f'{key}recall@{k}']:8.4f}{result[f'{key}ndcg@{k}']:8.4f}" for k in ks), file=out)


def cmd_train(args) -> int:
  import jaxrec
  cfg = _load_config(args, from_workdir=False)
  result = jaxrec.train(cfg, resume_with_changes=args.resume_with_changes)
  print(f"\ntrained {result['steps']} steps, final loss {result['train/final_loss']:.4f}, "
        f"{result['train/examples_per_sec']:,.0f} examples/s")
  print(f"protocol: {result['protocol']}")
  _print_metrics(result)
  print(f"wrote {os.path.join(os.path.abspath(cfg.workdir), 'metrics.json')}")
  return 0


def _recommender_for_workdir(args):
  """The workdir's model, set up to restore its parameters (no optimizer state, no training batches)."""
  from jaxrec.mesh import mesh_fitting_devices
  from jaxrec.recommender import build
  cfg = mesh_fitting_devices(_load_config(args, from_workdir=True))
  if not os.path.isdir(os.path.join(cfg.workdir, "checkpoints")):
    raise UsageError(f"no checkpoints in workdir {cfg.workdir}")
  return build(cfg, restore_only=True)


def _transfer_config(args):
  """The workdir's config with the overrides when they ask about other data than it trained on
  (zero-shot on another dataset or split), else None."""
  from jaxrec import transfer
  if not any(o.startswith("data.") for o in args.overrides):
    return None
  cfg = _load_config(args, from_workdir=True)
  saved = os.path.join(cfg.workdir, "config.json")
  return cfg if os.path.isfile(saved) and transfer.changes_data(transfer.saved_config(cfg.workdir), cfg) else None


def cmd_evaluate(args) -> int:
  from jaxrec.files import write_json_atomically
  cfg = _transfer_config(args)
  if cfg is not None:
    from jaxrec import transfer
    result = transfer.evaluate(cfg, args.step, args.split)
    step, name = result["step"], f"{result['transfer']['dataset']}_{cfg.data.split}"
    print(f"step {step} of {cfg.workdir}, zero-shot on {result['transfer']['dataset']} ({cfg.data.split} split), "
          f"{args.split or cfg.eval.split} split")
    workdir = cfg.workdir
  else:
    rec = _recommender_for_workdir(args)
    step, params, tables = rec.restore(args.step)
    result = rec.evaluate(params, tables, args.split)
    result["step"] = step
    print(f"step {step}, {args.split or rec.cfg.eval.split} split")
    name, workdir = "", rec.cfg.workdir
  _print_metrics(result)
  path = os.path.join(workdir, f"eval_step{step}{'_on_' + name if name else ''}.json")
  write_json_atomically(path, result)
  print(f"wrote {path}")
  return 0


def cmd_export(args) -> int:
  from jaxrec.retrieval import check_save_target
  check_save_target(args.out)  # refuse a path export may not replace before restoring anything
  rec = _recommender_for_workdir(args)
  step, params, tables = rec.restore(args.step)
  index = rec.build_index(params, tables, step)
  index.save(args.out)
  tower = index.query_tower
  print(f"exported step {step}: {len(index.item_ids)} items to {args.out}, " + (
      "without the query tower (its export failed: see the warning above)" if tower is None else
      f"with the query tower (query_tower.jaxexport: {', '.join(tower.input_names)} -> [batch, {tower.width}], "
      f"for {', '.join(tower.spec['platforms'])})"))
  return 0


def cmd_recommend(args) -> int:
  from jaxrec.retrieval import ItemIndex
  if not os.path.isdir(args.workdir):
    raise UsageError(f"workdir not found: {args.workdir}")
  if args.k <= 0:
    raise UsageError(f"--k must be positive; got {args.k}")
  cfg = _transfer_config(args)
  if cfg is not None and args.history is not None:
    raise UsageError("--history reads the workdir's own catalog; drop the data.* overrides")
  if cfg is not None:  # another dataset: its catalog and the user's history there, through the trained towers
    from jaxrec import transfer
    index = transfer.index_for_users(cfg, [args.user])
    return _print_recommendations(index, index.user_ids[0], args.k)
  path = os.path.join(args.workdir, "index")
  if not os.path.isdir(path):
    raise UsageError(f"no index in workdir {args.workdir}: run `jaxrec train` or `jaxrec export --workdir {args.workdir} "
                     f"--out {path}` first")
  index = ItemIndex.load(path)
  if args.history is not None:
    return _print_history_recommendations(index, args.history, args.k, args.workdir)
  user = _match_id(args.user, index.user_ids)
  if user is None:
    raise UsageError(f"unknown user id {args.user!r} (this dataset has {len(index.user_ids)} users, "
                     f"e.g. {', '.join(str(u) for u in index.user_ids[:3])})")
  return _print_recommendations(index, user, args.k)


def _print_recommendations(index, user, k: int) -> int:
  seen = index.seen_items(user)
  # Known items are stored oldest first (in time order, or file order without timestamps).
  print(f"user {user}: {len(seen)} known items; the {min(len(seen), 10)} most recent, newest first:")
  for item_id, title in reversed(seen[-10:]):
    print(f"  [{item_id}] {title}")
  recommended = index.recommend(user, k)  # k is clamped to the items the user has not seen
  print(f"top {len(recommended)} recommendations:")
  for rank, (item_id, title, score) in enumerate(recommended, 1):
    print(f"  {rank:2d}. [{item_id}] {title}  ({score:.3f})")
  return 0


def _print_history_recommendations(index, history_text: str, k: int, workdir: str) -> int:
  words = [w.strip() for w in history_text.split(",") if w.strip()]
  if not words:
    raise UsageError("--history needs at least one item id (comma-separated, oldest first)")
  if index.query_tower is None:
    raise UsageError(f"the index in workdir {workdir} has no query tower (written before jaxrec exported one): "
                     f"run `jaxrec export --workdir {workdir} --out {os.path.join(workdir, 'index')}`")
  history = []
  for word in words:
    item = _match_id(word, index.item_ids)
    if item is None:
      raise UsageError(f"unknown item id {word!r} in --history (this catalog has {len(index.item_ids)} items, "
                       f"e.g. {', '.join(str(i) for i in index.item_ids[:3])})")
    history.append(item)
  length = index.query_tower.history_len
  print(f"history of {len(history)} items{f' (the query tower reads the {length} most recent)' if len(history) > length else ''}, "
        f"newest first:")
  for item_id in reversed(history[-10:]):
    print(f"  [{item_id}] {index.titles[int(index.item_rows([item_id])[0])]}")
  recommended = index.recommend_history(history, k)
  print(f"top {len(recommended)} recommendations:")
  for rank, (item_id, title, score) in enumerate(recommended, 1):
    print(f"  {rank:2d}. [{item_id}] {title}  ({score:.3f})")
  return 0


def _match_id(text: str, ids):
  """The dataset id equal to ``text`` (ids may be ints or strings)."""
  matches = [value for value in ids if str(value) == text]
  return matches[0] if matches else None


def cmd_data_stats(args) -> int:
  from jaxrec.data import stats
  argv = (["--config", args.config] if args.config else []) + (["--workdir", args.workdir] if args.workdir else [])
  return stats.main(argv + list(args.overrides)) or 0


def cmd_config(args) -> int:
  from jaxrec.config import describe, format_description
  cfg = _load_config(args, from_workdir=bool(args.workdir))
  try:
    print(format_description(describe(cfg)), flush=True)
  except BrokenPipeError:  # `jaxrec config show | head`: the reader has what it wanted
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own recipe: no error at exit
  return 0


def cmd_study(args) -> int:
  from jaxrec import study
  return study.run(args) or 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "recommend": cmd_recommend, "export": cmd_export,
            "data-stats": cmd_data_stats, "config": cmd_config, "study": cmd_study}


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # the process's own entry point: it may restart once with huge pages (host_memory)
    from jaxrec import host_memory
    host_memory.restart_with_huge_pages()
  argv = sys.argv[1:] if argv is None else argv
  parser = _parser()
  args, rest = parser.parse_known_args(argv)
  # Overrides after an option (`evaluate --workdir W data.x=1 --split valid eval.y=2`): argparse
  # gives the positional list only its first run of words.
  if rest and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in rest):
    args.overrides = [*args.overrides, *rest]
  elif rest:
    parser.parse_args(argv)  # argparse's own message and exit code for what it does not know
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "tensorboardX", "orbax", "jax._src.xla_bridge", "asyncio"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.debug:  # orbax logs (through absl and asyncio) the traceback of a failed save or restore from
      # each thread and task; jaxrec reports the failure in one line
      logging.getLogger(noisy).addFilter(lambda record: record.levelno < logging.ERROR or not record.exc_info)
  try:
    return COMMANDS[args.command](args)
  except KeyboardInterrupt:  # Ctrl-C outside the train loop (which saves and exits 75 itself)
    if args.debug:
      raise
    print(f"jaxrec {args.command}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # one clear line for the user; --debug for the stack
    if args.debug:
      raise
    # TrainingStopped carries its exit code; read it without importing the trainer (and JAX) here.
    stopped = getattr(e, "exit_code", None)
    code = stopped if isinstance(stopped, int) else 2 if isinstance(e, (UsageError, ConfigError)) else 1
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "jaxrec.mesh" in sys.modules:  # a multi-process run must not wait at exit for a process that died
      from jaxrec.mesh import stop_if_peer_lost
      stop_if_peer_lost(f"jaxrec {args.command}: error: ", message)
    print(f"jaxrec {args.command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
  sys.exit(main())
