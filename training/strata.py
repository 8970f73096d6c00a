"""Per-lesion strata and highlighted cases of an evaluation (``report.json`` ``strata``,
``highlights``; sections of ``report.md``).

A mean over all images hides where a model fails. :func:`training.evaluate.evaluate` therefore
keeps one record per truth lesion (:func:`training.metrics.lesions`: size, coverage, share of the
outline on the organ's edge) and one count total per image, and this module groups them:

- **location**: ``inside`` (no outline pixel on the organ's edge), ``touching`` (under a third
  of the outline on the edge), ``edge`` (a third or more: a nodule bulging the outline, filling a
  pole or as wide as the lobe);
- **size**: terciles of the lesions' equivalent diameters in this data set;
- **counts**: terciles of the images' total counts (low counts = noisy images).

Each stratum gives lesions, found (at least half covered, :data:`training.metrics.MIN_COVERAGE`),
sensitivity and mean coverage; the count strata also give the mean Dice per segment.

Highlights, as the reference courses teach reading a model's errors:

- **clear fails**: the images with the lowest score (mean Dice over the segments present);
- **surprising successes**: found lesions that should have been hard (small, on the edge, at
  low counts), the hardest first;
- **borderline**: lesions whose coverage is closest to the 50 % threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.metrics import MIN_COVERAGE
from training.metrics import lesions as lesion_list

EDGE_FRACTION = 1.0 / 3.0
"""Share of a lesion's outline on the organ's edge from which it is in the ``edge`` stratum."""

N_HIGHLIGHTS = 3
"""Images shown per highlight kind."""


def annotate(
    record: dict[str, Any],
    frame: np.ndarray,
    truths: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    lesion_keys: list[str],
    spacing: tuple[float, float],
) -> None:
    """Add ``total_counts`` and, per lesion segment, ``lesions`` (one dict per truth lesion).

    The organ a lesion lies in is the union of the truths of the segments that are not
    lesion-like (``thyroid`` for ``nodule``).
    """
    record["total_counts"] = float(np.asarray(frame, dtype=np.float64).sum())
    organs = [t for k, t in truths.items() if k not in lesion_keys]
    gland = np.logical_or.reduce(organs) if organs else None
    for key in lesion_keys:
        record[key]["lesions"] = lesion_list(masks[key], truths[key], gland, spacing)


def _terciles(values: list[float]) -> tuple[float, float]:
    low, high = np.percentile(values, [100 / 3, 200 / 3]) if values else (math.nan, math.nan)
    return float(low), float(high)


def _lesion_row(items: list[dict[str, Any]]) -> dict[str, Any]:
    found = sum(1 for i in items if i["found"])
    return {
        "lesions": len(items),
        "found": found,
        "sensitivity": found / len(items) if items else math.nan,
        "mean_coverage": float(np.mean([i["coverage"] for i in items])) if items else math.nan,
    }


def _location(item: dict[str, Any]) -> str:
    edge = item.get("edge_fraction")
    if edge is None:
        return "unknown"
    return "inside" if edge == 0 else "edge" if edge >= EDGE_FRACTION else "touching"


def summarise(
    records: list[dict[str, Any]], keys: list[str], lesion_keys: list[str]
) -> dict[str, Any]:
    """Strata per lesion segment: ``{KEY: {"location", "size", "counts"}}`` (see module doc)."""
    out: dict[str, Any] = {}
    counts = [r["total_counts"] for r in records if "total_counts" in r]
    c_low, c_high = _terciles(counts)

    def count_level(r: dict[str, Any]) -> str:
        c = r.get("total_counts", math.nan)
        return "low" if c < c_low else "high" if c >= c_high else "mid"

    for key in lesion_keys:
        items = [
            {**item, "_image": n, "_counts": count_level(r)}
            for n, r in enumerate(records)
            for item in r[key].get("lesions", [])
        ]
        s_low, s_high = _terciles([i["diameter_mm"] for i in items])
        location = {
            name: _lesion_row([i for i in items if _location(i) == name])
            for name in ("inside", "touching", "edge")
        }
        location["reaching the edge"] = _lesion_row([i for i in items if _location(i) != "inside"])
        size = {
            f"small (< {s_low:.1f} mm)": _lesion_row(
                [i for i in items if i["diameter_mm"] < s_low]
            ),
            "medium": _lesion_row([i for i in items if s_low <= i["diameter_mm"] < s_high]),
            f"large (>= {s_high:.1f} mm)": _lesion_row(
                [i for i in items if i["diameter_mm"] >= s_high]
            ),
        }
        by_counts: dict[str, Any] = {}
        for level, label in (
            ("low", f"low (< {c_low:.0f} counts)"),
            ("mid", "mid"),
            ("high", f"high (>= {c_high:.0f} counts)"),
        ):
            images = [r for r in records if count_level(r) == level]
            row = _lesion_row([i for i in items if i["_counts"] == level])
            row["images"] = len(images)
            for k in keys:
                dices = [r[k]["dice"] for r in images if r[k]["truth_pixels"] > 0]
                row[f"dice_{k}"] = float(np.mean(dices)) if dices else math.nan
            by_counts[label] = row
        out[key] = {"location": location, "size": size, "counts": by_counts}
    return out


def _score(record: dict[str, Any], keys: list[str]) -> float:
    values = [
        record[k]["dice"] for k in keys if record[k]["truth_pixels"] or record[k]["pred_pixels"]
    ]
    return float(np.mean(values)) if values else 1.0


def highlights(
    records: list[dict[str, Any]], keys: list[str], lesion_keys: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Clear fails, surprising successes, borderline cases (see module doc).

    Each entry: ``index`` (into ``records``), ``case``, ``frame``, ``why`` (a short reason) and
    the image's Dice per segment.
    """
    if not records:
        return {}

    def entry(n: int, why: str) -> dict[str, Any]:
        r = records[n]
        dices = {k: r[k]["dice"] for k in keys}
        return {"index": n, "case": r["case"], "frame": r["frame"], "why": why, "dice": dices}

    order = sorted(range(len(records)), key=lambda n: _score(records[n], keys))
    fails = [entry(n, f"score {_score(records[n], keys):.3f}") for n in order[:N_HIGHLIGHTS]]
    items = [
        (n, key, item)
        for n, r in enumerate(records)
        for key in lesion_keys
        for item in r[key].get("lesions", [])
    ]
    counts = sorted(r.get("total_counts", 0.0) for r in records)
    diams = sorted(i["diameter_mm"] for _, _, i in items)

    def rank(sorted_values: list[float], value: float) -> float:
        return float(np.searchsorted(sorted_values, value)) / max(len(sorted_values), 1)

    def difficulty(n: int, item: dict[str, Any]) -> float:
        return (
            (1.0 - rank(diams, item["diameter_mm"]))
            + (item.get("edge_fraction") or 0.0) * 2.0
            + (1.0 - rank(counts, records[n].get("total_counts", 0.0)))
        )

    def describe(n: int, key: str, item: dict[str, Any]) -> str:
        edge = item.get("edge_fraction")
        return (
            f"{key} {item['diameter_mm']:.1f} mm, {_location(item)}"
            + (f" ({edge:.2f} of outline on edge)" if edge else "")
            + f", {records[n].get('total_counts', 0):.0f} counts, covered {item['coverage']:.2f}"
        )

    def distinct(candidates: list[tuple[int, str, dict[str, Any]]]) -> list[dict[str, Any]]:
        seen: set[int] = set()
        picked = []
        for n, key, item in candidates:
            if n not in seen:
                seen.add(n)
                picked.append(entry(n, describe(n, key, item)))
            if len(picked) == N_HIGHLIGHTS:
                break
        return picked

    found = [c for c in items if c[2]["coverage"] >= 0.8]
    successes = distinct(sorted(found, key=lambda c: -difficulty(c[0], c[2])))
    close = [c for c in items if abs(c[2]["coverage"] - MIN_COVERAGE) <= 0.25]
    borderline = distinct(sorted(close, key=lambda c: abs(c[2]["coverage"] - MIN_COVERAGE)))
    return {"clear fails": fails, "surprising successes": successes, "borderline": borderline}


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> list[str]:
    """``report.md`` lines: strata tables and the highlighted cases."""
    lines: list[str] = []
    for key, groups in (report.get("strata") or {}).items():
        lines += [
            "",
            f"### {key}: strata (found = at least {MIN_COVERAGE:.0%} of the lesion covered)",
            "",
            "| stratum | lesions | found | sensitivity | mean coverage | images | Dice |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for group, rows in groups.items():
            for name, row in rows.items():
                dices = ", ".join(
                    f"{k.removeprefix('dice_')} {_f(v)}"
                    for k, v in row.items()
                    if k.startswith("dice_")
                )
                lines.append(
                    f"| {group}: {name} | {row['lesions']} | {row['found']} "
                    f"| {_f(row['sensitivity'])} | {_f(row['mean_coverage'])} "
                    f"| {row.get('images', '')} | {dices} |"
                )
    for kind, entries in (report.get("highlights") or {}).items():
        if not entries:
            continue
        lines += ["", f"### {kind}", ""]
        for e in entries:
            dices = ", ".join(f"{k} {_f(v)}" for k, v in e["dice"].items())
            lines.append(f"- `{e['case']}` frame {e['frame']}: {e['why']}; Dice {dices}")
    return lines


def draw(
    kept: list[tuple[Any, int, dict[str, np.ndarray]]],
    report: dict[str, Any],
    colours: dict[str, np.ndarray],
    keys: list[str],
    out: Path,
    shown: Callable[[Any, int], np.ndarray],
    pyplot: Callable[[], Any],
) -> dict[str, str]:
    """One PNG per highlight kind (truth solid, model dashed); ``{title: file name}``.

    ``shown(case, frame)`` gives the display image in [0, 1]; ``pyplot()`` the Agg pyplot.
    """
    pictures: dict[str, str] = {}
    for kind, entries in (report.get("highlights") or {}).items():
        if not entries:
            continue
        plt = pyplot()
        fig, axes = plt.subplots(1, len(entries), figsize=(3.6 * len(entries), 3.8), squeeze=False)
        for ax, e in zip(axes[0], entries, strict=True):
            case, frame, masks = kept[e["index"]]
            ax.imshow(shown(case, frame), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            for k, key in enumerate(keys):
                truth = case.masks[k, frame]
                if truth.any():
                    ax.contour(truth, [0.5], colors=[colours[key]], linewidths=1.0)
                if masks[key].any():
                    ax.contour(
                        masks[key], [0.5], colors=[colours[key]], linewidths=1.0, linestyles="--"
                    )
            ax.set_title(f"{e['case']}\n{e['why'][:60]}", fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        name = "highlight-" + kind.replace(" ", "-") + ".png"
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        pictures[kind] = name
    return pictures
