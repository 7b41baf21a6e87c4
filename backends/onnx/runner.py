"""An exported decoder in onnxruntime (CPU execution provider) with a KV-cached generation loop."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from amoeba_export.errors import BackendError

from ..base import Runner

# Recorded in meta.json: the session-level optimisation every load applies (fusions, constant folding).
GRAPH_OPTIMIZATION = "ORT_ENABLE_ALL"
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_options(threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
        # Spinning worker threads steal cycles from other processes on a shared, small machine.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if threads <= 2 else "1")
    opts.log_severity_level = 3
    return opts


def open_session(model_file: Path, threads: int | None = None):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(model_file), sess_options=session_options(threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise BackendError(f"onnxruntime cannot load {model_file}: {type(exc).__name__}: {str(exc)[:300]}",
                           fix="re-export the model (the file is corrupt, truncated or from another tool)") from exc


def sample_next(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when ``temperature`` is 0, else nucleus sampling over the softmax at that temperature."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p  # always keeps the most likely token
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


class OnnxRunner(Runner):
    """Feeds the optimum/onnxruntime-genai-style inputs; the cache layout is read from the graph itself."""

    def __init__(self, model_file: Path, *, threads: int | None = None, tokenizer_dir: Path | None = None) -> None:
        self.threads = threads
        tok = Path(tokenizer_dir or model_file.parent) / "tokenizer.json"
        self._tokenizer_file = tok if tok.is_file() else None
        self._tokenizer = None
        self.session = open_session(model_file, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        required = {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key"}
        if not required <= inputs.keys():
            raise BackendError(f"{model_file} lacks the decoder inputs {sorted(required - inputs.keys())}",
                               fix="export it with `amoeba export --backend onnx`")
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        # [batch, kv_heads, past, head_dim]: the two middle dims are constants per layer.
        self.past_shapes = [(inputs[n].shape[1], inputs[n].shape[3]) for n in self.past_names]
        self.dtype = _NP_TYPES.get(inputs["past_key_values.0.key"].type, np.float32)
        logits_shape = self.session.get_outputs()[0].shape
        self._vocab = int(logits_shape[-1])

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def tokenize(self, text: str) -> list[int]:
        """Ids from the artifact's own tokenizer.json (what onnxruntime-genai and optimum users get)."""
        if self._tokenizer_file is None:
            raise BackendError("this artifact has no tokenizer.json", fix="re-export it from an HF folder with one")
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self._tokenizer_file))
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), dtype=self.dtype) for h, d in self.past_shapes]

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward of ``[batch, seq]`` ids after ``past``; returns logits and the grown cache."""
        batch, seq = ids.shape
        start = past[0].shape[2]
        feed = {
            "input_ids": ids.astype(np.int64, copy=False),
            "attention_mask": np.ones((batch, start + seq), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(start, start + seq, dtype=np.int64), (batch, seq)).copy(),
        }
        feed.update(zip(self.past_names, past))
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)[None]
        logits, _ = self.step(ids, self.empty_cache(1))
        return logits[0].astype(np.float32, copy=False)

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = ()) -> list[int]:
        if not len(input_ids):
            raise BackendError("generate needs at least one prompt token", fix="pass a non-empty prompt")
        rng = np.random.default_rng(seed)
        stop = set(stop_ids)
        logits, past = self.step(np.asarray(input_ids, dtype=np.int64)[None], self.empty_cache(1))
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = sample_next(logits[0, -1], temperature, top_p, rng)
            new.append(token)
            if token in stop or len(new) == max_new_tokens:
                break
            logits, past = self.step(np.array([[token]], dtype=np.int64), past)
        return new

    def close(self) -> None:
        self.session = None
