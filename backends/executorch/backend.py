"""ExecuTorch backend: HF folder → StaticCacheLM (+ torchao recipe) → torch.export → XNNPACK → ``model.pte``.

The program has ExecuTorch's LLM-runner interface: ``forward(tokens [1, T], input_pos [1]) -> logits``
with T dynamic (prefill) and a KV cache held in mutable buffers, plus constant metadata methods
(``get_bos_id``, ``get_eos_ids``, ``get_max_seq_len``, ``get_max_context_len``, ``get_vocab_size``,
``get_n_layers``, ``use_kv_cache``, ``use_sdpa_with_kv_cache``, ``enable_dynamic_shape``) and
``tokenizer.json`` beside it, so the same file runs in ExecuTorch's llama runner. Mutable buffers are
serialized as shape only; attention never reads a cache slot it has not written (the ``custom`` attention
reads only filled positions, the ``masked`` baseline masks the rest).

``forward`` returns the last token's logits ``[1, vocab]`` (what a runner samples from). Validation needs every
token's logits: by default the runner steps through the prompt one token at a time (each step's logits are
one row), which costs no extra lowering; ``full_logits_method=True`` adds a second method, ``full_logits``
(same weights, its own cache, lowered in the same ``to_edge_transform_and_lower`` call), that prefills them
in one call. Export records seconds and peak RSS for each stage
(load, quantize, torch.export, lowering, serialization) in ``meta.json`` under ``export_stages``.

``dynamic_shape=False`` exports ``forward`` for one token per call (``enable_dynamic_shape`` false, which
ExecuTorch's runner answers by prefilling token by token, as this backend's runner does): symbolic sequence
lengths roughly double the lowering time (``bench/executorch_static_decode.py --layers 8``: export 48.6 vs
85.5 s; the full SmolLM2-135M 8da4w-attn exports in 187 s static on a 2-core Xeon, 360 s dynamic in a quiet run
on a 2-core EPYC). It decodes as fast — the same bench loads both programs in one process and steps them
alternately, 3 × 128 steps each: 2.518 vs 2.505 ms per step for 8 layers; the full model 6.50 vs 6.45 ms in a
one-off run of the same method; files within 0.05 % — but prefills at
decode speed (≈ 150 vs ≈ 900 tok/s for the full model), so artifacts stay dynamic and the deploy search's speed
calibration, which times decode only, exports its probes static (:meth:`ExecuTorchBackend.speed_twin`).
(An earlier note here said static programs decode slower, from two runs each of separate processes; on these
VMs such runs vary up to 2× from one minute to the next, which alternating steps cancel.)

The q/k/v and gate/up linears are not fused into one matmul each (ExecuTorch 1.4.1): tried on a 4-layer SmolLM2
probe (8da4w-attn, weights concatenated after quantization, outputs split back), lowering took as long (45-54 s
either way) and the split is not delegated — each layer's XNNPACK partition breaks around a portable
``split_with_sizes_copy`` (or ``slice_copy``) — so decode was no faster (interleaved runs: 444 vs 528 tok/s
median, within this VM's noise).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from amoeba_export.artifacts import atomic_dir, write_meta
from amoeba_export.errors import BackendError, CheckpointError

from ..base import Artifact, Backend, Runner
from ..meta import copy_tokenizer, export_meta, peak_rss_gb, tool_versions
from .module import ATTENTION, DEFAULT_ATTENTION, attention_kind, load_custom_ops
from .recipes import RECIPES, apply_recipe, calibration_for, get_recipe, rtn_twin
from .xnnpack_passes import only_passes_that_can_act

MODEL_FILE = "model.pte"
DEFAULT_MAX_CONTEXT = 512  # the validator's default row length; the cache costs layers*2*kv*ctx*head_dim floats
EXPORT_OPTIONS = ("max_context", "group_fallback", "attention", "full_logits_method", "dynamic_shape")
FULL_LOGITS_METHOD = "full_logits"  # every token's logits, for validation; forward gives the last token's
# The static KV cache is allocated whole: a million positions is already ~GBs for a small model.
MAX_CONTEXT_LIMIT = 1 << 20


def _special_ids(hf_dir: Path, config: Any) -> tuple[int, list[int]]:
    from transformers import GenerationConfig

    bos, eos = config.bos_token_id, config.eos_token_id
    try:
        gen = GenerationConfig.from_pretrained(str(hf_dir))
        bos = gen.bos_token_id if gen.bos_token_id is not None else bos
        eos = gen.eos_token_id if gen.eos_token_id is not None else eos
    except OSError:
        pass  # no generation_config.json: the model config's ids stand
    eos_ids = [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None]
    if bos is None or not eos_ids:
        raise CheckpointError(f"{hf_dir} names no BOS/EOS token ids",
                              fix="set bos_token_id and eos_token_id in config.json")
    return int(bos), eos_ids


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: ``echo 5 > /proc/self/clear_refs``), so the next reading is a stage's own
    peak; False where the kernel refuses (then stage peaks are cumulative, which the meta says)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class StageClock:
    """Seconds and peak RSS of each export stage, for ``meta.json`` (``export_stages``) and the profile."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self.per_stage_peak = True

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.per_stage_peak &= _reset_peak_rss()
        start = time.perf_counter()
        yield
        self.stages[name] = {"seconds": round(time.perf_counter() - start, 2), "peak_rss_gb": peak_rss_gb()}

    def seconds(self, name: str) -> float:
        return self.stages.get(name, {}).get("seconds", 0.0)

    def peak_gb(self) -> float:
        """The whole export's peak: each stage reset VmHWM, so the process's own reading is the last stage's."""
        return max([peak_rss_gb(), *(s["peak_rss_gb"] for s in self.stages.values())])


def _lower(programs: dict[str, Any], metadata: dict[str, Any], clock: StageClock):
    """All methods through one ``to_edge_transform_and_lower`` call, then to the ExecuTorch program."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    # XNNPACK's passes only where they can act (xnnpack_passes.py): the same program, ≈ 30 % less lowering time.
    with clock.stage("to_edge_transform_and_lower"), only_passes_that_can_act():
        edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()], constant_methods=metadata)
    with clock.stage("to_executorch"):
        return edge.to_executorch()


class ExecuTorchRunner(Runner):
    """A ``.pte`` in ``executorch.runtime`` (XNNPACK): full-sequence logits and KV-cached generation."""

    def __init__(self, artifact: Artifact, *, threads: int | None = None) -> None:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        if threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
        self.threads = threads or portable_lib._threadpool_get_thread_count()
        self.artifact = artifact
        path = artifact.model_file
        if not path.is_file():
            raise CheckpointError(f"{path} is missing", fix="re-export the artifact")
        try:
            load_custom_ops()  # before the program: its methods call llama::update_cache / custom_sdpa
            self.program = Runtime.get().load_program(path)
            self.method = self.program.load_method("forward")
            # The method giving every token's logits: full_logits when exported, else forward for artifacts of
            # the previous module (no "methods" in their meta: their forward returned every row), else none.
            if FULL_LOGITS_METHOD in self.program.method_names:
                self._full = self.program.load_method(FULL_LOGITS_METHOD)
            else:
                self._full = self.method if "methods" not in artifact.meta else None
            self.max_context = int(self.program.load_method("get_max_context_len").execute([])[0])
            self._vocab = int(self.program.load_method("get_vocab_size").execute([])[0])
            # False: forward takes one token per call, so a prompt is fed token by token.
            self._dynamic = (bool(self.program.load_method("enable_dynamic_shape").execute([])[0])
                             if "enable_dynamic_shape" in self.program.method_names else True)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise BackendError(f"cannot load {path}: it is corrupt or not an LLM program written by this backend "
                               f"({type(exc).__name__}: {exc})", fix="re-export the artifact") from exc
        self._tokenizer = None

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def _step(self, ids: Sequence[int], start: int, *, full: bool = False) -> np.ndarray:
        """Logits ``[rows, vocab]`` of ``ids`` at positions from ``start``: the last row, or every row with ``full``
        (from the ``full_logits`` method, whose cache is its own)."""
        import torch

        if not self._dynamic and len(ids) > 1:
            rows = [self._step([t], start + i) for i, t in enumerate(ids)]
            return np.concatenate(rows) if full else rows[-1]
        tokens = torch.tensor([list(ids)], dtype=torch.long)
        method = self._full if full else self.method
        out = method.execute([tokens, torch.tensor([start], dtype=torch.long)])[0]
        return out.reshape(-1, self._vocab).float().numpy()

    def _check_fits(self, n: int) -> None:
        if n > self.max_context:
            raise BackendError(f"{n} tokens do not fit the program's KV cache of {self.max_context}",
                               fix=f"re-export with max_context >= {n}")

    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        ids = list(input_ids)
        if not ids:
            raise BackendError("logits of an empty sequence", fix="pass at least one token id")
        self._check_fits(len(ids))
        if self._full is not None:
            return self._step(ids, 0, full=True)  # attention never reads past len(ids): no cache reset needed
        # forward gives the last token's logits only: one step per token yields every row, through exactly
        # the cached path that generation runs (slower than one prefill, but no second method to lower).
        return np.concatenate([self._step([t], i) for i, t in enumerate(ids)])

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = ()) -> list[int]:
        import torch

        from ..pytorch import _pick

        ids = list(input_ids)
        if not ids:
            raise BackendError("generation needs a prompt of at least one token", fix="pass a BOS token at least")
        self._check_fits(len(ids) + max_new_tokens - 1)
        gen = torch.Generator().manual_seed(seed)
        stop = set(stop_ids)
        out: list[int] = []
        logits = self._step(ids, 0)[-1]
        pos = len(ids)
        for _ in range(max_new_tokens):
            token = _pick(torch.from_numpy(logits), temperature, top_p, gen)
            out.append(token)
            if token in stop or len(out) == max_new_tokens:
                break
            logits = self._step([token], pos)[-1]
            pos += 1
        return out

    def tokenize(self, text: str) -> list[int]:
        """Token ids from the artifact's own tokenizer.json (what ExecuTorch's runner will use)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.artifact.path / "tokenizer.json"))
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def close(self) -> None:
        self.method = self._full = self.program = None


class ExecuTorchBackend(Backend):
    name = "executorch"
    extra = "executorch"
    runtime_modules = ("executorch", "torchao")
    runtime = "ExecuTorch"
    crash_fix = "reinstall executorch (pip install --force-reinstall executorch) and report this machine's CPU"
    quant_types = tuple(RECIPES)
    # passes its gate on small models (all-int4 "8da4w" does not); GPTQ halves 8da4w-attn's perplexity penalty
    # (SmolLM2-135M .pte: 1.085 → 1.037) for ≈ 1-2 min of calibration at export
    default_quant = "8da4w-attn-gptq"

    def export(self, hf_dir: Path, out_dir: Path, quant: str = "8da4w-attn-gptq", *, force: bool = False,
               max_context: int = DEFAULT_MAX_CONTEXT, group_fallback: bool = True,
               attention: str = DEFAULT_ATTENTION, full_logits_method: bool = False, dynamic_shape: bool = True,
               **options: Any) -> Artifact:
        """Options: ``max_context`` (KV-cache length), ``group_fallback`` (False: an indivisible width is an error),
        ``attention`` (``custom``: ExecuTorch's cache/SDPA ops; ``masked``: the previous module, a baseline),
        ``full_logits_method`` (True: add the ``full_logits`` method, so validation prefills instead of stepping
        token by token — at the cost of lowering the graph twice), ``dynamic_shape`` (False: one token per call,
        half the lowering time, prefill at decode speed)."""
        problems = self.option_problems(quant, {"max_context": max_context, "group_fallback": group_fallback,
                                                "attention": attention, "full_logits_method": full_logits_method,
                                                "dynamic_shape": dynamic_shape, **options})
        if problems:
            raise BackendError("; ".join(problems), fix="pass e.g. max_context=512; options: "
                               + ", ".join(EXPORT_OPTIONS))
        recipe = get_recipe(self.check_quant(quant))
        hf_dir = Path(hf_dir)
        if not (hf_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"{hf_dir} has no tokenizer.json (ExecuTorch's runner reads only that format)",
                                  fix="save a fast tokenizer into the folder")
        started = time.perf_counter()
        clock = StageClock()
        with atomic_dir(out_dir, force=force) as tmp:
            stages = tqdm(total=5, desc=f"executorch {recipe.name}", unit="stage")
            module, metadata, notes, rounding = self._prepare(hf_dir, recipe, max_context, group_fallback, attention,
                                                    dynamic_shape, stages, clock)
            programs = self._export(module, max_context, full_logits_method, dynamic_shape, stages, clock)
            stages.set_postfix_str("lowering to XNNPACK (slow)")
            program = _lower(programs, metadata, clock)
            stages.update()
            del programs, module
            with clock.stage("serialize"):
                (tmp / MODEL_FILE).write_bytes(program.buffer)
                del program
                copy_tokenizer(hf_dir, tmp)
            stages.update()
            stages.close()
            lower_seconds = clock.seconds("to_edge_transform_and_lower") + clock.seconds("to_executorch")
            meta = export_meta(
                backend=self.name, quant=recipe.name, hf_dir=hf_dir, folder=tmp, model_file=MODEL_FILE,
                started=started, tools=tool_versions("torch", "transformers", "executorch", "torchao"),
                notes=notes, recipe=asdict(recipe), attention=attention, rounding=rounding,
                methods=["forward"] + ([FULL_LOGITS_METHOD] if full_logits_method else []),
                max_context=max_context, program_metadata=metadata, lowering_seconds=round(lower_seconds, 1),
                export_stages=clock.stages, export_peak_rss_gb=clock.peak_gb(),
                export_stage_peaks="per stage" if clock.per_stage_peak
                else "cumulative (this kernel does not reset VmHWM)")
            write_meta(tmp, meta)
        return Artifact.open(out_dir)

    def speed_twin(self, quant: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The recipe's round-to-nearest twin (GPTQ changes codes only, never sizes, grids or kernels), exported
        one token per call: a static program lowers in about half the time and decodes as fast (module
        docstring), and a calibration times decode only. Without the validation method, which needs dynamic
        shapes and is never timed."""
        return rtn_twin(get_recipe(self.check_quant(quant))).name, {**options, "dynamic_shape": False,
                                                                     "full_logits_method": False}

    def option_problems(self, quant: str, options: dict[str, Any]) -> list[str]:
        out = [f"unknown ExecuTorch export option {k!r} (supported are: {', '.join(EXPORT_OPTIONS)})"
               for k in sorted(set(options) - set(EXPORT_OPTIONS))]
        ctx = options.get("max_context", DEFAULT_MAX_CONTEXT)
        if not isinstance(ctx, int) or isinstance(ctx, bool) or not 2 <= ctx <= MAX_CONTEXT_LIMIT:
            out.append(f"max_context must be an integer in 2..{MAX_CONTEXT_LIMIT}, got {ctx!r}")
        for flag in ("group_fallback", "full_logits_method", "dynamic_shape"):
            if not isinstance(options.get(flag, False), bool):
                out.append(f"{flag} must be true or false, got {options[flag]!r}")
        if options.get("full_logits_method") is True and options.get("dynamic_shape") is False:
            out.append("full_logits_method needs dynamic_shape (a one-token method has one row of logits)")
        if options.get("attention", DEFAULT_ATTENTION) not in ATTENTION:
            out.append(f"attention must be one of {', '.join(ATTENTION)}, got {options['attention']!r}")
        return out

    @staticmethod
    def _prepare(hf_dir: Path, recipe, max_context: int, group_fallback: bool, attention: str, dynamic_shape: bool,
                 stages, clock: StageClock):
        import torch

        from amoeba_export.modelio import load_model

        from .module import StaticCacheLM

        stages.set_postfix_str("loading")
        with clock.stage("load"), torch.no_grad():
            model = load_model(hf_dir)
            bos, eos = _special_ids(hf_dir, model.config)
            module = StaticCacheLM(model, max_context, attention=attention).eval()
        stages.update()
        stages.set_postfix_str(f"quantizing ({recipe.name})")
        # Quantized before torch.export (as ExecuTorch's export_llm does): the graph is traced once with the
        # quantized weights, and both methods share them.
        with clock.stage("quantize"), torch.no_grad():
            calibration = calibration_for(hf_dir, model, recipe)
            notes, rounding = apply_recipe(module, recipe, group_fallback=group_fallback, calibration=calibration)
        stages.update()
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if tied and recipe.head is None and recipe.embedding is None:
            notes.append("tied embedding: XNNPACK packs the lm_head weight into its delegate blob and the "
                         "embedding gather reads the program's constant, so the table is stored twice")
        metadata = {
            "get_bos_id": bos, "get_eos_ids": eos, "get_max_seq_len": max_context,
            "get_max_context_len": max_context, "get_vocab_size": int(model.config.vocab_size),
            "get_n_layers": int(model.config.num_hidden_layers), "use_kv_cache": True,
            "use_sdpa_with_kv_cache": attention_kind(attention).custom_ops, "enable_dynamic_shape": dynamic_shape,
        }
        return module, metadata, notes, rounding

    @staticmethod
    def _export(module, max_context: int, full_logits_method: bool, dynamic_shape: bool, stages,
                clock: StageClock) -> dict[str, Any]:
        import torch

        from .module import FullLogits

        stages.set_postfix_str("torch.export")
        length = min(4, max_context) if dynamic_shape else 1
        example = (torch.zeros(1, length, dtype=torch.long), torch.tensor([0], dtype=torch.long))
        seq = torch.export.Dim("seq", min=1, max=max_context)
        dynamic = ({1: seq}, None) if dynamic_shape else None
        methods = {"forward": module}
        if full_logits_method:
            methods[FULL_LOGITS_METHOD] = FullLogits(module)
        programs = {}
        # strict=True: non-strict tracing of the cache's index arithmetic yields a guard the solver rejects.
        with clock.stage("torch.export"), torch.no_grad():
            for name, mod in methods.items():
                try:
                    programs[name] = torch.export.export(mod, example, dynamic_shapes=dynamic, strict=True)
                except Exception as exc:  # torch.export raises many types; the model is the user's input
                    raise BackendError(f"torch.export failed: {type(exc).__name__}: {str(exc)[:500]}",
                                       fix="report the model's config; Llama-family decoders are supported") from exc
        stages.update()
        return programs

    def open_runner(self, artifact: Artifact, *, threads: int | None = None) -> Runner:
        return ExecuTorchRunner(artifact, threads=threads)
