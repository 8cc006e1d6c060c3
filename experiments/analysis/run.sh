#!/usr/bin/env bash
# The paper's analyses in the toy world: the committed toy base, and adapters trained on 'moving apart'
# (seed 0, 800 steps) by direct LoRA, DreamRelation (hmt.unselected=skip, the demo's run) and
# DreamRelation with hmt.unselected=zero_grad. Writes the figures and JSON next to this script.
#
#   bash experiments/analysis/run.sh                  # about 25 min on 2 CPU cores (trains 3 runs, then analyzes)
#   WORK=/tmp/toy bash experiments/analysis/run.sh    # keep the runs elsewhere (default outputs/analysis-toy)
set -euo pipefail
RELVID=${RELVID:-relvid}
WORK=${WORK:-outputs/analysis-toy}
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=relvid/toy/base_model
RUNS=$WORK/demo/runs

# 1. the adapters: `relvid demo` trains direct LoRA and DreamRelation; the zero_grad variant is trained alike
[ -f "$RUNS/dreamrelation/adapters/relvid_adapters.safetensors" ] || \
    $RELVID demo --out "$WORK/demo" --relation moving_apart --seed 0
[ -f "$RUNS/dreamrelation_zero_grad/adapters/relvid_adapters.safetensors" ] || \
    $RELVID train configs/toy/dreamrelation.yaml configs/toy/methods/dreamrelation.yaml relation=moving_apart \
        custom_relation=true "data.cache_dir=$WORK/demo/cache" model.path=$BASE seed=0 hmt.unselected=zero_grad \
        "output_dir=$RUNS/dreamrelation_zero_grad"
ADAPTERS=(--adapters "$RUNS/direct_lora/adapters" --adapters "$RUNS/dreamrelation/adapters"
          --adapters "$RUNS/dreamrelation_zero_grad/adapters")
PROMPT="A red circle is moving away from a green square."

# 2. the analyses (the paper's step 60 of 64 by default)
$RELVID analyze qkv-subspace --model $BASE "${ADAPTERS[@]}" --out "$HERE/qkv_subspace"
$RELVID analyze features --model $BASE "${ADAPTERS[@]}" --clip "$WORK/demo/cache/moving_apart_000.safetensors" \
    --out "$HERE/features_exemplar"
$RELVID analyze features --model $BASE "${ADAPTERS[@]}" --prompt "$PROMPT" --out "$HERE/features_prompt"
$RELVID analyze attention --model $BASE "${ADAPTERS[@]}" --prompt "$PROMPT" --phrase "moving away" \
    --step -4 -12 -20 --out "$HERE/attention"
# 3. attribution: the demo's first 5 test prompts, the toy grid's sampling (24 steps, guidance 4), the toy judge
python -c "import json, sys; print('\\n'.join(json.load(open(sys.argv[1]))['prompts'][:5]))" \
    "$WORK/demo/demo.json" > "$WORK/prompts5.txt"
$RELVID analyze attribution --model $BASE "${ADAPTERS[@]}" --prompts-file "$WORK/prompts5.txt" \
    --relation moving_apart custom_relation=true --judge toy --sampling-steps 24 --out "$HERE/attribution"
# 4. exemplar fit: the error on the exemplars the adapters trained on, inside and outside the subjects, per
# subset (subject1+ffn, subject2+ffn: a subject step's adapters); drawn noise levels, then two fixed ones
SUBSETS=(--subsets none relation+ffn subjects+ffn all subject1+ffn subject2+ffn)
$RELVID analyze exemplar-fit --model $BASE "${ADAPTERS[@]}" --cache "$WORK/demo/cache" --relation moving_apart \
    custom_relation=true "${SUBSETS[@]}" --out "$HERE/exemplar_fit"
$RELVID analyze exemplar-fit --model $BASE "${ADAPTERS[@]}" --cache "$WORK/demo/cache" --relation moving_apart \
    custom_relation=true "${SUBSETS[@]}" --sigmas 0.5 0.98 --out "$HERE/exemplar_fit_sigmas"
