"""The smallest model (by Parameters, built on the meta device) of each timm module, written to
/tmp/timm_picks.json for run.sh."""
import timm, torch, json, warnings, signal
warnings.filterwarnings("ignore")
picks = {}
for mod in timm.list_modules():
    names = timm.list_models(module=mod)
    best = None
    for n in names:
        try:
            with torch.device("meta"):
                m = timm.create_model(n, pretrained=False)
            k = sum(p.numel() for p in m.parameters())
        except Exception as e:
            continue
        if best is None or k < best[1]:
            best = (n, k)
    if best: picks[mod] = best
    print(mod, best, flush=True)
json.dump(picks, open("/tmp/timm_picks.json", "w"), indent=0)
