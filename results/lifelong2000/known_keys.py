"""Why some known facts are lost and others kept: their subject keys against the edits' keys.

Usage (from the repository root)::

    python results/lifelong2000/known_keys.py results/lifelong2000/rerun.json [LAYER ...]

For a run of ``benchmarks/lifelong.py`` whose ledger is on this machine: the known facts' keys (read
on the unedited model as an edit's key is: the subject's last token, averaged over the context
templates) at the edited layers, split by whether the run's last evaluation still answered the fact
(facts whose subject some edit names are left out: an edit may rightly change them).
Per layer and group: the largest cosine with any edited key of the ledger, the cosine with the
edited keys' mean, and how hard the run's accumulated update hits the key, ||dW k|| / ||W0 k||.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import lmedit
from lmedit._runtime import configure_threads
from lmedit.core.keys import collect_keys
from lmedit.requests import EditRequest


def main(path: str, layers: list[int]) -> None:
    configure_threads()
    state = json.loads(Path(path).read_text())
    ledger = Path(path).parent / "ledgers" / state["method"]
    known, ok = state["known"], state["rows"][-1]["known_ok"]
    model, tok = lmedit.load_model()
    editor = lmedit.Editor(model, tok, "encore", progress=False)  # the template groups and layers of the runs here
    hp = editor.hparams
    layers = layers or list(hp.layers)
    facts = [EditRequest(prompt=p.replace(s, "{}", 1), subject=s, target_new="x")
             for p, s in zip(known["prompts"], known["subjects"])]
    K = collect_keys(model, tok, editor.adapter, facts, editor.template_groups(hp), layers)
    edited = {r["subject"].casefold() for f in ledger.glob("batch-*.json") for r in json.loads(f.read_text())}
    other = torch.tensor([sj.casefold() not in edited for sj in known["subjects"]])  # an edit may rightly change these
    batches = sorted(ledger.glob("batch-*.safetensors"))
    tensors = [load_file(str(b)) for b in batches]
    print(f"{state['method']}: {len(batches)} batches, {sum(ok)} of {len(ok)} known facts kept at the last evaluation; "
          f"{int((~other).sum())} facts whose subject an edit names left out")
    print("| layer | group | n | max cos with an edited key | cos with the edited keys' mean | ||dW k|| / ||W0 k|| |")
    print("|---|---|---|---|---|---|")
    for l in layers:
        E = torch.cat([t[f"keys.{l}"].double() for t in tensors])  # (n_edits, d_in)
        dW = sum(t[f"delta.{l}"].double() for t in tensors)  # (d_out, d_in)
        W0 = editor.adapter.weight(model, l).detach().double()
        k = K[l].double()  # (n_known, d_in)
        kn, En = k / k.norm(dim=1, keepdim=True), E / E.norm(dim=1, keepdim=True)
        max_cos = (kn @ En.T).max(dim=1).values
        mu = E.mean(0)
        mean_cos = kn @ (mu / mu.norm())
        hit = (k @ dW.T).norm(dim=1) / (k @ W0.T).norm(dim=1)
        kept, lost = torch.tensor(ok) & other, ~torch.tensor(ok) & other
        # AUC: the chance that a lost fact's nearest edited key is closer than a kept fact's
        auc = float((max_cos[lost][:, None] > max_cos[kept][None, :]).double().mean())
        for name, sel in (("kept", kept), ("lost", lost)):
            print(f"| {l} | {name} | {int(sel.sum())} | {max_cos[sel].mean():.3f}"
                  + (f" (AUC {auc:.2f})" if name == "lost" else "")
                  + f" | {mean_cos[sel].mean():.3f} | {hit[sel].mean():.3f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2:]])
