"""Print the shipped examples' before/after table (markdown) from each <task>/prefix.json training summary.

Usage: python prefixes/examples/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHAT = {
    "sentiment": "review -> exactly `positive` / `negative`",
    "booking": "table request -> one line of JSON, fixed keys",
}


def main() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(HERE.glob("*/prefix.json"))]
    print("| task | what the prefix does | train / held-out | virtual tokens | steps "
          "| held-out exact match: base model | with the prefix | time: training / whole command |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for s in rows:
        total = f"{s['command_seconds']:.0f} s" if "command_seconds" in s else "-"
        print(
            f"| `{s['task_id']}` | {WHAT.get(s['task_id'], '')} | {s['num_train']} / {s['num_eval']} "
            f"| {s['num_virtual_tokens']} | {s['num_steps']} | {s['eval_before']:.0%} | {s['eval_after']:.0%} "
            f"| {s['train_seconds']:.0f} s / {total} |"
        )


if __name__ == "__main__":
    main()
