"""PyTorch peer: the same text two-tower as jaxrec, trained on the batches the benchmark wrote.

Runs in its own interpreter (a virtualenv with torch; see benchmarks/README.md) and never imports
jaxrec. Input: an .npz written by benchmarks/train_throughput.py (the config as JSON, every
training batch, the catalog and user tables, the evaluation users' histories). Output: an .npz of
item vectors [N, E] and query vectors [U, E] for the benchmark to score, and a JSON summary.

The model mirrors jaxrec/models/towers.py layer for layer:
  item tower:  cached text vector (frozen) or live MiniLM (full) ++ item id embedding (rows
               dropped to the shared cold row with probability id_dropout) ++ categorical bags
               -> Linear+GELU(tanh) layers -> Linear -> L2 normalise
  query tower: mean of the item-tower vectors of the last L items ++ user id embedding ++ user
               bags -> the same MLP shape -> L2 normalise
  loss:        in-batch softmax / temperature, minus logQ of every column, accidental hits masked
  optimiser:   global-norm clipping, AdamW (decay only on tensors with ndim >= 2), linear warmup
               from 0 then cosine decay (optax.warmup_cosine_decay_schedule's formula)

Dimension legend: B batch, L history length, N items, U unique items or users, D text width,
E tower output, T tokens.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import peer_io  # this directory: the peers' shared command line and outputs

MASKED_LOGIT = -1e9


def lecun_normal_(weight: torch.Tensor) -> None:
  # Flax's lecun_normal: truncated normal with variance 1/fan_in (the 0.8796 undoes the truncation).
  std = math.sqrt(1.0 / weight.shape[1]) / 0.87962566103423978
  nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)


class FusionMLP(nn.Module):

  def __init__(self, in_dim: int, mlp_dims: list[int], embed_dim: int):
    super().__init__()
    dims = [in_dim, *mlp_dims]
    self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
    self.out = nn.Linear(dims[-1], embed_dim)
    for layer in [*self.hidden, self.out]:
      lecun_normal_(layer.weight)
      nn.init.zeros_(layer.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for layer in self.hidden:
      x = F.gelu(layer(x), approximate="tanh")
    return F.normalize(self.out(x), dim=-1, eps=1e-12)


class CategoricalBag(nn.Module):

  def __init__(self, values_RxM: np.ndarray, vocab: int, dim: int):
    super().__init__()
    self.register_buffer("values", torch.as_tensor(values_RxM, dtype=torch.long))
    self.embed = nn.Embedding(vocab, dim)
    nn.init.normal_(self.embed.weight, std=0.05)

  def forward(self, rows_N: torch.Tensor) -> torch.Tensor:
    ids_NxM = self.values[rows_N]
    return (self.embed(ids_NxM) * (ids_NxM > 0).unsqueeze(-1)).sum(1)


def _bags(data: dict, prefix: str, dim: int) -> nn.ModuleDict:
  names = sorted(k[len(prefix):] for k in data if k.startswith(prefix))
  return nn.ModuleDict({name: CategoricalBag(data[prefix + name], int(data[f"size_{prefix}{name}"]), dim) for name in names})


class ItemTower(nn.Module):

  def __init__(self, data: dict, cfg: dict, text_dim: int):
    super().__init__()
    self.id_dropout = cfg["id_dropout"]
    self.register_buffer("id_row", torch.as_tensor(data["id_row"], dtype=torch.long))
    # Full mode encodes text live and passes it in; frozen mode reads the cached catalog vectors.
    self.register_buffer("text", torch.as_tensor(data["text"], dtype=torch.float32) if "text" in data else None)
    self.ids = nn.Embedding(int(data["num_id_rows"]), cfg["id_dim"])
    nn.init.normal_(self.ids.weight, std=0.05)
    self.features = _bags(data, "item_feature_", cfg["feature_dim"])
    in_dim = text_dim + cfg["id_dim"] + cfg["feature_dim"] * len(self.features)
    self.mlp = FusionMLP(in_dim, cfg["mlp_dims"], cfg["embed_dim"])

  def forward(self, items_N: torch.Tensor, text_NxD: torch.Tensor | None = None, dropout: bool = False) -> torch.Tensor:
    parts = [self.text[items_N] if text_NxD is None else text_NxD]
    rows_N = self.id_row[items_N]
    if dropout and self.id_dropout > 0:
      rows_N = torch.where(torch.rand(rows_N.shape) < self.id_dropout, torch.zeros_like(rows_N), rows_N)
    parts.append(self.ids(rows_N))
    parts.extend(bag(items_N) for bag in self.features.values())
    return self.mlp(torch.cat(parts, dim=-1))


class QueryTower(nn.Module):

  def __init__(self, data: dict, cfg: dict):
    super().__init__()
    self.ids = nn.Embedding(int(data["num_users"]) + 1, cfg["id_dim"])  # row 0: users unknown in training
    nn.init.normal_(self.ids.weight, std=0.05)
    self.features = _bags(data, "user_feature_", cfg["feature_dim"])
    in_dim = cfg["embed_dim"] + cfg["id_dim"] + cfg["feature_dim"] * len(self.features)
    self.mlp = FusionMLP(in_dim, cfg["mlp_dims"], cfg["embed_dim"])

  def forward(self, users_B: torch.Tensor, history_BxLxE: torch.Tensor, mask_BxL: torch.Tensor) -> torch.Tensor:
    mask = mask_BxL.float()
    pooled_BxE = (history_BxLxE * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    parts = [pooled_BxE, self.ids(users_B + 1)]
    parts.extend(bag(users_B) for bag in self.features.values())
    return self.mlp(torch.cat(parts, dim=-1))


class TextEncoder(nn.Module):
  """MiniLM (transformers BertModel) over the catalog's token table: mean-pooled, L2-normalised."""

  def __init__(self, data: dict, model_dir: str):
    super().__init__()
    from transformers import AutoModel
    self.bert = AutoModel.from_pretrained(model_dir, add_pooling_layer=False)  # jaxrec has no pooler
    self.bert.eval()  # jaxrec's encoder has no dropout; keep the same computation
    for name in ("input_ids", "attention_mask", "token_type_ids"):
      self.register_buffer(name, torch.as_tensor(data["tokens_" + name], dtype=torch.long))

  def forward(self, items_U: torch.Tensor) -> torch.Tensor:
    mask = self.attention_mask[items_U]
    width = int(mask.sum(1).max())  # eager PyTorch pads to the longest text of this batch
    mask = mask[:, :width]
    out = self.bert(input_ids=self.input_ids[items_U, :width], attention_mask=mask,
                    token_type_ids=self.token_type_ids[items_U, :width]).last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = (out * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1, eps=1e-12)


class TwoTower(nn.Module):

  def __init__(self, data: dict, cfg: dict):
    super().__init__()
    self.encoder = TextEncoder(data, cfg["model_dir"]) if cfg["mode"] == "full" else None
    text_dim = int(data["text"].shape[1]) if self.encoder is None else self.encoder.bert.config.hidden_size
    self.item_tower = ItemTower(data, cfg, text_dim)
    self.query_tower = QueryTower(data, cfg)
    self.temperature = cfg["temperature"]

  def item_text(self, items_N: torch.Tensor) -> torch.Tensor | None:
    return None if self.encoder is None else self.encoder(items_N)

  def queries(self, users_B, history_BxL, mask_BxL, history_text=None, dropout=False):
    b, l = history_BxL.shape
    flat = self.item_tower(history_BxL.clamp_min(0).reshape(-1), history_text, dropout)
    return self.query_tower(users_B, flat.reshape(b, l, -1), mask_BxL)

  def loss(self, batch: dict) -> torch.Tensor:
    pos_text = hist_text = None
    if self.encoder is not None:
      # Encode each distinct item of the batch once (positives and history), then gather.
      hist_BxL, mask_BxL = batch["history"], batch["history_mask"]
      unique_U = torch.unique(torch.cat([batch["item"], hist_BxL[mask_BxL]]))
      text_UxD = self.encoder(unique_U)
      pos_text = text_UxD[torch.searchsorted(unique_U, batch["item"])]
      # Padding slots gather an arbitrary row; the query tower's masked mean ignores them.
      slots = torch.searchsorted(unique_U, hist_BxL.clamp_min(0).reshape(-1)).clamp_max(len(unique_U) - 1)
      hist_text = text_UxD[slots]
    q = self.queries(batch["user"], batch["history"], batch["history_mask"], hist_text, dropout=True)
    pos = self.item_tower(batch["item"], pos_text, dropout=True)
    logits = q @ pos.T / self.temperature - batch["log_q"].unsqueeze(0)
    ids = batch["item"]
    label = torch.eye(len(ids), dtype=torch.bool)
    logits = logits.masked_fill((ids.unsqueeze(0) == ids.unsqueeze(1)) & ~label, MASKED_LOGIT)
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


def lr_lambda(cfg: dict):
  peak, warmup, steps = cfg["learning_rate"], cfg["warmup_steps"], cfg["total_steps"]
  warmup = min(warmup, max(steps - 1, 0))
  decay_steps = max(steps, warmup + 1)
  alpha = cfg["end_lr_fraction"]

  def factor(step: int) -> float:  # optax.warmup_cosine_decay_schedule, as a multiple of the peak
    if step < warmup:
      return step / warmup
    t = min(step - warmup, decay_steps - warmup) / (decay_steps - warmup)
    return (1 - alpha) * 0.5 * (1 + math.cos(math.pi * t)) + alpha

  del peak
  return factor


def make_optimizer(model: TwoTower, cfg: dict) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
  groups = {}
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    encoder = name.startswith("encoder.")
    key = ("encoder" if encoder else "towers", p.ndim >= 2)
    groups.setdefault(key, []).append(p)
  param_groups = [{"params": ps, "weight_decay": cfg["weight_decay"] if decay else 0.0,
                   "lr": cfg["learning_rate"] * (cfg["encoder_lr_multiplier"] if part == "encoder" else 1.0)}
                  for (part, decay), ps in groups.items()]
  opt = torch.optim.AdamW(param_groups, lr=cfg["learning_rate"], betas=(0.9, 0.999), eps=1e-8)
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def main() -> None:
  args, data, cfg, started = peer_io.parse(__doc__.splitlines()[0], extra=lambda p: p.add_argument(
      "--autocast", choices=("float32", "bfloat16"), default="float32",
      help="bfloat16: the train step under torch.autocast('cpu', bfloat16) (oneDNN's AVX512-BF16 matmuls)"))
  autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bfloat16")
  torch.manual_seed(cfg["seed"])
  torch.set_num_threads(cfg["threads"])
  model = TwoTower(data, cfg)
  opt, sched = make_optimizer(model, cfg)
  steps, warmup = cfg["steps"], cfg["timing_warmup"]
  keys = ("user", "item", "history", "history_mask", "log_q")
  batches = {k: data["batch_" + k] for k in keys}
  losses = []
  t0 = None
  model.train()
  if model.encoder is not None:
    model.encoder.bert.eval()
  for step in range(steps):
    if step == warmup:
      t0 = time.perf_counter()
    batch = {k: torch.from_numpy(batches[k][step]) for k in keys}
    batch = {k: (v.long() if v.dtype == torch.int32 else v) for k, v in batch.items()}
    with autocast:
      loss = model.loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_norm"])
    opt.step()
    sched.step()
    losses.append(loss.detach())
  elapsed = time.perf_counter() - t0
  losses = [float(x) for x in losses]

  model.eval()
  with torch.no_grad():
    n = int(data["num_items"])
    all_items = torch.arange(n)
    chunks = []
    for start in range(0, n, 512):
      ids = all_items[start:start + 512]
      chunks.append(model.item_tower(ids, model.item_text(ids)))
    items_NxE = torch.cat(chunks).numpy()
    users = torch.from_numpy(data["eval_users"]).long()
    history = torch.from_numpy(data["eval_history"]).long()
    mask = torch.from_numpy(data["eval_mask"])
    queries = []
    for start in range(0, len(users), 512):
      h = history[start:start + 512]
      text = None
      if model.encoder is not None:
        text = model.item_text(h.clamp_min(0).reshape(-1))
      queries.append(model.queries(users[start:start + 512], h, mask[start:start + 512], text))
    queries_UxE = torch.cat(queries).numpy()
  peer_io.write(args.out, items_NxE, queries_UxE, peer="pytorch", version=torch.__version__,
                threads=torch.get_num_threads(), timed_steps=steps - warmup, elapsed=elapsed,
                batch_size=cfg["batch_size"], losses=losses, started=started,
                params=sum(p.numel() for p in model.parameters() if p.requires_grad))

if __name__ == "__main__":
  main()
