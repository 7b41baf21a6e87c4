"""The ``onnx`` backend: an HF folder → a KV-cached ONNX decoder for onnxruntime, optionally quantized."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from amoeba_export.artifacts import atomic_dir, read_meta, write_meta
from amoeba_export.errors import BackendError, CheckpointError

from ..base import Artifact, Backend, Runner
from ..meta import copy_tokenizer, export_meta, model_summary, read_hf_config, tool_versions
from .genai import GENAI_CONFIG, genai_config
from .quantize import RECIPES, recipe_for

MODEL_FILE = "model.onnx"
# protobuf cannot hold a single file over 2 GiB; stay well clear of it (the quantizers add graph bytes).
EXTERNAL_DATA_BYTES = 1_800_000_000
# Options that are not recipe fields.
_EXPORT_OPTIONS = ("external_data", "fp32_onnx")


def _external_data(params: int, bytes_per_param: int = 4) -> bool:
    return params * bytes_per_param > EXTERNAL_DATA_BYTES


def model_bytes(folder: Path, model_file: str = MODEL_FILE) -> int:
    """The graph file plus its external-data file, if any."""
    data = folder / f"{model_file}.data"
    return (folder / model_file).stat().st_size + (data.stat().st_size if data.is_file() else 0)


class OnnxBackend(Backend):
    name = "onnx"
    extra = "onnx"
    runtime_modules = ("onnx", "onnxruntime", "onnxscript")
    runtime = "onnxruntime"
    crash_fix = "reinstall onnxruntime (pip install --force-reinstall onnxruntime) and report this machine's CPU"
    quant_types = tuple(RECIPES)
    default_quant = "int4"

    def option_problems(self, quant: str, options: dict[str, Any]) -> list[str]:
        from amoeba_export.errors import AmoebaError

        out = []
        if "external_data" in options and not isinstance(options["external_data"], bool):
            out.append(f"external_data must be true or false, got {options['external_data']!r}")
        if "fp32_onnx" in options and not isinstance(options["fp32_onnx"], str):
            out.append(f"fp32_onnx must be the path of an fp32 ONNX artifact, got {options['fp32_onnx']!r}")
        try:
            recipe_for(self.check_quant(quant), {k: v for k, v in options.items() if k not in _EXPORT_OPTIONS})
        except AmoebaError as exc:
            out += getattr(exc, "problems", None) or [str(exc)]
        except (TypeError, ValueError) as exc:  # a recipe field of the wrong type
            out.append(f"recipe options: {exc}")
        return out

    def export(self, hf_dir: Path, out_dir: Path, quant: str = "int4", *, force: bool = False,
               **options: Any) -> Artifact:
        """Export ``hf_dir``; ``options``: ``external_data`` (force it on/off), ``fp32_onnx`` (an fp32 artifact
        of the same folder to quantize instead of exporting again) and recipe overrides (see quantize.py)."""
        quant = self.check_quant(quant)
        hf_dir = Path(hf_dir)
        export_opts = {k: options.pop(k) for k in _EXPORT_OPTIONS if k in options}
        recipe = recipe_for(quant, options)
        summary = model_summary(hf_dir)
        external = export_opts.get("external_data")
        external = _external_data(summary["params"]) if external is None else bool(external)
        started = time.perf_counter()
        with atomic_dir(out_dir, force=force) as tmp:
            fp32 = tmp / ".fp32" / MODEL_FILE
            fp32.parent.mkdir()
            graph_info = self._fp32_graph(hf_dir, fp32, export_opts.get("fp32_onnx"), external)
            notes = []
            if recipe.method == "none":
                for f in fp32.parent.iterdir():
                    shutil.move(str(f), tmp / f.name)
            else:
                from .quantize import quantize

                calibration = self._calibration_rows(hf_dir, recipe)
                qinfo = quantize(fp32, tmp / MODEL_FILE, recipe, graph_info["roles"], external_data=external,
                                 calibration=None if calibration is None else calibration.rows.numpy())
                if calibration is not None:
                    graph_info["calibration"] = {"algorithm": recipe.algorithm, "text": calibration.label(),
                                                 "tokens": calibration.tokens}
                    notes.append(f"{recipe.algorithm.upper()} calibrated on {calibration.label()}")
                graph_info["quantization"] = qinfo
                notes.append(f"{qinfo['fp32_matmuls']} weight MatMul(s) left fp32: {', '.join(qinfo['excluded_nodes'])}"
                             if qinfo["fp32_matmuls"] else "every weight MatMul quantized")
                if not qinfo["embedding_quantized"]:
                    notes.append("token embedding left fp32")
            shutil.rmtree(fp32.parent)
            self._check_loads(tmp / MODEL_FILE)
            hf_config = read_hf_config(hf_dir)
            copy_tokenizer(hf_dir, tmp)
            # optimum's ORTModelForCausalLM reads the HF config beside the graph.
            shutil.copy2(hf_dir / "config.json", tmp / "config.json")
            if summary["uniform"]:
                (tmp / GENAI_CONFIG).write_text(json.dumps(genai_config(hf_config, summary, model_file=MODEL_FILE),
                                                           indent=2) + "\n")
            else:
                notes.append("per-layer widths: no genai_config.json (onnxruntime-genai assumes one KV width)")
            if recipe.notes:
                notes.append(recipe.notes)
            size = model_bytes(tmp)
            from .runner import GRAPH_OPTIMIZATION

            meta = export_meta(
                backend=self.name, quant=quant, hf_dir=hf_dir, folder=tmp, model_file=MODEL_FILE, started=started,
                tools=tool_versions("torch", "transformers", "onnx", "onnxruntime", "onnxscript"), notes=notes,
                recipe=recipe.to_dict(), external_data=external, graph_optimization_level=GRAPH_OPTIMIZATION,
                graph={k: v for k, v in graph_info.items() if k != "roles"},
            )
            meta["model_bytes"] = meta["bytes_per_token"] = size
            write_meta(tmp, meta)
        return Artifact.open(out_dir)

    def _fp32_graph(self, hf_dir: Path, dest: Path, fp32_onnx: str | Path | None, external: bool) -> dict:
        """Export the fp32 graph to ``dest`` (or copy it from an fp32 artifact of the same model)."""
        from .graph import tidy

        if fp32_onnx is not None:
            src = Path(fp32_onnx)
            meta = read_meta(src, kind="export")
            if meta.get("backend") != self.name or meta.get("quant") != "fp32":
                raise BackendError(f"{src} is not an fp32 ONNX artifact", fix="pass a folder exported with quant fp32")
            if Path(meta["source"]["hf_dir"]) != hf_dir.resolve():
                raise BackendError(f"{src} was exported from {meta['source']['hf_dir']}, not {hf_dir}",
                                   fix="pass the fp32 export of the same HF folder")
            for name in (MODEL_FILE, MODEL_FILE + ".data"):
                if (src / name).is_file():
                    shutil.copy2(src / name, dest.parent / name)
            info = dict(meta["graph"])
            info["roles"] = tidy(dest, external_data=(dest.parent / (MODEL_FILE + ".data")).is_file())
            return info
        import torch

        from amoeba_export.modelio import load_model

        from .graph import export_decoder

        model = load_model(hf_dir)
        try:
            info = export_decoder(model, dest, external_data=external)
        except (torch._dynamo.exc.Unsupported, RuntimeError, ValueError) as exc:
            raise BackendError(f"torch.onnx.export failed for {hf_dir}: {type(exc).__name__}: {str(exc)[:400]}",
                               fix="report the model type; only Llama-family decoders are supported") from exc
        del model
        info["roles"] = tidy(dest, external_data=external)
        return info

    @staticmethod
    def _calibration_rows(hf_dir: Path, recipe):
        """Calibration rows for a recipe that needs them (gptq), else None; missing data is an error."""
        if not recipe.calibration_tokens:
            return None
        from amoeba_export.data import measurement_rows
        from amoeba_export.modelio import load_tokenizer

        return measurement_rows("calibration", load_tokenizer(hf_dir), recipe.calibration_seq_len,
                                recipe.calibration_tokens)

    @staticmethod
    def _check_loads(path: Path) -> None:
        from .runner import open_session

        open_session(path, threads=1)

    def open_runner(self, artifact: Artifact, *, threads: int | None = None) -> Runner:
        from .runner import OnnxRunner

        if artifact.backend != self.name:
            raise BackendError(f"{artifact.path} is a {artifact.backend} artifact", fix="load it with its backend")
        if not artifact.model_file.is_file():
            raise CheckpointError(f"{artifact.model_file} is missing", fix="re-export the artifact")
        return OnnxRunner(artifact.model_file, threads=threads, tokenizer_dir=artifact.path)
