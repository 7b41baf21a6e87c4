"""A GGUF file run by llama.cpp through llama-cpp-python.

The KV cache is F32 (``type_k = type_v = 0``): llama.cpp's default F16 cache alone moves logits by ~1e-3,
which would blur strict comparisons with PyTorch. Full-sequence logits are decoded batch by batch with
every position marked as an output, so the context never needs the ``logits_all`` score matrix
(n_ctx × vocab floats) that generation does not use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from amoeba_export.errors import CheckpointError, ShapeError

from ..base import Runner

GGML_TYPE_F32 = 0
DEFAULT_N_CTX = 2048


class LlamaCppRunner(Runner):
    def __init__(self, path: str | Path, *, threads: int | None = None, n_ctx: int | None = None,
                 n_batch: int = 512, seed: int = 0) -> None:
        from llama_cpp import Llama

        threads = threads or len(os.sched_getaffinity(0))
        n_ctx = n_ctx or DEFAULT_N_CTX
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=threads,
                             n_threads_batch=threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, seed=seed,
                             logits_all=False, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise CheckpointError(f"llama.cpp cannot load {path}: {exc}",
                                  fix="the file is corrupt or not a llama.cpp model; re-run amoeba export") from exc
        self.threads = threads
        self.n_ctx = n_ctx

    @property
    def vocab_size(self) -> int:
        return int(self.llm.n_vocab())

    def _check_length(self, n: int) -> None:
        if n > self.n_ctx:
            raise ShapeError(f"{n} tokens exceed the runner's context of {self.n_ctx}",
                             fix="load the artifact with a larger n_ctx or pass shorter sequences")

    def _clear(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_seq_rm(-1, 0, -1)

    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in input_ids]
        self._check_length(len(ids))
        self._clear()
        vocab, step = self.vocab_size, self.llm.n_batch
        out = np.empty((len(ids), vocab), dtype=np.float32)
        ctx, batch = self.llm._ctx, self.llm._batch
        for start in range(0, len(ids), step):
            chunk = ids[start:start + step]
            batch.set_batch(batch=chunk, n_past=start, logits_all=True)
            ctx.decode(batch)
            out[start:start + len(chunk)] = np.ctypeslib.as_array(ctx.get_logits(), shape=(len(chunk), vocab))
        self._clear()  # the Llama object's own token bookkeeping knows nothing of this decode
        return out

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = ()) -> list[int]:
        ids = [int(t) for t in input_ids]
        self._check_length(len(ids) + max_new_tokens)
        # A fresh prefill every call: llama-cpp-python would otherwise reuse a matching cached prefix,
        # which makes repeated benchmark calls look faster than a new prompt is.
        self._clear()
        self.llm.set_seed(seed)
        stop = set(stop_ids)
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        for token in self.llm.generate(ids, temp=max(temperature, 0.0), top_p=top_p, top_k=0, min_p=0.0,
                                       typical_p=1.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) >= max_new_tokens or token in stop:
                break
        return out

    def tokenize(self, text: str) -> list[int]:
        """Ids from the tokenizer embedded in the GGUF (no BOS; special tokens in the text are parsed)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()
