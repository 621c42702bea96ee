#!/bin/bash
# Sweeps model classes under bk.verify, one process per model (see hf_causal_lm.py, timm_model.py).
#   bash tools/sweep/run.sh hf OUT.jsonl | bash tools/sweep/run.sh timm OUT.jsonl
set -u
kind=$1; out=$2; here=$(dirname "$0"); py=${PYTHON:-python}
if [ "$kind" = hf ]; then
  models=$($py -c "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M; print(' '.join(sorted(M)))")
  script=$here/hf_causal_lm.py
else
  [ -f /tmp/timm_picks.json ] || $py "$here/timm_pick.py" > /dev/null
  models=$($py -c "import json; print(' '.join(v[0] for v in json.load(open('/tmp/timm_picks.json')).values()))")
  script=$here/timm_model.py
fi
for m in $models; do
  line=$(timeout 300 $py "$script" "$m" 4 2>/dev/null | tail -1)
  echo "${line:-{\"model\": \"$m\", \"error\": \"timeout or crash\"}}" >> "$out"
done
