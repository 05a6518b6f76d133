#!/usr/bin/env bash
# `make demo`: the main job on this machine from nothing, in four steps:
#   1. shards of the embedded multilingual corpus (10 languages, 6,000 pieces, 64-token rows) in
#      data/demo-multilingual (skipped when they verify)
#   2. pretrain the `tiny` preset, RTD + GDES, 500 steps on 2 CPU ranks under ZeRO-3 (runs/demo,
#      configs/demo_cpu.yaml)
#   3. export the discriminator (and the generator) as Hugging Face folders
#   4. score the model on held-out rows at its start and its end, beside trivial answers, and say
#      where everything is
# Re-running continues a stopped run (--resume auto); `rm -rf runs/demo` starts over.
# Settings: DV3_DEMO_DATA, DV3_DEMO_RUN, DV3_DEMO_STEPS, DV3_DEMO_RANKS.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
DATA="${DV3_DEMO_DATA:-data/demo-multilingual}"
RUN="${DV3_DEMO_RUN:-runs/demo}"
STEPS="${DV3_DEMO_STEPS:-500}"
RANKS="${DV3_DEMO_RANKS:-2}"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
start=$(date +%s)

echo "== 1/4 data: $DATA"
if "$PY" -m engine.cli data verify "$DATA" --quick >/dev/null 2>&1; then
  echo "   $DATA verifies; reusing it"
else
  "$PY" -m engine.cli data prepare --output "$DATA" --default-corpus multilingual --vocab-size 6000 --seq-len 64 \
    --validation-fraction 0.02 --threads 2
fi

echo "== 2/4 pretrain: tiny, $STEPS steps, $RANKS ranks, ZeRO-3 -> $RUN"
port=$("$PY" -c "from engine.train.distributed import free_port; print(free_port())")
"$PY" -m torch.distributed.run --nproc_per_node "$RANKS" --master_port "$port" -m engine.cli pretrain \
  --config configs/demo_cpu.yaml --output-dir "$RUN" --data.dirs "$DATA" --train.steps "$STEPS" --resume auto

echo "== 3/4 export: $RUN/hf (discriminator), $RUN/hf-generator"
"$PY" -m engine.cli export --checkpoint "$RUN" --output "$RUN/hf" --generator-output "$RUN/hf-generator" --overwrite

echo "== 4/4 held-out quality at the start and the end"
"$PY" -m engine.cli evaluate "$RUN" --from-start --sequences 512 --output "$RUN/evaluation.json"
"$PY" - "$RUN" "$start" <<'PY'
import json, sys, time
from pathlib import Path

run, start = Path(sys.argv[1]), float(sys.argv[2])
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
steps = {r["step"]: r for r in records if "loss" in r}
similarity = [r for r in records if "embedding_similarity" in r]
first, last = steps[min(steps)], steps[max(steps)]
print(f"training losses, step {first['step']} -> {last['step']}:")
for key in ("loss", "mlm_loss", "rtd_loss", "generator_accuracy", "discriminator_accuracy", "replaced_fraction"):
    print(f"  {key:24s} {first[key]:8.4f} -> {last[key]:8.4f}")
if similarity:
    s0, s1 = similarity[0], similarity[-1]
    print("embedding similarity (paper's Table 1), step {} -> {}:".format(s0["step"], s1["step"]))
    for key in s1["embedding_similarity"]:
        print(f"  {key:24s} {s0['embedding_similarity'][key]:8.4f} -> {s1['embedding_similarity'][key]:8.4f}")
print(f"throughput (last log step): {last['tokens_per_s']:.0f} tokens/s")
print(f"TensorBoard:   .venv/bin/tensorboard --logdir {run / 'tensorboard'}")
print(f"checkpoints:   {run / 'checkpoints'}")
print(f"exported:      {run / 'hf'}  (transformers.AutoModel / AutoTokenizer)")
print(f"               {run / 'hf-generator'}  (AutoModelForMaskedLM)")
print(f"wall time:     {(time.time() - start) / 60:.1f} min")
PY
