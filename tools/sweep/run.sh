#!/bin/bash
# Sweeps model classes under bk.verify, one process per model (see hf_causal_lm.py, timm_model.py).
#   bash tools/sweep/run.sh hf|hf-image|timm OUT.jsonl
set -u
kind=$1; out=$2; here=$(dirname "$0"); py=${PYTHON:-python}
if [ "$kind" = hf ]; then
  models=$($py -c "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M; print(' '.join(sorted(M)))")
  script=$here/hf_causal_lm.py
elif [ "$kind" = hf-image ]; then
  models=$($py -c "from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as M; print(' '.join(sorted(M)))")
  script=$here/hf_image.py
else
  [ -f /tmp/timm_picks.json ] || $py "$here/timm_pick.py" > /dev/null
  models=$($py -c "import json; print(' '.join(v[0] for v in json.load(open('/tmp/timm_picks.json')).values()))")
  script=$here/timm_model.py
fi
for m in $models; do
  line=$(timeout 300 $py "$script" "$m" 4 2>/dev/null | tail -1)
  [ -n "$line" ] || line="{\"model\": \"$m\", \"error\": \"timeout or crash\"}"
  echo "$line" >> "$out"
done
