"""A deploy's report: ``report.md`` and a self-contained ``report.html`` (the frontier plot embedded as PNG)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from .calibrate import Calibration
from .search import MB, SearchResult


def frontier_plot(result: SearchResult, path: Path) -> Path:
    """Held-out perplexity vs parameters for every candidate; frontier joined, chosen point and budgets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = result.candidates
    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=110)
    ok = [c for c in cands if c.feasible]
    bad = [c for c in cands if not c.feasible]
    ax.scatter([c.params / 1e6 for c in ok], [c.ppl for c in ok], s=26, color="tab:blue",
               label="meets every budget", zorder=3)
    ax.scatter([c.params / 1e6 for c in bad], [c.ppl for c in bad], s=26, facecolors="none",
               edgecolors="tab:gray", label="breaks a budget", zorder=3)
    front = sorted((c for c in cands if c.frontier), key=lambda c: c.params)
    ax.plot([c.params / 1e6 for c in front], [c.ppl for c in front], color="tab:blue", lw=1, alpha=0.6,
            label="accuracy–efficiency frontier")
    # Each budget, mapped onto the parameter axis: the largest candidate that still meets it.
    colors = {"max_file_mb": "tab:red", "max_memory_mb": "tab:purple", "min_decode_tok_s": "tab:orange"}
    for name, limit in zip(result.target["budgets_set"],
                           [result.target["budgets"][b] for b in result.target["budgets_set"]]):
        meets = [c.params for c in cands if name not in c.breaks]
        if meets and len(meets) < len(cands):
            ax.axvline(max(meets) / 1e6, color=colors[name], ls="--", lw=1.2,
                       label=f"{name} = {limit:g} (largest shape within it)")
        elif not meets:
            ax.text(0.02, 0.02 + 0.05 * list(colors).index(name), f"no shape meets {name} = {limit:g}",
                    transform=ax.transAxes, color=colors[name])
    best = result.best or (result.candidates[result.closest] if result.closest is not None else None)
    if best is not None:
        ax.scatter([best.params / 1e6], [best.ppl], s=180, marker="*", color="gold", edgecolors="black",
                   zorder=4, label=f"{'chosen' if result.best else 'closest'}: {best.name}")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(f"held-out perplexity ({result.eval_tokens} tokens)")
    ax.set_yscale("log")
    # Budgets no candidate breaks have no line to draw; the title still states every one.
    budgets = ", ".join(f"{b} {'≤' if b.startswith('max') else '≥'} {result.target['budgets'][b]:g}"
                        for b in result.target["budgets_set"])
    ax.set_title(f"{result.target['name']}: {result.target['backend']}/{result.target['quant']}"
                 + (f"\nbudgets: {budgets}" if budgets else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _rows_md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _rows_html(header: list[str], rows: list[list[str]], mark: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    chosen = ' class="chosen"'
    body = "".join(f"<tr{chosen if i == mark else ''}>" + "".join(f"<td>{html.escape(c)}</td>" for c in r)
                   + "</tr>" for i, r in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_tables(dep, summary: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]], int | None]]:
    from .pipeline import STAGES, stage_dir

    out = dep.out
    result = dep.search_result()
    best = result.best
    stages = dep.manifest["stages"]
    timing = [[s, f"{stages.get(s, {}).get('seconds', 0):.1f}" if s != "report" else "(this stage)",
               stage_dir(out, s).name] for s in STAGES]
    validation = json.loads((stage_dir(out, "validate") / "validation.json").read_text())
    checks = {c["metric"]: c for c in validation["checks"]}
    val_rows = [[k, f"{v:.6g}", (f"{'≥' if checks[k]['bound'] == 'min' else '≤'} {checks[k]['threshold']:g}"
                                 if k in checks else "—"),
                 ("ok" if checks[k]["passed"] else "FAILED") if k in checks else ""]
                for k, v in validation["metrics"].items()]
    bench = json.loads((stage_dir(out, "bench") / "bench.json").read_text())
    m = bench["metrics"]
    bench_rows = [[name, f"{m[name]['median']:.4g}", f"{m[name]['min']:.4g}", f"{m[name]['max']:.4g}"]
                  for name in ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_gb")]
    pred_rows = [
        ["file size (MB)", f"{summary['predicted_file_bytes'] / MB:.3f}", f"{summary['file_bytes'] / MB:.3f}",
         f"{100 * summary['size_pred_err']:.2f} %", _limit(result, "max_file_mb")],
        ["decode (tok/s)", f"{summary['predicted_decode_tok_s']:.1f}", f"{summary['decode_tok_s']:.1f}",
         f"{100 * summary['speed_pred_err']:.1f} %", _limit(result, "min_decode_tok_s")],
        ["memory (MB)", f"{summary['predicted_memory_bytes'] / MB:.1f}",
         f"{summary['bench_peak_rss_bytes'] / MB:.1f} (bench, {BENCH_CTX} tokens)", "—",
         _limit(result, "max_memory_mb")],
    ]
    ranked = sorted(result.candidates, key=lambda c: c.params, reverse=True)
    cand_rows = [[c.name, f"{c.params:,}", f"{c.ppl:.3f}", f"{c.file_bytes / MB:.2f}", f"{c.memory_bytes / MB:.1f}",
                  f"{c.decode_tok_s:.1f}", "chosen" if c is best else ("ok" if c.feasible else
                                                                          "breaks " + ", ".join(c.breaks)),
                  "yes" if c.frontier else ""] for c in ranked]
    return {
        "Predicted vs measured (deployed artifact)": (["quantity", "predicted", "measured", "error", "budget"],
                                                      pred_rows, None),
        "Stage timings": (["stage", "seconds", "folder"], timing, None),
        "Validation against the PyTorch subnet": (["metric", "value", "gate", ""], val_rows, None),
        "Benchmark (median of fresh processes)": (["metric", "median", "min", "max"], bench_rows, None),
        "Candidates": (["shape", "params", "held-out ppl", "file MB (pred)", "memory MB (pred)", "tok/s (pred)",
                        "status", "frontier"], cand_rows, ranked.index(best) if best in ranked else None),
    }


BENCH_CTX = 80  # prompt + new tokens of the deploy bench (pipeline.BENCH_PROMPT + BENCH_NEW)


def _limit(result: SearchResult, name: str) -> str:
    value = result.target["budgets"].get(name)
    return "—" if value is None else f"{'≤' if name.startswith('max') else '≥'} {value:g}"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1000px;margin:2em auto;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr.chosen td{background:#fff3b0;
font-weight:600}img{max-width:100%;border:1px solid #eee}.meta{color:#555;font-size:.9em}code{background:#f5f5f5}"""


def write_report(dep, folder: Path, summary: dict[str, Any]) -> None:
    result = dep.search_result()
    best = result.best
    png = frontier_plot(result, folder / "frontier.png")
    tables = report_tables(dep, summary)
    profile = dep.profile
    cal_line = Calibration.from_dict(result.calibration).describe() + (
        " Its error on the deployed artifact is in the table above.")
    about = f" ({profile.description})" if profile.description else ""
    head = (f"Target **{profile.name}**{about}: {profile.backend}/{profile.quant}, "
            f"{profile.threads} threads, context {profile.context_length}. Source `{dep.source}`. "
            f"Chosen shape **{best.name}** ({best.params:,} parameters, held-out perplexity {best.ppl:.3f}) — "
            f"the most accurate of {len(result.candidates)} candidates that meets every budget.")
    md = [f"# Deploy report: {profile.name}", "", head, "", "![frontier](frontier.png)", ""]
    for title, (header, rows, _) in tables.items():
        md += [f"## {title}", "", _rows_md(header, rows), ""]
        if title.startswith("Predicted"):
            md += [cal_line, ""]
    (folder / "report.md").write_text("\n".join(md))

    def bold(text: str) -> str:
        import re

        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", re.sub(r"`(.+?)`", r"<code>\1</code>", html.escape(text)))

    img = base64.b64encode(png.read_bytes()).decode()
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Deploy report: "
             f"{html.escape(profile.name)}</title><style>{CSS}</style></head><body>",
             f"<h1>Deploy report: {html.escape(profile.name)}</h1><p>{bold(head)}</p>",
             f"<img id=\"frontier\" alt=\"frontier plot\" src=\"data:image/png;base64,{img}\">"]
    for title, (header, rows, mark) in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>{_rows_html(header, rows, mark)}")
        if title.startswith("Predicted"):
            parts.append(f"<p class=\"meta\">{html.escape(cal_line)}</p>")
    parts.append("</body></html>")
    (folder / "report.html").write_text("".join(parts))
