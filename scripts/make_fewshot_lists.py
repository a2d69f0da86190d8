"""Regenerate apt_lab/data/fewshot/<dataset>.json, the fixed few-shot draws shipped with apt_lab.

Usage: python scripts/make_fewshot_lists.py [--out DIR]

The procedure is `apt_lab.data.draws.fixed_draw` (documented there and in docs/data.md); the train
counts are `apt_lab.data.draws.TRAIN_COUNTS`, plus the bundled demo set counted from disk.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt_lab.data import list_categories, load_dataset  # noqa: E402
from apt_lab.data.draws import FEWSHOT_DIR, TRAIN_COUNTS, fixed_table  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FEWSHOT_DIR)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = dict(TRAIN_COUNTS)
    counts["demo"] = {c: len(load_dataset("demo", category=c).train)
                      for c in list_categories("demo")}
    for name, table in counts.items():
        path = args.out / f"{name}.json"
        text = json.dumps(fixed_table(name, table), indent=1)
        text = re.sub(r"\[\s*([^\[\]]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]",
                      text)                                       # one line per list of positions
        path.write_text(text + "\n")
        print(f"wrote {path} ({len(table)} categories)")


if __name__ == "__main__":
    main()
