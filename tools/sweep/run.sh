#!/bin/bash
# Sweeps model classes under bk.verify, one process per model (see hf_text.py, hf_image.py, hf_audio.py, timm_model.py,
# torchvision_model.py).
#   bash tools/sweep/run.sh hf|hf-seq-cls|hf-seq2seq|hf-mlm|hf-token-cls|hf-image|hf-audio|timm|torchvision OUT.jsonl
set -u
kind=$1; out=$2; here=$(dirname "$0"); py=${PYTHON:-python}
mapping() { $py -c "from transformers.models.auto import modeling_auto as M; print(' '.join(sorted(M.$1)))"; }
case $kind in
  hf)           models=$(mapping MODEL_FOR_CAUSAL_LM_MAPPING_NAMES); head=causal-lm ;;
  hf-seq-cls)   models=$(mapping MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES); head=seq-cls ;;
  hf-seq2seq)   models=$(mapping MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES); head=seq2seq ;;
  hf-mlm)       models=$(mapping MODEL_FOR_MASKED_LM_MAPPING_NAMES); head=mlm ;;
  hf-token-cls) models=$(mapping MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES); head=token-cls ;;
  hf-image)     models=$(mapping MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES); head=image ;;
  hf-audio)     models=$(mapping MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES); head=audio ;;
  timm)
    [ -f /tmp/timm_picks.json ] || $py "$here/timm_pick.py" > /dev/null
    models=$($py -c "import json; print(' '.join(v[0] for v in json.load(open('/tmp/timm_picks.json')).values()))")
    head=timm ;;
  torchvision)  models=$(cd "$here" && $py torchvision_model.py --list); head=torchvision ;;
  *) echo "unknown kind $kind"; exit 2 ;;
esac
case $head in image) script=$here/hf_image.py ;; audio) script=$here/hf_audio.py ;; timm) script=$here/timm_model.py ;; torchvision) script=$here/torchvision_model.py ;; *) script=$here/hf_text.py ;; esac
for m in $models; do
  line=$(SWEEP_HEAD=$head timeout 300 $py "$script" "$m" 4 2>/dev/null | tail -1)
  [ -n "$line" ] || line="{\"model\": \"$m\", \"error\": \"timeout or crash\"}"
  echo "$line" >> "$out"
done
