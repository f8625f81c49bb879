"""The subspace measurement's files: JSON (everything), a markdown table and a PNG bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fewshot.io import atomic_write, write_json

__all__ = ["PAPER", "markdown_table", "plot_pairs", "write_report"]

PAPER = {"a_i": 31.98, "concat": 38.56, "possible": 64, "setting": "MNIST, 4-layer 32-channel CNN, 6 layer pairs"}


def _f(value: float) -> str:
    return f"{value:.2f}"


def markdown_table(report: dict[str, Any]) -> str:
    """Per pair: dims, mean canonical correlations, effective ranks (with their bounds); then the means."""
    lines = [
        "| pair | Z dims | r_z | rho_z | rho_y | erank Â_i | erank Â_j | erank [Â_i; Â_j] | chance stack "
        "| bound Â / stack |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["pairs"]:
        lines.append(
            f"| {p['i']}-{p['j']} | {p['z_dims'][0]}, {p['z_dims'][1]} | {p['r_z']} | {_f(p['rho_z'])} | "
            f"{_f(p['rho_y'])} | {_f(p['a_i'])} | {_f(p['a_j'])} | {_f(p['concat'])} | "
            f"{_f(p['concat_chance'])} | {p['a_max']} / {p['concat_max']} |"
        )
    lines.append("")
    lines.append("| mean over | pairs | erank Â_i | erank [Â_i; Â_j] | chance stack | bound Â / stack |")
    lines.append("|---|---|---|---|---|---|")
    for key, label in (("all_pairs", "all pairs"), ("without_layer_1", "pairs without layer 1")):
        s = report["summary"][key]
        if s["pairs"]:
            lines.append(
                f"| {label} | {s['pairs']} | {_f(s['a_i'])} | {_f(s['concat'])} | {_f(s['concat_chance'])} | "
                f"{s['a_max']:.1f} / {s['concat_max']:.1f} |"
            )
    lines.append(f"| paper (Sec. 3.2, {PAPER['setting']}) | 6 | {PAPER['a_i']} | {PAPER['concat']} | - | 32 / 64 |")
    return "\n".join(lines) + "\n"


def plot_pairs(report: dict[str, Any], path: Path) -> None:
    """Bars of erank(Â_i) and erank([Â_i; Â_j]) per pair, their bounds as outlines, the paper's means as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = report["pairs"]
    x = range(len(pairs))
    fig, ax = plt.subplots(figsize=(1.2 * len(pairs) + 3, 3.6))
    ax.bar([i - 0.2 for i in x], [p["a_max"] for p in pairs], 0.4, fill=False, edgecolor="0.6", linestyle="--")
    ax.bar([i + 0.2 for i in x], [p["concat_max"] for p in pairs], 0.4, fill=False, edgecolor="0.6", linestyle="--")
    ax.bar([i - 0.2 for i in x], [p["a_i"] for p in pairs], 0.4, label="erank Â_i", color="tab:blue")
    ax.bar([i + 0.2 for i in x], [p["concat"] for p in pairs], 0.4, label="erank [Â_i; Â_j]", color="tab:orange")
    ax.scatter(
        [i + 0.2 for i in x],
        [p["concat_chance"] for p in pairs],
        color="k",
        marker="_",
        s=200,
        zorder=3,
        label="stack, random row space (chance)",
    )
    ax.axhline(PAPER["a_i"], color="tab:blue", linestyle=":", label=f"paper mean Â_i ({PAPER['a_i']})")
    ax.axhline(PAPER["concat"], color="tab:orange", linestyle=":", label=f"paper mean stack ({PAPER['concat']})")
    ax.set_xticks(list(x), [f"{p['i']}-{p['j']}" for p in pairs])
    ax.set_xlabel("layer pair (dashed outline: largest possible value)")
    ax.set_ylabel("effective rank (Roy & Vetterli)")
    cfg = report["config"]
    ax.set_title(f"Aligned coefficients: {cfg['dataset']}, conv4 width {cfg['width']}, m={cfg['atoms']}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


def write_report(report: dict[str, Any], out: str | Path) -> list[Path]:
    """``<out>.json``, ``<out>.md`` and ``<out>.png`` (``out`` without suffix); returns the paths."""
    base = Path(out)
    base = base.with_suffix("") if base.suffix in (".json", ".md", ".png") else base
    paths = [base.with_suffix(".json"), base.with_suffix(".md"), base.with_suffix(".png")]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    write_json(paths[0], report)
    atomic_write(paths[1], lambda f: f.write(markdown_table(report)))
    plot_pairs(report, paths[2])
    return paths
