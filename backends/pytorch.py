"""The PyTorch reference backend: the HF folder itself, run with transformers in fp32.

Every other backend is validated against this runner, so it stays as plain as possible: the artifact is a
copy of the HF folder (weights, config, tokenizer, remote-code files) plus meta.json.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amoeba_export.artifacts import atomic_dir, write_meta
from amoeba_export.errors import BackendError, CheckpointError

from .base import Artifact, Backend, Runner
from .meta import export_meta, tool_versions

# Everything save_pretrained writes that a loader needs; meta.json is ours and is written last.
_COPY_SUFFIXES = (".safetensors", ".json", ".py", ".jinja", ".model", ".txt")


class PyTorchRunner(Runner):
    """transformers causal LM on CPU (or wherever it was loaded), fp32 logits."""

    def __init__(self, hf_dir: str | Path, *, threads: int | None = None) -> None:
        import torch

        from amoeba_export.modelio import load_model

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.model = load_model(hf_dir)
        self._torch = torch

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().out_features)

    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        ids = torch.tensor([list(input_ids)], dtype=torch.long)
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=False).logits
        return out[0].float().numpy()

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = ()) -> list[int]:
        # An explicit loop rather than model.generate: no hidden EOS/length rules from generation_config.
        torch = self._torch
        gen = torch.Generator().manual_seed(seed)
        stop = set(stop_ids)
        ids = torch.tensor([list(input_ids)], dtype=torch.long)
        out: list[int] = []
        cache = None
        with torch.no_grad():
            for _ in range(max_new_tokens):
                res = self.model(input_ids=ids, cache=cache, use_cache=True)
                cache = res.cache
                token = _pick(res.logits[0, -1].float(), temperature, top_p, gen)
                out.append(token)
                if token in stop:
                    break
                ids = torch.tensor([[token]], dtype=torch.long)
        return out

    def close(self) -> None:
        self.model = None


def _pick(logits, temperature: float, top_p: float, gen) -> int:
    """Greedy at temperature 0, else nucleus sampling."""
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # always keeps the most likely token
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[choice])


class PyTorchBackend(Backend):
    name = "pytorch"
    extra = ""
    runtime_modules = ("torch", "transformers")
    runtime = "PyTorch"
    isolate = False  # the reference: validation already runs it in-process beside the artifact's child
    quant_types = ("F32",)
    default_quant = "F32"

    def export(self, hf_dir: Path, out_dir: Path, quant: str = "F32", *, force: bool = False,
               **options: Any) -> Artifact:
        if options:
            raise BackendError(f"the pytorch backend takes no options (got {', '.join(options)})",
                               fix="drop the extra options")
        quant = self.check_quant(quant)
        hf_dir = Path(hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise CheckpointError(f"{hf_dir} has no config.json", fix="pass an HF folder written by save_pretrained")
        started = time.perf_counter()
        with atomic_dir(out_dir, force=force) as tmp:
            for src in sorted(hf_dir.iterdir()):
                if src.is_file() and src.suffix in _COPY_SUFFIXES and src.name != "meta.json":
                    shutil.copy2(src, tmp / src.name)
            weights = sorted(p.name for p in tmp.glob("*.safetensors"))
            if not weights:
                raise CheckpointError(f"{hf_dir} holds no .safetensors weights", fix="save the model with safetensors")
            index = "model.safetensors.index.json"
            model_file = index if (tmp / index).is_file() else weights[0]
            meta = export_meta(backend=self.name, quant=quant, hf_dir=hf_dir, folder=tmp, model_file=model_file,
                               started=started, tools=tool_versions("torch", "transformers", "safetensors"))
            if model_file == index:  # sharded: the model is every shard
                meta["model_bytes"] = meta["bytes_per_token"] = sum(meta["files"][w]["bytes"] for w in weights)
            write_meta(tmp, meta)
        return Artifact.open(out_dir)

    def open_runner(self, artifact: Artifact, *, threads: int | None = None) -> Runner:
        return PyTorchRunner(artifact.path, threads=threads)
