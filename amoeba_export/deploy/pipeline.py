"""``amoeba deploy``: search → extract → export → validate → bench → report, resumable stage by stage.

Each stage writes its own folder under OUT (atomically; ``meta.json`` last) and ``manifest.json`` at the
top records what ran, how long it took and the request it belongs to. A re-run skips every stage whose
folder is complete, so a deploy killed mid-way continues where it stopped; a folder made for another
request (other source, target or budgets) is an error unless ``force`` is given.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import atomic_dir, read_meta, write_json, write_meta
from ..errors import CheckpointError, OutputExistsError, ValidationFailedError
from ..identity import stage_identity
from ..targets import TargetProfile
from .search import SearchResult, require_choice, search

STAGES = ("search", "extract", "export", "validate", "bench", "report")
MANIFEST = "manifest.json"
DEPLOY_VERSION = 2  # 2: search and validation read rows spread over the held-out split (1: its first tokens)
BENCH_PROMPT, BENCH_NEW = 16, 64  # the calibration bench's settings, so prediction and measurement compare


def stage_dir(out: Path, stage: str) -> Path:
    return out / f"{STAGES.index(stage) + 1}-{stage}"


def stage_done(out: Path, stage: str) -> bool:
    return (stage_dir(out, stage) / "meta.json").is_file()


@dataclass
class DeployOptions:
    eval_tokens: int = 1024  # held-out tokens per candidate shape
    seq_len: int = 256
    validate_tokens: int = 1024
    bench_repeats: int = 3
    calibration_repeats: int = 3
    progress: bool = True


def request_key(source_identity: str, profile: TargetProfile, opts: DeployOptions) -> str:
    """What a deploy folder was made for: the source's content identity, the target and the options."""
    body = {"source": source_identity, "target": {k: v for k, v in profile.to_dict().items() if k != "path"},
            "eval_tokens": opts.eval_tokens, "seq_len": opts.seq_len, "v": DEPLOY_VERSION}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Deployment:
    """One deploy folder: runs the missing stages and keeps the manifest current."""

    def __init__(self, source: str | Path, profile: TargetProfile, out: str | Path, *,
                 options: DeployOptions | None = None, force: bool = False,
                 log: Callable[[str], None] = print) -> None:
        self.source, self.profile, self.out = Path(source), profile, Path(out)
        self.opts = options or DeployOptions()
        self.log = log
        self.source_identity = stage_identity(source)
        self.key = request_key(self.source_identity, profile, self.opts)
        self._loaded = None
        manifest = self.out / MANIFEST
        if manifest.is_file():
            old = json.loads(manifest.read_text())
            if old.get("request") != self.key and self._same_request_older_source(old):
                # Same source folder, target and options, but the source was re-planned or re-trained since:
                # every stage would be stale, so they all redo (no --force: this is what resuming means).
                log(f"{source} changed since {self.out} was deployed from it: redoing every stage")
                shutil.rmtree(self.out)
            elif old.get("request") != self.key:
                if not force:
                    raise OutputExistsError(f"{self.out} holds a deploy of another request "
                                            f"({old.get('target')} from {old.get('source')})",
                                            fix="pass --force to redo it, or another --out")
                shutil.rmtree(self.out)
        elif self.out.exists() and any(self.out.iterdir()):
            if not force:
                raise OutputExistsError(f"{self.out} exists and is not a deploy folder", fix="pass another --out")
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else {
            "kind": "deploy", "version": DEPLOY_VERSION, "request": self.key, "source": str(self.source),
            "source_identity": self.source_identity, "target": profile.name, "profile": profile.to_dict(), "stages": {}}

    # -- bookkeeping -----------------------------------------------------------------------------
    def _same_request_older_source(self, old: dict[str, Any]) -> bool:
        """Whether ``old`` (a manifest) is this request made from an earlier content of the same source folder."""
        recorded = old.get("source_identity")
        return (isinstance(recorded, str) and old.get("source") == str(self.source)
                and old.get("request") == request_key(recorded, self.profile, self.opts))

    def _save_manifest(self) -> None:
        write_json(self.out / MANIFEST, self.manifest)

    def _elastic(self):
        if self._loaded is None:
            from ..extract import load_source

            self._loaded = load_source(self.source)[:2]
        return self._loaded

    def run(self) -> Path:
        """Run every missing stage; returns the report's HTML path."""
        from tqdm.auto import tqdm

        bar = tqdm(STAGES, desc=f"deploy {self.profile.name}", unit="stage", disable=not self.opts.progress)
        for i, stage in enumerate(bar):
            bar.set_postfix_str(stage)
            if stage_done(self.out, stage):
                self.log(f"[{i + 1}/{len(STAGES)}] {stage}: done before, reusing {stage_dir(self.out, stage)}")
                continue
            self.log(f"[{i + 1}/{len(STAGES)}] {stage} ...")
            started = time.perf_counter()
            entry = self.manifest["stages"].setdefault(stage, {})
            entry.update(status="running", started=time.time())
            self._save_manifest()
            try:
                summary = getattr(self, f"_{stage}")(stage_dir(self.out, stage)) or {}
            except BaseException as exc:
                entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                             seconds=round(time.perf_counter() - started, 2))
                self._save_manifest()
                raise
            entry.update(status="done", seconds=round(time.perf_counter() - started, 2),
                         folder=stage_dir(self.out, stage).name, **summary)
            entry.pop("error", None)
            self._save_manifest()
            self.log(f"[{i + 1}/{len(STAGES)}] {stage}: {entry['seconds']:.1f} s")
        bar.close()
        return stage_dir(self.out, "report") / "report.html"

    # -- stages ----------------------------------------------------------------------------------
    def search_result(self) -> SearchResult:
        return SearchResult.from_dict(json.loads((stage_dir(self.out, "search") / "search.json").read_text()))

    def _search(self, folder: Path) -> dict[str, Any]:
        result = search(self.source, self.profile, eval_tokens=self.opts.eval_tokens, seq_len=self.opts.seq_len,
                        calibration_repeats=self.opts.calibration_repeats, progress=self.opts.progress,
                        loaded=self._elastic())
        best = require_choice(result)  # an impossible budget stops here, before anything is written
        with atomic_dir(folder, force=True) as tmp:
            write_json(tmp / "search.json", result.to_dict())
            write_meta(tmp, {"kind": "deploy_search", "version": DEPLOY_VERSION, "request": self.key,
                             "chosen": best.name, "seconds": result.seconds})
        self.log(result.table())
        return {"chosen": best.name, "params": best.params, "ppl": best.ppl,
                "predicted": {"file_bytes": best.file_bytes, "memory_bytes": best.memory_bytes,
                              "decode_tok_s": best.decode_tok_s}}

    def _extract(self, folder: Path) -> dict[str, Any]:
        from ..extract import prepare_shape, write_subnet
        from ..shape import Shape

        best = require_choice(self.search_result())
        shape = Shape.from_dict(best.shape)
        elastic, plan = self._elastic()
        prepare_shape(elastic, shape)
        write_subnet(elastic, shape, folder, source_dir=plan.model_dir, force=True,
                     meta={"source": str(self.source), "source_identity": self.source_identity, "request": self.key,
                           "compensated": elastic.compensating})
        return {"params": read_meta(folder)["params"], "extract_seconds": read_meta(folder)["extract_seconds"]}

    def _export(self, folder: Path) -> dict[str, Any]:
        from ..backends.export_process import export_in_child

        self._loaded = None  # the elastic model is not needed any more
        # In a fresh process: this one holds what the earlier stages loaded (backends/export_process.py says how
        # much), and a native crash while exporting becomes an error instead of ending the deploy.
        artifact = export_in_child(self.profile.backend, stage_dir(self.out, "extract"), folder, self.profile.quant,
                                   force=True, **self.profile.export)
        return {"model_file": artifact.meta["model_file"], "model_bytes": artifact.size_bytes,
                "notes": artifact.meta.get("notes", [])}

    def _validate(self, folder: Path) -> dict[str, Any]:
        from ..evaluation.validate import validate_artifact

        seq = min(512, self.profile.context_length, int(self.profile.export.get("max_context", 10**9)))
        report = validate_artifact(stage_dir(self.out, "export"), stage_dir(self.out, "extract"),
                                   max_tokens=self.opts.validate_tokens, seq_len=seq, threads=self.profile.threads,
                                   raise_on_fail=False, progress=self.opts.progress)
        self.log(report.table())
        if not report.passed:  # a failing gate is an error: no folder, so a re-run validates again
            self.manifest["stages"]["validate"]["report"] = report.to_dict()
            self._save_manifest()
            raise ValidationFailedError(
                f"{report.backend}/{report.quant} failed the {report.gate} gate: "
                + "; ".join(c.describe() for c in report.failures),
                fix="see the validation table; a wider subnet or another quant scheme may pass")
        with atomic_dir(folder, force=True) as tmp:
            write_json(tmp / "validation.json", report.to_dict())
            write_meta(tmp, {"kind": "validation", "version": DEPLOY_VERSION, "request": self.key,
                             "passed": True, "gate": report.gate})
        return {"passed": True, "gate": report.gate}

    def _bench(self, folder: Path) -> dict[str, Any]:
        from ..benchmark.harness import bench_artifact

        result = bench_artifact(stage_dir(self.out, "export"), threads=self.profile.threads,
                                prompt_tokens=BENCH_PROMPT, new_tokens=BENCH_NEW, repeats=self.opts.bench_repeats,
                                progress=self.opts.progress)
        with atomic_dir(folder, force=True) as tmp:
            write_json(tmp / "bench.json", result)
            write_meta(tmp, {"kind": "deploy_bench", "version": DEPLOY_VERSION, "request": self.key})
        return {"decode_tok_s": result["metrics"]["decode_tok_s"]["median"],
                "peak_rss_gb": result["metrics"]["peak_rss_gb"]["median"]}

    def _report(self, folder: Path) -> dict[str, Any]:
        from .report import write_report

        summary = prediction_errors(self.out)
        with atomic_dir(folder, force=True) as tmp:
            write_report(self, tmp, summary)
            write_meta(tmp, {"kind": "deploy_report", "version": DEPLOY_VERSION, "request": self.key, **summary})
        self.log(f"report: {folder / 'report.html'}")
        return summary


def prediction_errors(out: Path) -> dict[str, Any]:
    """Predicted vs measured file size and decode speed of the deployed artifact (relative errors)."""
    search_result = SearchResult.from_dict(json.loads((stage_dir(out, "search") / "search.json").read_text()))
    best = require_choice(search_result)
    export_meta = read_meta(stage_dir(out, "export"), kind="export")
    bench = json.loads((stage_dir(out, "bench") / "bench.json").read_text())
    real_size, real_speed = export_meta["model_bytes"], bench["metrics"]["decode_tok_s"]["median"]
    real_rss = bench["metrics"]["peak_rss_gb"]["median"] * 2**30
    return {"predicted_file_bytes": best.file_bytes, "file_bytes": real_size,
            "size_pred_err": abs(best.file_bytes - real_size) / real_size,
            "predicted_decode_tok_s": best.decode_tok_s, "decode_tok_s": real_speed,
            "speed_pred_err": abs(best.decode_tok_s - real_speed) / real_speed,
            "predicted_memory_bytes": best.memory_bytes, "bench_peak_rss_bytes": real_rss}


def deploy(source: str | Path, profile: TargetProfile, out: str | Path, *, options: DeployOptions | None = None,
           force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) a deploy; returns the path of ``report.html``."""
    if not Path(source).exists():
        raise CheckpointError(f"{source} does not exist", fix="pass a plan folder or a trained elastic checkpoint")
    read_meta(source)  # a plan or elastic checkpoint: fail before creating OUT
    return Deployment(source, profile, out, options=options, force=force, log=log).run()


def load_manifest(out: str | Path) -> dict[str, Any]:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{out} has no {MANIFEST}", fix="pass a folder written by amoeba deploy")
    return json.loads(path.read_text())
