"""Inference speed of the thyroid U-Net: ONNX Runtime vs PyTorch eager, ms per 256x256 image.

Workload: batch-1 inference on 256x256 single-channel inputs made by the node's own
preprocessing from synthetic thyroid studies; a warm-up, then ``--repeat`` timed runs each.
Also times the whole per-image path the node runs (Preprocess + ONNX Runtime + Postprocess).

Model: the shipped ``thyroid-seg@production`` of ``models/`` (ONNX; ``--model DIR`` for another
version folder) when present, else an untrained network of the default recipe's architecture
exported on the fly (same speed, marked in the output). PyTorch
eager runs the same architecture (weights from the checkpoint when ``--checkpoint`` is given,
otherwise random: speed does not depend on the weights).

Run from the repository root: ``python bench/bench_inference.py [--quick]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from dicom_node.demo.phantoms import make_case  # noqa: E402
from dicom_node.modelstore.manifest import load_manifest  # noqa: E402
from dicom_node.modelstore.processing import Postprocess, Preprocess  # noqa: E402


def _machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


class InferenceSpeed:
    """Benchmark: ``setup``, ``time_onnxruntime``, ``time_torch_eager``, ``time_node_path``."""

    def __init__(self, repeat: int, threads: int, model: Path | None = None) -> None:
        self.repeat = repeat
        self.threads = threads
        self.model = model

    def setup(self) -> None:
        import onnxruntime as ort
        import torch

        from training.train import load_config
        from training.unet import UNet

        torch.set_num_threads(self.threads)
        version = self.model or _production()
        config = load_config(REPO / "training" / "configs" / "thyroid.yaml")
        if (version / "manifest.yaml").exists():  # the eager network: the version's own recipe
            recorded = load_manifest(version / "manifest.yaml").provenance.get("config")
            config = recorded if isinstance(recorded, dict) else config
        net_cfg = config["network"]
        self.net = UNet(1, 2, int(net_cfg["depth"]), int(net_cfg["base_channels"])).eval()
        if (version / "manifest.yaml").exists():
            self.manifest = load_manifest(version / "manifest.yaml")
            model_bytes = (version / self.manifest.model_file).read_bytes()
            self.model_label = f"shipped {self.manifest.name}:{self.manifest.version}"
        else:
            from dicom_node.modelstore.manifest import parse_manifest

            buffer = io.BytesIO()
            torch.onnx.export(
                self.net,
                (torch.zeros(1, 1, 256, 256),),
                buffer,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}},
                opset_version=17,
                dynamo=False,
            )
            model_bytes = buffer.getvalue()
            m = config["model"]
            self.manifest = parse_manifest({**m, "version": "0", "sha256": "0" * 64})
            self.model_label = "untrained stand-in of the default architecture"
        self.model_mb = len(model_bytes) / 1e6
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            model_bytes, options, providers=["CPUExecutionProvider"]
        )
        self.pre = Preprocess(self.manifest.input)
        self.post = Postprocess(self.manifest.output, self.manifest.segments)
        self.frames = [make_case(seed, 256).dataset.pixel_array for seed in range(4)]
        self.inputs = [self.pre(f)[None] for f in self.frames]

    def _time(self, fn: object) -> list[float]:
        for x in self.inputs:
            fn(x)  # type: ignore[operator]
        times = []
        for i in range(self.repeat):
            x = self.inputs[i % len(self.inputs)]
            t0 = time.perf_counter()
            fn(x)  # type: ignore[operator]
            times.append((time.perf_counter() - t0) * 1000)
        return times

    def time_onnxruntime(self) -> list[float]:
        return self._time(lambda x: self.session.run(None, {"image": x}))

    def time_torch_eager(self) -> list[float]:
        import torch

        def run(x: np.ndarray) -> None:
            with torch.inference_mode():
                self.net(torch.from_numpy(x))

        return self._time(run)

    def time_node_path(self) -> list[float]:
        def run(_: np.ndarray) -> None:
            frame = self.frames[0]
            logits = self.session.run(None, {"image": self.pre(frame)[None]})[0]
            self.post(logits[0], shape=frame.shape)

        return self._time(run)

    def teardown(self) -> None:
        self.session = None


def _production() -> Path:
    """The shipped production version folder of thyroid-seg (version 1 if unresolvable)."""
    from dicom_node.modelstore import ModelStore

    try:
        return ModelStore(REPO / "models").resolve("thyroid-seg@production").path
    except Exception:  # no store or alias here: fall back to the first version's folder
        return REPO / "models" / "thyroid-seg" / "1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (CI)")
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", type=Path, default=None, help="version folder to time")
    args = parser.parse_args()
    bench = InferenceSpeed(5 if args.quick else args.repeat, args.threads, args.model)
    bench.setup()
    try:
        results = {}
        for name in ("time_onnxruntime", "time_torch_eager", "time_node_path"):
            times = getattr(bench, name)()
            results[name.removeprefix("time_")] = {
                "median_ms": round(statistics.median(times), 2),
                "p90_ms": round(float(np.percentile(times, 90)), 2),
                "n": len(times),
            }
    finally:
        bench.teardown()
    ratio = results["torch_eager"]["median_ms"] / results["onnxruntime"]["median_ms"]
    print(
        json.dumps(
            {
                "machine": _machine(),
                "threads": args.threads,
                "model": bench.model_label,
                "model_mb": round(bench.model_mb, 3),
                "results": results,
                "torch_eager_over_onnxruntime": round(ratio, 2),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
