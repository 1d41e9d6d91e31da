"""The README's picture of one round: ``.venv/bin/python docs/figures/round.py`` writes
docs/figures/round.png (matplotlib, no data: the boxes say what the code does)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

SERVER = (
    "Server (Flower ServerApp)\n"
    "samples clients  ·  asks each for the experts its device can train\n"
    "checks every reply whole  ·  folds it into running sums  ·  evaluates"
)
#: (tier, what its device allows, experts it trains of the 24; the shipped hfedmoe.toml's)
TIERS = [
    ("phone", "890 MiB", 4),
    ("laptop", "1 GiB, 8 s deadline", 10),
    ("workstation", "2 GiB", 24),
]


def box(ax, x, y, w, h, text, color, size=9):
    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#333333", lw=1.0)
    )
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def arrow(ax, start, end, text, color, side):
    ax.add_patch(
        FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color=color, lw=1.6)
    )
    mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
    ax.text(
        mx + side,
        my,
        text,
        ha="left" if side > 0 else "right",
        va="center",
        fontsize=7.5,
        color=color,
    )


def main() -> None:
    fig, ax = plt.subplots(figsize=(10, 5.2))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 5.2)
    ax.axis("off")
    box(ax, 1.5, 3.9, 7.0, 1.05, SERVER, "#dbe9f6", size=9.5)
    for i, (tier, device, experts) in enumerate(TIERS):
        x = 0.3 + i * 3.3
        text = f"client on a {tier}\n{device}\ntrains {experts} of 24 experts\n(the rest frozen)"
        box(ax, x, 0.35, 2.9, 1.35, text, "#fdf0d5")
        # one experts bar: trained experts filled
        for e in range(24):
            ax.add_patch(
                plt.Rectangle(
                    (x + 0.1 + e * 0.112, 0.12),
                    0.09,
                    0.16,
                    fc="#d9822b" if e < experts else "#e8e8e8",
                    ec="none",
                )
            )
        cx = x + 1.45
        first = i == 0  # the first pair says what travels; the others are the same
        down = "global weights" if first else ""
        up = "its trained experts,\nrouters, shared layers\n+ usage statistics" if first else ""
        arrow(ax, (cx - 0.35, 3.85), (cx - 0.35, 1.78), down, "#2b6cb0", -0.08)
        arrow(ax, (cx + 0.35, 1.78), (cx + 0.35, 3.85), up, "#b7472a", 0.08)
    ax.text(5.0, 5.1, "One round of hfedmoe", ha="center", va="center", fontsize=12, weight="bold")
    out = Path(__file__).with_name("round.png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
