"""From results.jsonl alone: the best learning rate per point, mqar.png (accuracy vs decode-state bytes, log x, one
colour per mixer family, the frontier drawn) and mqar.md (the same points as a markdown table)."""
from __future__ import annotations

from pathlib import Path

from seqmix.synthetics.sweep import KEY_FIELDS

AXES = (("state_bytes", "decode state per sequence, bytes (seqmix Mixer.state_bytes, fp32)"),
        ("state_bytes_zoology", "state, bytes (zoology's formulas, fp32)"))


def best_per_point(records: list[dict]) -> list[dict]:
    """One record per point (every key field but lr equal): the lr with the highest final accuracy."""
    best: dict[tuple, dict] = {}
    for r in records:
        point = tuple(str(r.get(k)) for k in KEY_FIELDS if k != "lr")
        if point not in best or r["accuracy"] > best[point]["accuracy"]:
            best[point] = r
    return sorted(best.values(), key=lambda r: (r["family"], r["state_bytes"], r["d_model"]))


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left frontier: the points no other point beats with less or equal state, by increasing x."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out


def draw(records: list[dict], path: Path, title: str = "MQAR: accuracy vs state size") -> Path:
    """Write the figure to `path` (PNG); needs matplotlib (`pip install 'seqmix[synthetics]'`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("drawing mqar.png needs matplotlib: pip install 'seqmix[synthetics]'") from None
    pts = best_per_point(records)
    families = sorted({r["family"] for r in pts})
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, (field, label) in zip(axes, AXES):
        xy = [(r[field], r["accuracy"]) for r in pts if r.get(field)]
        for f in families:
            sel = [(r[field], r["accuracy"]) for r in pts if r["family"] == f and r.get(field)]
            if sel:
                ax.scatter(*zip(*sel), s=36, color=colours[f], label=f, zorder=3, edgecolors="black",
                           linewidths=0.4)
        if xy:
            fx, fy = zip(*frontier(xy))
            ax.step(fx, fy, where="post", color="black", linestyle="--", linewidth=1, label="frontier", zorder=2)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("MQAR accuracy (best lr per point)")
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def _b(n) -> str:
    return "n/a" if n is None else f"{n:,}"


def table(records: list[dict]) -> str:
    """Markdown: provenance (devices, dates, commands), then one row per point, best lr."""
    pts = best_per_point(records)
    if not pts:
        return "(no results)\n"
    segs = list(pts[0]["accuracy_per_segment"])
    devices = sorted({r.get("device", "?") for r in records})
    dates = sorted(r.get("finished_at", "") for r in records)
    commands = sorted({r.get("command", "") for r in records} - {""})
    lines = [f"Runs: {len(records)} ({len(pts)} points, best lr of each shown); device: {', '.join(devices)}; "
             f"finished {dates[0]} .. {dates[-1]}.", ""]
    lines += [f"Command: `{c}`" for c in commands] + [""]
    head = ["family", "spec", "d_model", "best lr", "epochs run", "state bytes (seqmix)", "state bytes (zoology)",
            "accuracy", *segs]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for r in pts:
        row = [r["family"], f"`{r['spec']}`", str(r["d_model"]), f"{r['lr']:g}",
               f"{r['epochs_run']}/{r['epochs']}", _b(r["state_bytes"]), _b(r.get("state_bytes_zoology")),
               f"{r['accuracy']:.3f}", *[f"{r['accuracy_per_segment'].get(s, float('nan')):.3f}" for s in segs]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, records: list[dict]) -> tuple[Path, Path]:
    """mqar.md and mqar.png in `out` (the table first: it needs no matplotlib)."""
    out = Path(out)
    md = out / "mqar.md"
    tmp = out / ".mqar.md.tmp"
    tmp.write_text(table(records))
    tmp.replace(md)
    return md, draw(records, out / "mqar.png")
