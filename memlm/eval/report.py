"""The report of ``memlm experiment``: markdown tables and PNG plots from ``results.json``.

Tables per benchmark: the main comparison (EM seen / unseen, hit rate, EM given hit / miss, edits, deletion
leak (all, and unseen entities' alone), held-out perplexity, decode speed with ratios to dense and RAG), the
low-data sweep with each design's ratio to dense, the bank-size sweep. Plots: accuracy vs training-data share;
accuracy vs decode speed; accuracy and latency vs bank size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memlm.utils.io import atomic_path

NAMES = {"none": "dense"}


def _name(design: str) -> str:
    return NAMES.get(design, design)


def _get(d: dict, *path: str, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def main_table(bench: dict[str, dict]) -> list[str]:
    dense_speed = _get(bench, "none", "train", "decode_tok_s_b16")
    rag_speed = _get(bench, "rag", "train", "decode_tok_s_b16")
    lines = [
        "| design | EM seen | EM unseen | hit rate | EM given hit | EM given miss | edit: new value | edit: others kept "
        "| delete: leak | leak, unseen entities | held-out ppl | decode tok/s (b16) | vs dense | vs RAG |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for design, cells in bench.items():
        c = cells.get("train", {})
        r = _get(c, "qa_unseen", "retrieval") or {}
        speed = c.get("decode_tok_s_b16")
        lines.append(
            f"| {_name(design)} | {_fmt(_get(c, 'qa_seen', 'em'))} | {_fmt(_get(c, 'qa_unseen', 'em'))} "
            f"| {_fmt(r.get('hit_rate'))} | {_fmt(r.get('em_given_hit'))} | {_fmt(r.get('em_given_miss'))} "
            f"| {_fmt(_get(c, 'edit', 'new_value_rate'))} | {_fmt(_get(c, 'edit', 'others_unchanged'))} "
            f"| {_fmt(_get(c, 'delete', 'leak'))} | {_fmt(_get(c, 'delete', 'leak_by_entity', 'unseen', 'leak'))} "
            f"| {_fmt(_get(c, 'perplexity_heldout', 'ppl'), '.2f')} "
            f"| {_fmt(speed, ',.0f')} | {_fmt(speed / dense_speed if speed and dense_speed else None, '.2f')} "
            f"| {_fmt(speed / rag_speed if speed and rag_speed else None, '.2f')} |"
        )
    return lines


def low_data(bench: dict[str, dict]) -> tuple[list[int], dict[str, list[float | None]]]:
    shares = sorted({int(k[4:]) for cells in bench.values() for k in cells if k.startswith("low_")})
    return shares, {
        d: [_get(cells, f"low_{p}", "qa_all", "em") for p in shares] for d, cells in bench.items()
    }


def low_data_table(bench: dict[str, dict]) -> list[str]:
    shares, em = low_data(bench)
    if not shares:
        return []
    dense = em.get("none", [None] * len(shares))
    head = " | ".join(f"{p}%" for p in shares)
    lines = [f"| design | {head} | " + " | ".join(f"vs dense at {p}%" for p in shares) + " |"]
    lines.append("| --- |" + " ---: |" * (2 * len(shares)))
    for d, row in em.items():
        ratios = [(v / b if v is not None and b else None) for v, b in zip(row, dense)]
        lines.append(
            f"| {_name(d)} | " + " | ".join(_fmt(v) for v in row) + " | "
            + " | ".join(_fmt(r, ".2f") + ("x" if r is not None else "") for r in ratios) + " |"
        )  # fmt: skip
    return lines


def bank_sizes(bench: dict[str, dict]) -> dict[str, list[tuple[int, float, float, int]]]:
    """design -> [(multiple, EM unseen, seconds per question, entries)], the 1x point first."""
    out = {}
    for d, cells in bench.items():
        pts = []
        if "bank_x1" not in cells and _get(cells, "train", "qa_unseen", "em") is not None:
            base = cells["train"]
            pts.append((1, base["qa_unseen"]["em"], None, None))
        for k, c in cells.items():
            if k.startswith("bank_x"):
                pts.append((int(k[6:]), c["qa_unseen"]["em"], c["seconds_per_question"], c["entries"]))
        if len(pts) > 1:
            out[d] = sorted(pts)
    return out


def bank_size_table(bench: dict[str, dict]) -> list[str]:
    sizes = bank_sizes(bench)
    if not sizes:
        return []
    lines = ["| design | bank | entries | EM unseen | s / question |", "| --- | ---: | ---: | ---: | ---: |"]
    for d, pts in sizes.items():
        for m, em, sec, n in pts:
            lines.append(f"| {_name(d)} | {m}x | {_fmt(n, ',')} | {_fmt(em)} | {_fmt(sec, '.4f')} |")
    return lines


def write_report(results: dict, out_dir: str | os.PathLike) -> Path:
    """``report.md`` and ``plots/*.png`` under ``out_dir``; returns the markdown path."""
    out = Path(out_dir)
    lines = ["# memlm experiment", ""]
    cfg = results.get("config", {})
    lines += [
        f"Designs: {', '.join(_name(d) for d in results['designs'])}."
        + (f" Not registered here (left out): {', '.join(results['not_registered'])}." if results.get("not_registered") else ""),
        f"Backbone: {cfg.get('model') or 'defaults'}; training: {cfg.get('train') or 'defaults'}; "
        f"questions per split: {cfg.get('eval_questions') or 'all'} (held-out templates, greedy, exact match).",
        "",
    ]  # fmt: skip
    plots = out / "plots"
    for name, bench in results["benchmarks"].items():
        lines += [f"## {name}", "", *main_table(bench), ""]
        low = low_data_table(bench)
        if low:
            lines += [
                f"### {name}: low data (EM on every entity's questions; training text covers P%)",
                "",
                *low,
                "",
            ]
        sizes = bank_size_table(bench)
        left_out = results.get("left_out", {}).get(name, [])
        if sizes or left_out:
            lines += [
                f"### {name}: bank size (unseen questions; bank padded with distractors)",
                "",
                *sizes,
                "",
                *(line for why in left_out for line in (f"Left out: {why}.", "")),
            ]
        for png in _plots(name, bench, plots):
            lines += [f"![{png.stem}](plots/{png.name})", ""]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return path


def _plots(name: str, bench: dict[str, dict], plots: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    made = []
    shares, em = low_data(bench)
    if shares:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for d, row in em.items():
            pts = [(p, v) for p, v in zip(shares, row) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=_name(d))
        ax.set(
            xscale="log", xlabel="training text covers % of entities", ylabel="EM (all questions)", title=name
        )
        ax.legend(fontsize=8)
        made.append(_save(fig, plots / f"{name}_low_data.png"))
    pts = [
        (_name(d), c["train"]["decode_tok_s_b16"], _get(c, "train", "qa_unseen", "em"))
        for d, c in bench.items()
        if _get(c, "train", "decode_tok_s_b16") is not None
    ]
    if pts:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, x, y in pts:
            ax.scatter(x, y)
            ax.annotate(label, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="decode tokens/s (batch 16, retrieval included)", ylabel="EM unseen", title=name)
        made.append(_save(fig, plots / f"{name}_accuracy_vs_speed.png"))
    sizes = bank_sizes(bench)
    if sizes:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        for d, pts in sizes.items():
            a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_name(d))
            timed = [p for p in pts if p[2] is not None]
            a2.plot([p[0] for p in timed], [p[2] for p in timed], marker="o", label=_name(d))
        a1.set(xscale="log", xlabel="bank size (x the benchmark's entries)", ylabel="EM unseen", title=name)
        a2.set(xscale="log", xlabel="bank size (x)", ylabel="seconds per question", title=name)
        a1.legend(fontsize=8)
        made.append(_save(fig, plots / f"{name}_bank_size.png"))
    return made


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
