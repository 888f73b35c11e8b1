"""Known facts kept, split by whether the fact's subject is among the protected records' subjects.

    python results/lifelong_frozen/protected_overlap.py [encore protect protect10]

Reads OUT/METHOD.json (rows with ``known_ok``) and the protected records 9,000-9,999 of
counterfact_train_10000.json; prints the retention of the known facts whose subject is not
protected and the count kept among those whose subject is.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data" / "counterfact" / "counterfact_train_10000.json"

protected = {r["subject"] for r in json.loads(DATA.read_text())[9000:10000]}
for method in sys.argv[1:] or ["encore", "protect", "protect10"]:
    state = json.loads((HERE / f"{method}.json").read_text())
    subjects = state["known"]["subjects"]
    for row in state["rows"]:
        if not row["edits"]:
            continue
        pairs = list(zip(row["known_ok"], subjects))
        others = [ok for ok, s in pairs if s not in protected]
        inside = [ok for ok, s in pairs if s in protected]
        print(f"{method} {row['edits']}: subjects not protected {100 * sum(others) / len(others):.1f} % of "
              f"{len(others)}; subjects protected {sum(inside)} of {len(inside)} kept")
