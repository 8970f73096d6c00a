"""Repackage thyroid-seg:1's exact weights as version 2 with confidence + measurements.

usage: build_v2.py STAGE ...
  ood      OUT.json                 measure the ood block on v1's training-style data
  folder   OUT_DIR OOD.json THRESHOLD [REPORT.json]   write a version folder (v1's model.onnx)
  choose   VAL_REPORT.json          choose the entropy threshold on a validation report
"""

import copy
import io
import json
import math
import shutil
import sys
from pathlib import Path

from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout
from dicom_node.modelstore.files import sha256_file
from dicom_node.modelstore.manifest import MANIFEST_FILE, parse_manifest
from training.confidence_eval import WORST_FRACTION, confidence_block
from training.data import load_dataset
from training.evaluate import _score
from training.export import report_metrics
from training.schema import measurement_settings
from training.train import segment_refs

V1 = Path("/work/main/models/thyroid-seg/1")
TRAIN = Path("/work/main/var/training/v2pkg/train")
MEASUREMENTS = {
    "thyroid": {"laterality": "split"},
    "nodule": {"components": True, "min_component_pixels": 4},
}
yaml = YAML()


def v1_manifest():
    return json.loads(json.dumps(yaml.load(V1 / MANIFEST_FILE)))


def stage_ood(out):
    config = v1_manifest()["provenance"]["config"]
    cases, skipped = load_dataset(
        TRAIN, segment_refs(config), skip_bad=True, nifti_labels=config["data"].get("nifti_labels")
    )
    assert not skipped, skipped
    block = confidence_block(None, cases)
    Path(out).write_text(json.dumps(block["ood"], indent=1))
    print(json.dumps(block["ood"]))


def stage_folder(out, ood_json, threshold, report=None):
    out = Path(out)
    assert not out.exists(), out
    out.mkdir(parents=True)
    shutil.copyfile(V1 / "model.onnx", out / "model.onnx")
    shutil.copytree(V1 / "reference", out / "reference")
    shutil.copyfile(V1 / "training_history.json", out / "training_history.json")
    m = v1_manifest()
    digest = sha256_file(out / "model.onnx")
    assert digest == m["sha256"] == sha256_file(V1 / "model.onnx")
    keys = [s["key"] for s in m["segments"]]
    conf = {
        "method": "entropy",
        "threshold": float(threshold),
        "ood": json.loads(Path(ood_json).read_text()),
    }
    m2 = {k: v for k, v in m.items() if k not in ("provenance", "metrics")}
    m2["version"] = "2"
    m2["description"] = (
        "U-Net for thyroid and cold nodules on planar NM "
        "(version 1's weights with confidence and measurements)"
    )
    import datetime as dt

    m2["created"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    m2["confidence"] = conf
    m2.update(measurement_settings({"measurements": MEASUREMENTS}, keys, "v2"))
    prov = copy.deepcopy(m["provenance"])
    prov["repackaged_from"] = {
        "version": "1",
        "sha256": m["sha256"],
        "why": "same weights; adds the serving contract (confidence, measurements)",
        "ood_data": "var/training/v2pkg/train (python -m training phantoms --n 1200 --seed 1000 "
        "--size 256 --size 128 --family classic: v1's training recipe)",
        "threshold_chosen_on": "var/training/v2pkg/val "
        "(--n 100 --seed 7300 --size 256 --size 128 --family classic)",
    }
    m2["provenance"] = prov
    metrics = {}
    if report:
        metrics = report_metrics(json.loads(Path(report).read_text()))
        metrics["evaluations"] = {"version 1 (v2:train test, seeds 9000/9001)": m["metrics"]}
    m2["metrics"] = metrics
    parse_manifest(json.loads(json.dumps(m2)), source=str(out / MANIFEST_FILE))
    y = YAML()
    y.default_flow_style = None
    y.width = 100
    buf = io.StringIO()
    y.dump(json.loads(json.dumps(m2)), buf)
    (out / MANIFEST_FILE).write_text(buf.getvalue())
    print("wrote", out, digest)


def stage_choose(report_path):
    """Youden's J (worst-10% recall - false-alarm rate) over candidate thresholds."""
    rep = json.loads(Path(report_path).read_text())
    keys = [k for k in ("thyroid", "nodule")]
    rows = [
        (
            _score(r, keys),
            max((s["score"] or 0.0) for s in r["confidence"]["per_segment"]),
            bool(r["confidence"]["reasons"])
            and not any(s["low"] for s in r["confidence"]["per_segment"]),
        )
        for r in rep["cases"]
    ]
    rows.sort(key=lambda t: t[0])
    n_worst = max(1, math.ceil(WORST_FRACTION * len(rows)))
    worst, good = rows[:n_worst], rows[n_worst:]
    cands = sorted({round(u, 3) for _, u, _ in rows if 0 < u < 1})
    best = None
    for t in cands:
        rec = sum(u > t for _, u, _ in worst) / len(worst)
        fa = sum(u > t for _, u, _ in good) / len(good)
        j = rec - fa
        if best is None or j > best[0] + 1e-12:
            best = (j, t, rec, fa)
    print(f"n={len(rows)} worst={n_worst} input-flagged={sum(f for *_, f in rows)}")
    print(
        f"chosen threshold={best[1]:.3f} J={best[0]:.3f} recall={best[2]:.3f} "
        f"false_alarm={best[3]:.3f}"
    )
    for t in (0.1, 0.15, 0.2, 0.25, 0.3):
        print(
            t,
            sum(u > t for _, u, _ in worst),
            "/",
            len(worst),
            sum(u > t for _, u, _ in good),
            "/",
            len(good),
        )


if __name__ == "__main__":
    {"ood": stage_ood, "folder": stage_folder, "choose": stage_choose}[sys.argv[1]](*sys.argv[2:])
