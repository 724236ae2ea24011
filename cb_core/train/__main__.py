"""`python -m cb_core.train [DATA_ROOT]`: the published adapter's headline numbers and its curves' path."""
import json
import sys

from cb_core.train import adapter_dir

out = adapter_dir(sys.argv[1] if len(sys.argv) > 1 else None)
p = out / "final_metrics.json"
if not p.exists():
    sys.exit(f"no trained adapter at {out} (materialize the `adapter` asset first)")
f = json.loads(p.read_text())
keys = ("steps", "final_loss", "harmful_cos_sim_start", "harmful_cos_sim_end", "retain_cos_sim_end", "kl_benign_end",
        "tokens_per_s", "train_seconds")
print(f"[cb] adapter: {out}")
print("[cb] " + ", ".join(f"{k} {f[k]:.4g}" for k in keys if isinstance(f.get(k), (int, float))))
print(f"[cb] loss curves: {out / 'curves.png'}")
