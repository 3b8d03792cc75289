"""What bounds the hybrid model on ML-1M (random 8:1:1): one change at a time, on the validation split.

The hybrid two-tower sits at Recall@10 0.17 on ML-1M's test split, level with RecBole's BPR on the
same split and below the 0.19 the study aims for. Each cell below changes one thing against the
hybrid cell of configs/study/paradigm.py (five epochs, one seed) and is scored on the validation
split, so the test split stays untouched by the search:

  hybrid            the paradigm study's hybrid
  catalog_softmax   train.negatives=catalog: an exact softmax over every trained item instead of
                    in-batch negatives with the logQ correction (is sampling the bottleneck?)
  no_logq           in-batch negatives without the logQ correction
  history100        the query pools 100 sampled profile items instead of 10
  history100_no_uid the same without the user-id embedding: the query is the profile alone
  temperature003    softmax temperature 0.03 instead of 0.05 (sharper)
  learned_temp      the temperature learnt with the towers
  wide128           128-d towers and id embeddings, 512-wide fusion MLPs (about 3x the parameters)
  user_weighted     train.user_weight_power=1: every user's examples weigh the same in the loss, as
                    the per-user averaged metrics do (heavy users otherwise dominate the gradient)
  history_ids50     the query also pools a history-item id table of its own (model.history_ids),
                    over 50 sampled profile items
  epochs20          twenty epochs instead of five (is the hybrid under-trained?)
  item_bias         an additive, learnt score bias per item (model.item_bias): the softmax output
                    bias of YouTube's and Mult-VAE's models (popularity no longer has to live in
                    the unit vectors' directions)
  history_ids100_no_uid  the history-item id table over 100 sampled profile items, no user-id
                    embedding: the query is built from the profile alone, as EASE's is

Then the profile query (history_ids100_no_uid) trained longer, choosing its training on the
validation split before the paradigm study's test cells:

  profile_10ep          ten epochs
  profile_40ep          forty epochs, validated every ten (logged, and in the cell's tb/)
  profile_dropout05_10ep, profile_dropout075_10ep
                        ten epochs with data.history_dropout=0.5 / 0.75: each training history
                        slot masked with that chance (Mult-DAE's input dropout)

  jaxrec study --config configs/study/ml1m_ablation.py --out runs/study/ml1m_ablation
"""

from jaxrec.study import DatasetSpec, Grid, Model, SplitSpec, Study

_HYBRID = ("model.use_text=true", "encoder.mode=frozen")
MODELS = (
    Model("hybrid", _HYBRID, "hybrid text + ids (the study's)"),
    Model("catalog_softmax", (*_HYBRID, "train.negatives=catalog"), "full softmax over the catalog"),
    Model("no_logq", (*_HYBRID, "train.logq_correction=false"), "in-batch softmax without logQ"),
    Model("history100", (*_HYBRID, "data.history_len=100"), "query pools 100 profile items"),
    Model("history100_no_uid", (*_HYBRID, "data.history_len=100", "model.use_user_ids=false"),
          "100 profile items, no user id"),
    Model("temperature003", (*_HYBRID, "model.temperature=0.03"), "temperature 0.03"),
    Model("learned_temp", (*_HYBRID, "model.learn_temperature=true"), "learnt temperature"),
    Model("wide128", (*_HYBRID, "model.embed_dim=128", "model.id_dim=128", "model.mlp_dims=512"),
          "128-d towers, 512-wide MLPs"),
    Model("user_weighted", (*_HYBRID, "train.user_weight_power=1"), "each user weighs the same"),
    Model("history_ids50", (*_HYBRID, "model.history_ids=true", "data.history_len=50"),
          "history-item id table, 50 profile items"),
    Model("epochs20", (*_HYBRID, "train.steps=16000"), "20 epochs"),
    Model("item_bias", (*_HYBRID, "model.item_bias=true"), "additive item bias"),
    Model("history_ids100_no_uid", (*_HYBRID, "model.history_ids=true", "data.history_len=100",
                                    "model.use_user_ids=false"), "history-item id table, 100 profile items, no user id"),
)
_PROFILE = (*_HYBRID, "model.history_ids=true", "data.history_len=100", "model.use_user_ids=false")
PROFILE_MODELS = (
    Model("profile_10ep", (*_PROFILE, "train.steps=8000"), "profile query, 10 epochs"),
    Model("profile_40ep", (*_PROFILE, "train.steps=32000", "train.eval_every=8000"), "profile query, 40 epochs"),
    Model("profile_dropout05_10ep", (*_PROFILE, "train.steps=8000", "data.history_dropout=0.5"),
          "profile query, history dropout 0.5, 10 epochs"),
    Model("profile_dropout075_10ep", (*_PROFILE, "train.steps=8000", "data.history_dropout=0.75"),
          "profile query, history dropout 0.75, 10 epochs"),
)
ML1M = DatasetSpec("ml1m", "configs/ml1m_text.py", ("train.steps=4000", "train.steps_per_call=10"))
RANDOM = SplitSpec("random", ("data.split=random", "data.split_ratios=0.8,0.1,0.1", "data.cold_item_fraction=0"))


def get_study() -> Study:
  return Study(
      name="ml1m_ablation",
      overrides=("train.progress=false", "mesh.num_devices=1", "eval.split=valid"),
      grids=(Grid(models=MODELS, datasets=(ML1M,), splits=(RANDOM,), seeds=(0,)),
             Grid(models=PROFILE_MODELS, datasets=(ML1M,), splits=(RANDOM,), seeds=(0,))),
  )
