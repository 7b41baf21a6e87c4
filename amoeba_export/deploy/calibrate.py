"""Calibration of a target's predictors on this machine: a few tiny probe subnets exported, measured and fitted.

Models (all least squares over the calibration points, coefficients kept ≥ 0 where a cost cannot shrink):
- file size:    bytes      = c0 + c1 · W            (W: the quant scheme's priced weights, sizing.py)
- decode speed: s / token  = a  + b  · W  + c · L   (a fixed per-token cost, weight streaming, and a per-layer
                                                     dispatch cost: L kept layers)
- memory:       peak RSS   = m0 + m1 · W  + KV cache at the profile's context length

The probes are the first few layers of the widest and the narrowest candidate (``probe_shapes``), not
candidates themselves: an ExecuTorch lowering costs ≈ 15–20 s per layer on 2 cores with dynamic shapes, so two
mid-sized candidates (36 layers) took 714 s while the probes (13 layers) took ≈ 300 s on a 2-core AMD EPYC — and
they span W and L as widely, since every candidate shares the embedding and lm_head and differs only in how many
layers of what width it streams. Each probe is the backend's ``speed_twin``: for ExecuTorch a one-token program,
which lowers in about half the time and decodes as fast (136 s for the three on a 2-core Xeon in ``make demo``).
The fit is cached per (source, backend, quant, export options, threads, machine, probes), so it is paid once.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..artifacts import write_json
from ..paths import cache_subdir
from ..shape import Shape

# 2: peak RSS from VmHWM (1 inherited the parent's RSS); 3: probe subnets and a per-layer speed term.
CALIBRATION_VERSION = 3
# (which candidate, how many of its first layers): a one-layer probe pins the fixed cost, an eight-layer one the
# cost per byte and per layer, a narrow four-layer one separates the two (same L, less W per layer).
PROBES = (("widest", 1), ("widest", 8), ("narrowest", 4))


@dataclass(frozen=True)
class Point:
    shape: str
    layers: int
    weight_bytes: int
    file_bytes: int
    decode_tok_s: float
    peak_rss_bytes: float
    kv_bytes: int


@dataclass(frozen=True)
class Calibration:
    backend: str
    quant: str
    threads: int
    points: tuple[Point, ...]
    size: tuple[float, float]  # c0, c1
    speed: tuple[float, float, float]  # a (s), b (s per byte), c (s per layer)
    memory: tuple[float, float]  # m0, m1
    machine: str
    seconds: float
    version: int = CALIBRATION_VERSION

    def predict_size(self, w: int) -> float:
        return self.size[0] + self.size[1] * w

    def predict_tok_s(self, w: int, layers: int) -> float:
        a, b, c = self.speed
        return 1.0 / max(a + b * w + c * layers, 1e-9)

    def predict_memory(self, w: int, kv: int) -> float:
        return self.memory[0] + self.memory[1] * w + kv

    def describe(self) -> str:
        """The fitted models in words, with the probes they were fitted on (the deploy report's speed-model line)."""
        a, b, c = self.speed
        probes = ", ".join(f"{p.shape} ({p.decode_tok_s:.0f} tok/s)" for p in self.points)
        return (f"Speed model: seconds/token = a + b·W + c·L (W = the quant scheme's priced weight bytes, L = kept "
                f"layers), least squares with a, b, c ≥ 0 over {len(self.points)} probe subnets (the first layers "
                f"of the widest and narrowest candidates) exported as {self.backend}/{self.quant} and benched on "
                f"this machine ({self.machine.split('|')[-1]}, {self.threads} threads): {probes}; "
                f"a = {a * 1e3:.3g} ms, b = {b * 1e12:.3g} ms/GB, c = {c * 1e3:.3g} ms per layer. "
                f"File size = c0 + c1·W with c0 = {self.size[0] / 1e6:.3f} MB, c1 = {self.size[1]:.4f}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(**{**d, "points": tuple(Point(**p) for p in d["points"]), "size": tuple(d["size"]),
                      "speed": tuple(d["speed"]), "memory": tuple(d["memory"])})


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; one point (or equal xs) gives a line through the origin's slope."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        return 0.0, my / mx if mx else 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def fit_nonnegative(features: list[list[float]], ys: list[float]) -> tuple[float, ...]:
    """Least squares ``y ≈ Σ_j coef_j · features[j]`` with every coefficient ≥ 0 (a time or size never shrinks
    as weights or layers grow). With a handful of terms the exact answer is the best unconstrained fit over the
    subsets of terms left free whose coefficients all come out ≥ 0; terms not in it are 0."""
    import itertools

    import numpy as np

    x, y = np.asarray(features, dtype=np.float64).T, np.asarray(ys, dtype=np.float64)
    # Columns scaled to unit norm: W (≈1e8) next to a column of ones would make lstsq's rank cut drop a term.
    norms = np.linalg.norm(x, axis=0)
    norms[norms == 0] = 1.0
    xs = x / norms
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y**2))
    for k in range(1, x.shape[1] + 1):
        for free in itertools.combinations(range(x.shape[1]), k):
            coef = np.linalg.lstsq(xs[:, free], y, rcond=None)[0]
            err = float(np.sum((xs[:, free] @ coef - y) ** 2))
            if np.all(coef >= 0) and err < best_err * (1 - 1e-12):
                best, best_err = np.zeros(x.shape[1]), err
                best[list(free)] = coef
    return tuple(float(v) for v in best / norms)


def probe_shapes(shapes: list[Shape], params: list[int], probes: tuple[tuple[str, int], ...] = PROBES) -> list[Shape]:
    """The calibration probes: the first ``k`` layers of the widest / narrowest candidate, per ``probes``."""
    by_params = sorted(range(len(shapes)), key=lambda i: params[i])
    source = {"narrowest": shapes[by_params[0]], "widest": shapes[by_params[-1]]}
    out: list[Shape] = []
    for which, k in probes:
        s = source[which]
        k = min(k, s.depth)
        probe = Shape(s.layers[:k], s.q_heads[:k], s.kv_heads[:k], s.mlp[:k], name=f"probe-{k}of-{s.name}")
        if probe not in out:
            out.append(probe)
    return out


def machine_id() -> str:
    from ..benchmark.harness import cpu_name

    return f"{platform.node()}|{cpu_name()}"


def calibration_key(source_id: str, backend: str, quant: str, options: dict, threads: int,
                    shapes: list[Shape]) -> str:
    body = json.dumps({"source": source_id, "backend": backend, "quant": quant, "options": options,
                       "threads": threads, "machine": machine_id(), "v": CALIBRATION_VERSION,
                       "shapes": [s.to_dict() for s in shapes]}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def calibrate(elastic, plan, shapes: list[Shape], *, source_id: str, backend: str, quant: str,
              export_options: dict, threads: int, weight_fn, kv_fn, prepare=None,
              bench_tokens: int = 64, repeats: int = 2, progress: bool = True) -> Calibration:
    """Export, measure and fit ``shapes`` (cached); ``weight_fn(shape) -> W``, ``kv_fn(shape, ctx) -> bytes``."""
    from tqdm.auto import tqdm

    from ..backends import get_backend
    from ..benchmark.harness import bench_artifact, measure_bandwidth
    from ..extract import write_subnet

    key = calibration_key(source_id, backend, quant, export_options, threads, shapes)
    cache = cache_subdir("deploy", "calibration") / f"{backend}-{quant}-{key}.json"
    if cache.is_file():
        return Calibration.from_dict(json.loads(cache.read_text()))
    started = time.perf_counter()
    work = cache_subdir("deploy", "calibration") / f".work-{key}"
    shutil.rmtree(work, ignore_errors=True)
    engine = get_backend(backend)
    points = []
    bandwidth = measure_bandwidth(threads)  # one measurement shared by every calibration bench
    for i, shape in enumerate(tqdm(shapes, desc=f"calibrate {backend}/{quant}", unit="subnet", disable=not progress)):
        if prepare is not None:
            prepare(shape)
        # A probe's weights never reach a figure, so it skips depth reconstruction (a calibration forward).
        with elastic.without_depth_maps():
            hf = write_subnet(elastic, shape, work / f"{i}-hf", source_dir=plan.model_dir)
        # Speed and size only: a calibrated type's twin has the same file layout and kernels, minus its
        # calibration pass (ExecuTorch GPTQ ≈ 1 min, a GGUF importance matrix ≈ 1 min per subnet).
        twin, twin_options = engine.speed_twin(quant, export_options)
        artifact = engine.export(hf, work / f"{i}-art", twin, **twin_options)
        bench = bench_artifact(artifact.path, threads=threads, prompt_tokens=16, new_tokens=bench_tokens,
                               repeats=repeats, bandwidth=bandwidth, progress=False)
        points.append(Point(shape.name, shape.depth, int(weight_fn(shape)), int(artifact.size_bytes),
                            float(bench["metrics"]["decode_tok_s"]["median"]),
                            float(bench["metrics"]["peak_rss_gb"]["median"]) * 2**30,
                            int(kv_fn(shape, 16 + bench_tokens))))
        shutil.rmtree(work / f"{i}-hf", ignore_errors=True)
        shutil.rmtree(work / f"{i}-art", ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    ws, ones = [float(p.weight_bytes) for p in points], [1.0] * len(points)
    cal = Calibration(
        backend=backend, quant=quant, threads=threads, points=tuple(points),
        size=fit_line(ws, [p.file_bytes for p in points]),
        speed=fit_nonnegative([ones, ws, [float(p.layers) for p in points]], [1.0 / p.decode_tok_s for p in points]),
        memory=fit_nonnegative([ones, ws], [p.peak_rss_bytes - p.kv_bytes for p in points]),
        machine=machine_id(), seconds=round(time.perf_counter() - started, 1))
    write_json(cache, cal.to_dict())
    return cal
