"""The scale ENCORE's ridge mu meets: lambda tr(C)/d per edited layer (the data term's mean weight per
input direction), for the embedded model's ENCORE preset.

    python results/lifelong_frozen/c_scale.py

Loads C from the statistics cache (computes it once where missing) and prints, per layer, tr(C)/d,
lambda tr(C)/d and the ratio of mu 10 / 100 / 300 / 1,000 to it.
"""

import lmedit
from lmedit._runtime import configure_threads

configure_threads()
model, tok = lmedit.load_model()
editor = lmedit.Editor(model, tok, "encore", progress=False)
lam = editor.hparams.mom2_update_weight
print(f"lambda {lam:g}, mu (preset) {editor.hparams.update_norm_lambda:g}")
print("| layer | tr(C)/d | lambda tr(C)/d | mu 10 | mu 100 | mu 300 | mu 1,000 |")
print("|---|---|---|---|---|---|---|")
for layer, C in editor.covariances().items():
    scale = lam * float(C.trace()) / C.shape[0]
    print(f"| {layer} | {float(C.trace()) / C.shape[0]:.4f} | {scale:.1f} | "
          + " | ".join(f"{mu / scale:.2f}" for mu in (10, 100, 300, 1000)) + " |")
