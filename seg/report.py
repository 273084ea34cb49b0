"""Evaluation report: per-case CSV, summary JSON, contour pictures, box plots and a static index.html.

Every file is written atomically (``seg.files.write_bytes_atomic``: a temporary in the same folder,
then ``os.replace``), so a reader never sees half a report file. The HTML uses relative links only
and no external assets.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from seg.files import write_bytes_atomic  # noqa: E402
from seg.metrics import HIGHER_IS_BETTER, MetricAccumulator, SurfaceDistances  # noqa: E402

REF_COLOUR, PRED_COLOUR = "#00e676", "#ff1744"  # green reference, red prediction
CASE_CSV, SUMMARY_JSON, INDEX_HTML = "metrics_per_case.csv", "summary.json", "index.html"


# ---------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------
def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Renders a matplotlib figure to PNG in memory, writes it atomically and closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# CSV / JSON
# ---------------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.6g}")


def write_case_csv(path: Path, acc: MetricAccumulator, class_names: Mapping[int, str]) -> Path:
    """One row per (case, label): case, label, class, then one column per metric."""
    metrics = acc.metrics()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "label", "class", *metrics])
    for case, label, values in acc.rows():
        w.writerow([case, label, class_names.get(label, str(label)), *(_fmt(values[m]) for m in metrics)])
    return write_bytes_atomic(path, buf.getvalue())


def _json_number(x: float) -> float | str:
    """JSON has no NaN/inf: write them as the strings "nan", "inf"."""
    return x if math.isfinite(x) else _fmt(x)


def build_summary(acc: MetricAccumulator, class_names: Mapping[int, str], options: Mapping[str, Any],
                  spacing_note: str = "") -> dict[str, Any]:
    """Summary dict: ``classes[name][metric] = {mean, std, median, n}`` plus the run settings."""
    classes = {}
    for label, per_metric in acc.summary().items():
        entry: dict[str, Any] = {"label": label}
        for metric, stats in per_metric.items():
            entry[metric] = {k: (int(v) if k == "n" else _json_number(v)) for k, v in stats.items()}
        classes[class_names.get(label, str(label))] = entry
    return {"n_cases": len(acc.cases), "cases": list(acc.cases), "metrics": acc.metrics(),
            "options": dict(options), "classes": classes, "note": spacing_note}


def write_summary_json(path: Path, summary: Mapping[str, Any]) -> Path:
    return write_bytes_atomic(path, json.dumps(summary, indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------
def worst_slices(distances: Mapping[int, SurfaceDistances | None], shape: Sequence[int], k: int) -> list[int]:
    """Indices along the last axis of the ``k`` slices with the largest boundary distance (any label).

    Args:
        distances: per label, the edge voxels and their distances to the other mask's edge.
        shape: (*spatial) shape of the case (3D; a 2D case has no slices to choose).
        k: how many slices.
    """
    worst = np.zeros(shape[-1])
    total = np.zeros(shape[-1])
    for sd in distances.values():
        if sd is None:
            continue
        for coords, dist in ((sd.pred_coords, sd.pred_to_ref), (sd.ref_coords, sd.ref_to_pred)):
            d = np.where(np.isfinite(dist), dist, 1e9)
            np.maximum.at(worst, coords[:, -1], d)
            np.add.at(total, coords[:, -1], np.minimum(d, 1e3))
    order = np.lexsort((-total, -worst))  # worst max distance first, then largest summed distance
    return sorted(int(i) for i in order[:k])


def _draw_panel(ax: plt.Axes, background: np.ndarray, pred: np.ndarray, ref: np.ndarray,
                labels: Sequence[int], aspect: float) -> None:
    """Draws one 2D slice (arrays indexed (x, y); x to the right, y down) with both contours."""
    lo, hi = np.percentile(background, [0.5, 99.5]) if background.size else (0, 1)
    ax.imshow(background.T, cmap="gray", origin="upper", vmin=lo, vmax=max(hi, lo + 1e-6),
              aspect=aspect, interpolation="nearest")
    for lab in labels:
        for mask, colour, style in ((ref, REF_COLOUR, "solid"), (pred, PRED_COLOUR, "dashed")):
            m = (mask == lab).T.astype(float)
            if 0 < m.sum() < m.size:
                ax.contour(m, levels=[0.5], colors=[colour], linewidths=1.2, linestyles=style)
    ax.set_xticks([])
    ax.set_yticks([])


def case_figure(path: Path, case: str, background: np.ndarray, pred: np.ndarray, ref: np.ndarray,
                spacing: Sequence[float], labels: Sequence[int],
                distances: Mapping[int, SurfaceDistances | None], num_slices: int = 3) -> Path:
    """PNG of the slices (last axis) with the worst boundary error, or of the whole 2D case.

    Args:
        background: (*spatial) image (or the reference label map when there is no image).
        pred, ref: (*spatial) label maps.
        spacing: per-axis voxel size, for the aspect ratio.
    """
    aspect = spacing[1] / spacing[0]
    if pred.ndim == 2:
        panels = [(None, background, pred, ref)]
    else:
        panels = [(z, background[..., z], pred[..., z], ref[..., z])
                  for z in worst_slices(distances, pred.shape, num_slices)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for ax, (z, bg, p, r) in zip(axes[0], panels):
        _draw_panel(ax, bg, p, r, labels, aspect)
        ax.set_title(case if z is None else f"{case}  slice {z}", fontsize=9)
    handles = [Line2D([], [], color=REF_COLOUR, lw=2, label="reference"),
               Line2D([], [], color=PRED_COLOUR, lw=2, ls="--", label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    fig.subplots_adjust(bottom=0.1)
    return save_figure(fig, path)


def box_plots(out_dir: Path, acc: MetricAccumulator, class_names: Mapping[int, str]) -> dict[str, str]:
    """One box plot per metric (a box per class, finite values only). Returns {metric: file name}."""
    files = {}
    labels = acc.labels()
    for metric in acc.metrics():
        data = [acc.values(lab, metric) for lab in labels]
        data = [v[np.isfinite(v)] for v in data]
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(labels), 3.4))
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), [class_names.get(lab, str(lab)) for lab in labels],
                      rotation=30, ha="right")
        better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
        ax.set_title(f"{metric} ({better} is better)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        name = f"boxplot_{metric}.png"
        save_figure(fig, out_dir / name)
        files[metric] = name
    return files


# ---------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------
_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f0f0f0}td.l,th.l{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:4px}.plots img{max-height:300px}"""


def _cell(x: Any, left: bool = False) -> str:
    return f"<td{' class=l' if left else ''}>{html.escape(str(x))}</td>"


def _summary_table(summary: Mapping[str, Any], metrics: Sequence[str]) -> str:
    head = "<tr><th class=l>class</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in metrics) + "</tr>"
    rows = []
    for name, entry in summary["classes"].items():
        cells = []
        for m in metrics:
            s = entry[m]
            text = "–" if s["n"] == 0 else f"{_num(s['mean'])} ± {_num(s['std'])} (median {_num(s['median'])})"
            cells.append(_cell(text))
        rows.append(f"<tr>{_cell(name, True)}{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _num(x: float | str) -> str:
    return x if isinstance(x, str) else f"{x:.4g}"


def _case_table(acc: MetricAccumulator, class_names: Mapping[int, str], pictures: Mapping[str, str]) -> str:
    metrics = acc.metrics()
    head = ("<tr><th class=l>case</th><th class=l>class</th>"
            + "".join(f"<th>{html.escape(m)}</th>" for m in metrics) + "</tr>")
    rows = []
    for case, label, values in acc.rows():
        link = pictures.get(case)
        name = f'<a href="{html.escape(link)}">{html.escape(case)}</a>' if link else html.escape(case)
        rows.append(f"<tr><td class=l>{name}</td>{_cell(class_names.get(label, label), True)}"
                    + "".join(_cell(_fmt(values[m])) for m in metrics) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def write_index_html(out_dir: Path, summary: Mapping[str, Any], acc: MetricAccumulator,
                     class_names: Mapping[int, str], boxplots: Mapping[str, str],
                     pictures: Mapping[str, str]) -> Path:
    """index.html with the summary table, box plots, the per-case table and the case pictures."""
    metrics = acc.metrics()
    opts = ", ".join(f"{k} = {v}" for k, v in summary["options"].items())
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>Segmentation evaluation</title><style>{_CSS}</style></head><body>",
        f"<h1>Segmentation evaluation</h1><p>{summary['n_cases']} cases. Options: {html.escape(opts)}. "
        f'Files: <a href="{CASE_CSV}">{CASE_CSV}</a>, <a href="{SUMMARY_JSON}">{SUMMARY_JSON}</a>. '
        "Definitions: docs/metrics.md (NaN: both masks empty, left out of the means; inf: one empty).</p>",
        "<h2>Summary (mean ± std, median)</h2>", _summary_table(summary, metrics),
        "<h2>Distributions</h2><div class=plots>",
        *(f'<a href="{f}"><img src="{f}" alt="{html.escape(m)}"></a>' for m, f in boxplots.items()),
        "</div><h2>Per case</h2>", _case_table(acc, class_names, pictures),
        "<h2>Worst boundary slices</h2>",
        "<p>Reference contour green (solid), prediction red (dashed).</p>",
        *(f'<h3 id="{html.escape(c)}">{html.escape(c)}</h3><img src="{html.escape(f)}" alt="{html.escape(c)}">'
          for c, f in pictures.items()),
        "</body></html>\n",
    ]
    return write_bytes_atomic(out_dir / INDEX_HTML, "\n".join(parts))
