"""Validate an exported artifact against its PyTorch reference, with hard gates.

Both models run through the backend contract (``Backend.load`` → :class:`Runner`), so this works for every
backend. On the same token rows it measures top-1 agreement, mean KL(reference ‖ artifact), both
perplexities and their ratio; on a fixed probe text the largest |Δlogit|, whether the artifact's own
KV-cached greedy generation matches the argmax of its full-sequence logits (catches a broken cache path),
and, when the runner can tokenize, whether its tokenizer gives the reference tokenizer's ids.
Gates per ``"<backend>/<quant>"`` live in ``gates.json``; a failed gate raises ValidationFailedError.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from amoeba_export.errors import BackendError, ConfigError, ValidationFailedError

REPORT_VERSION = 1
GATES_FILE = Path(__file__).with_name("gates.json")
DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 2048
# Fixed probe: prose, digits, code, whitespace runs and non-ASCII, so tokenizer and logit checks see variety.
PROBE_TEXT = ("The committee met on 12 March 2024 to review 3,517 proposals.\n"
              "def area(r):\n    return 3.14159 * r ** 2  # circle\n"
              "Zürich, naïve café — “quoted” text… and 100% done!")
GENERATE_TOKENS = 24
# A cached-decode token counts as consistent when its full-sequence logit is within this fraction of the
# position's logit range of the best: measured ties on a Q4_K_M SmolLM2 subnet were 0.004–0.097 logits on ranges
# of ≈ 30 (≤ 0.34 %); a broken cache misses by whole logits.
CACHE_TIE_TOLERANCE = 0.005


@dataclass(frozen=True)
class GateCheck:
    metric: str
    bound: str  # "min" or "max"
    threshold: float
    value: float | None  # None: the metric was not measured (counts as a failure)

    @property
    def passed(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        return self.value >= self.threshold if self.bound == "min" else self.value <= self.threshold

    def describe(self) -> str:
        sign = "≥" if self.bound == "min" else "≤"
        if self.value is None:
            return f"{self.metric} was not measured (gate needs {sign} {self.threshold:g})"
        miss = self.threshold - self.value if self.bound == "min" else self.value - self.threshold
        verdict = "ok" if self.passed else f"FAILED by {miss:.4g}"
        return f"{self.metric} = {self.value:.6g} (gate {sign} {self.threshold:g}): {verdict}"


@dataclass(frozen=True)
class ValidationReport:
    version: int
    artifact: str
    backend: str
    quant: str
    reference: str
    gate: str
    text: str
    tokens: int
    seq_len: int
    metrics: dict[str, float]
    checks: tuple[GateCheck, ...]
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    quant_label: str = ""  # the artifact's honest name, e.g. "Q4_K_M (92 % Q5_0/Q8_0 fallback)"; "" = quant

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checks"] = [{**asdict(c), "passed": c.passed} for c in self.checks]
        d["passed"] = self.passed
        return d

    def table(self) -> str:
        lines = [f"validation of {self.artifact} ({self.backend}/{self.quant_label or self.quant}) against "
                 f"{self.reference}",
                 f"text: {self.text}, {self.tokens} tokens in rows of {self.seq_len}; gate {self.gate!r}",
                 f"{'metric':<22}{'value':>14}  gate"]
        gated = {c.metric: c for c in self.checks}
        for name, value in self.metrics.items():
            check = gated.get(name)
            rule = "" if check is None else (f"{'≥' if check.bound == 'min' else '≤'} {check.threshold:g}  "
                                             f"{'ok' if check.passed else 'FAILED'}")
            lines.append(f"{name:<22}{value:>14.6g}  {rule}")
        for c in self.checks:
            if c.metric not in self.metrics:
                lines.append(f"{c.metric:<22}{'—':>14}  not measured: FAILED")
        lines += [f"note: {n}" for n in self.notes]
        lines.append("PASSED" if self.passed else "FAILED: " + "; ".join(c.describe() for c in self.failures))
        return "\n".join(lines)


def load_gates(path: str | Path | None = None) -> dict[str, dict[str, dict[str, float]]]:
    path = Path(path) if path else GATES_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"gates file {path}", [str(exc)], fix="pass a valid JSON gates file") from exc
    gates = data.get("gates")
    problems = [] if isinstance(gates, dict) else ["no 'gates' object"]
    for key, rules in (gates or {}).items():
        for metric, rule in rules.items():
            if not isinstance(rule, dict) or set(rule) - {"min", "max"} or len(rule) != 1:
                problems.append(f"{key}.{metric}: expected {{\"min\": x}} or {{\"max\": x}}")
    if problems:
        raise ConfigError(f"gates file {path}", problems, fix="fix the listed entries")
    return gates


def gate_for(backend: str, quant: str, gates: dict[str, Any]) -> tuple[str, dict[str, dict[str, float]]]:
    """The gate of ``backend/quant``, else the generic ``*/quant`` one; an ungated type is an error."""
    for key in (f"{backend}/{quant}", f"*/{quant}"):
        if key in gates:
            return key, gates[key]
    raise ConfigError(f"no validation gate for {backend}/{quant}",
                      [f"known gates: {', '.join(sorted(gates))}"],
                      fix=f"add a \"{backend}/{quant}\" entry to {GATES_FILE.name} (calibrated on the default model)")


class _Accumulator:
    """Streaming agreement / KL / NLL sums over token rows (no [tokens, vocab] matrix is kept)."""

    def __init__(self) -> None:
        self.count = 0  # positions compared
        self.predicted = 0  # next-token predictions scored (one fewer per row)
        self.top1 = 0
        self.kl = 0.0
        self.nll_ref = 0.0
        self.nll_art = 0.0

    def add(self, ref: np.ndarray, art: np.ndarray, ids: np.ndarray) -> None:
        import torch

        ref_lp = torch.log_softmax(torch.from_numpy(ref).double(), dim=-1)
        art_lp = torch.log_softmax(torch.from_numpy(art).double(), dim=-1)
        self.top1 += int((ref_lp.argmax(-1) == art_lp.argmax(-1)).sum())
        self.kl += float((ref_lp.exp() * (ref_lp - art_lp)).sum())
        target = torch.from_numpy(ids[1:]).long()
        self.nll_ref -= float(ref_lp[:-1].gather(1, target[:, None]).sum())
        self.nll_art -= float(art_lp[:-1].gather(1, target[:, None]).sum())
        self.count += len(ids)
        self.predicted += len(ids) - 1

    def metrics(self) -> dict[str, float]:
        ref_ppl = math.exp(self.nll_ref / self.predicted)
        ppl = math.exp(self.nll_art / self.predicted)
        return {"top1_agreement": self.top1 / self.count, "mean_kl": self.kl / self.count,
                "ppl": ppl, "ref_ppl": ref_ppl, "ppl_ratio": ppl / ref_ppl}


def _probe_metrics(ref_runner, runner, probe: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    ref = ref_runner.logits(probe)
    art = runner.logits(probe)
    out["max_abs_logit_err"] = float(np.abs(ref - art).max())
    # The cached decode path must pick what the full-sequence path scores highest on its own output — up to a
    # near-tie: quantized runtimes use other kernels for one token than for a batch (llama.cpp's repacked GEMM vs
    # GEMV), which flips ties within a few hundredths of a logit, while a broken cache picks tokens whole logits
    # below the best.
    new = runner.generate(probe, GENERATE_TOKENS)
    full = runner.logits(probe + new[:-1])[len(probe) - 1:]
    picked = full[np.arange(len(new)), np.asarray(new)]
    tol = CACHE_TIE_TOLERANCE * (full.max(-1) - full.min(-1))
    out["cache_consistency"] = float(np.mean(picked >= full.max(-1) - tol))
    out["cache_exact_match"] = float(np.mean(full.argmax(-1) == np.asarray(new)))
    ref_new = ref_runner.generate(probe, GENERATE_TOKENS)
    same = next((i for i, (a, b) in enumerate(zip(new, ref_new)) if a != b), len(new))
    out["greedy_prefix_match"] = same / GENERATE_TOKENS
    return out


def validate_runners(ref_runner, runner, tokenizer, token_rows: np.ndarray, *, progress: bool = True
                     ) -> dict[str, float]:
    """Every metric of ``runner`` against ``ref_runner`` (both :class:`Runner`)."""
    if runner.vocab_size != ref_runner.vocab_size:
        raise BackendError(f"the artifact has {runner.vocab_size} logits per token, the reference "
                           f"{ref_runner.vocab_size}", fix="export the artifact from this reference folder")
    acc = _Accumulator()
    for row in tqdm(token_rows, desc="validate", unit="row", disable=not progress):
        ids = [int(t) for t in row]
        acc.add(ref_runner.logits(ids), runner.logits(ids), np.asarray(ids))
    metrics = acc.metrics()
    probe = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    metrics.update(_probe_metrics(ref_runner, runner, probe))
    if runner.can_tokenize:
        # Whitespace runs inside the text, not at its start: before leading whitespace llama.cpp's SentencePiece
        # tokenizer adds a space that transformers 5's Llama tokenizer does not (a runtime difference no GGUF
        # metadata changes; the export's notes say so).
        texts = [PROBE_TEXT, PROBE_TEXT.upper(), "Spaces  between\n\n\ttabs 0123456789 " + PROBE_TEXT[::-1]]
        same = [list(runner.tokenize(t)) == tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        metrics["tokenizer_match"] = float(np.mean(same))
    return metrics


def _token_rows(tokenizer, text_file, seq_len: int, max_tokens: int) -> tuple[np.ndarray, str]:
    from amoeba_export.data import measurement_rows

    measured = measurement_rows(Path(text_file) if text_file is not None else "heldout", tokenizer, seq_len,
                                max_tokens)
    return measured.rows.numpy(), f"{measured.text} (rows spread over its {measured.available:,} tokens)"


def validate_artifact(artifact_dir: str | Path, reference_hf_dir: str | Path, *, text_file: str | Path | None = None,
                      max_tokens: int | None = None, seq_len: int | None = None, raise_on_fail: bool = True,
                      gates_file: str | Path | None = None, threads: int | None = None,
                      progress: bool = True) -> ValidationReport:
    """Compare an artifact with the PyTorch model of ``reference_hf_dir``; raise when a gate fails."""
    from amoeba_export.backends import load_artifact
    from amoeba_export.backends.pytorch import PyTorchRunner
    from amoeba_export.modelio import load_tokenizer, resolve_model

    start = time.perf_counter()
    reference = resolve_model(reference_hf_dir)
    artifact, backend = load_artifact(artifact_dir)
    gate_name, gate = gate_for(artifact.backend, artifact.quant, load_gates(gates_file))
    seq_len = seq_len or DEFAULT_SEQ_LEN
    tokenizer = load_tokenizer(reference)
    rows, label = _token_rows(tokenizer, text_file, seq_len, max_tokens or DEFAULT_MAX_TOKENS)
    with PyTorchRunner(reference, threads=threads) as ref_runner, backend.load(artifact, threads=threads) as runner:
        metrics = validate_runners(ref_runner, runner, tokenizer, rows, progress=progress)
    checks = tuple(GateCheck(metric, *next(iter(rule.items())), metrics.get(metric))
                   for metric, rule in gate.items())
    report = ValidationReport(
        version=REPORT_VERSION, artifact=str(artifact.path), backend=artifact.backend, quant=artifact.quant,
        reference=str(reference), gate=gate_name, text=label, tokens=int(rows.size), seq_len=seq_len,
        metrics={k: float(v) for k, v in metrics.items()}, checks=checks,
        notes=tuple(artifact.meta.get("notes", [])), seconds=round(time.perf_counter() - start, 2),
        quant_label=str(artifact.meta.get("quant_label") or artifact.quant))
    if raise_on_fail and not report.passed:
        raise ValidationFailedError(
            f"{artifact.path} failed the {gate_name} gate: " + "; ".join(c.describe() for c in report.failures),
            fix="see the validation table; a different quant type or a wider subnet may pass")
    return report
