"""Multiple-choice accuracy by log-likelihood on BIG-bench JSON tasks, and any runner as an lm-eval model.

BIG-bench tasks are read straight out of the ``bigbench==1.0.0`` sdist in the cache (never installed).
Zero-shot prompts follow BIG-bench's JSON-task format: ``task_prefix + example_input_prefix + input``,
the choices appended with ``choice_prefix`` when ``append_choices_to_input`` (in BIG-bench's seeded order),
then ``example_output_prefix``; each choice is scored by the summed log-probability of its tokens and the
highest-scoring choice is the answer. For everything else, :class:`RunnerLM` makes any exported artifact
an lm-eval 0.4.x model (``pip install 'amoeba-export[eval]'``), so lm-eval's own tasks run on it.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from amoeba_export.errors import DataError, RuntimeMissingError
from amoeba_export.paths import cache_subdir
from amoeba_export.resources import BIGBENCH, fetch_package

TASKS_ROOT = "bigbench/benchmark_tasks/"
BIGBENCH_SEED = 42  # BIG-bench's default random_seed for formatting examples


@dataclass(frozen=True)
class MCExample:
    prompt: str
    choices: tuple[str, ...]
    correct: frozenset[int]  # indices of the choices with the highest target score


@dataclass(frozen=True)
class MCTask:
    name: str
    description: str
    examples: tuple[MCExample, ...] = field(repr=False)

    @property
    def chance(self) -> float:
        """Expected accuracy of guessing uniformly among each example's choices."""
        return float(np.mean([len(e.correct) / len(e.choices) for e in self.examples]))


def _tasks_dir() -> Path:
    return cache_subdir("data", f"bigbench-{BIGBENCH.version}")


def _scan(wanted: set[str] | None) -> list[str]:
    """One pass over the sdist: every task name, extracting the ``wanted`` ones (all task files are 1.7 GB)."""
    names = []
    with tarfile.open(fetch_package(BIGBENCH)) as tar:
        for member in tqdm(tar, desc="read BIG-bench sdist", unit="file", leave=False):
            _, _, rel = member.name.partition(TASKS_ROOT)
            if not (member.isfile() and rel.endswith("/task.json")):
                continue
            name = rel[: -len("/task.json")]
            names.append(name)
            if wanted is not None and name in wanted:
                dest = _tasks_dir() / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_suffix(".part")
                tmp.write_bytes(tar.extractfile(member).read())
                tmp.replace(dest)
                wanted.discard(name)
                if not wanted and (_tasks_dir() / "index.json").is_file():
                    break
    return sorted(names)


def bigbench_task_names() -> list[str]:
    """Every BIG-bench JSON task (``name`` or ``name/subtask``) in the sdist."""
    index = _tasks_dir() / "index.json"
    if not index.is_file():
        names = _scan(None)
        index.write_text(json.dumps(names))
    return json.loads(index.read_text())


def parse_task(data: dict[str, Any], name: str, *, seed: int = BIGBENCH_SEED) -> MCTask:
    if not any("target_scores" in ex for ex in data.get("examples", [])):
        raise DataError(f"BIG-bench task {name!r} has no multiple-choice examples",
                        fix="pick a task whose examples carry target_scores")
    input_prefix = data.get("example_input_prefix", "\nQ: ")
    output_prefix = data.get("example_output_prefix", "\nA: ")
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    append = data.get("append_choices_to_input", True)
    task_prefix = str(data.get("task_prefix", ""))
    examples, seen = [], set()
    for ex in data["examples"]:
        key = json.dumps(ex, sort_keys=True)
        if "target_scores" not in ex or key in seen:  # BIG-bench also drops duplicates
            continue
        seen.add(key)
        scores = ex["target_scores"]
        choices = tuple(scores)
        best = max(scores.values())
        # BIG-bench lists the choices in a seeded permutation of their sorted order (seed 42 by default).
        shown = np.random.RandomState(seed=seed).permutation(sorted(choices))
        text = ex["input"] + (choice_prefix + choice_prefix.join(shown) if append else "")
        examples.append(MCExample(task_prefix + input_prefix + text + output_prefix, choices,
                                  frozenset(i for i, c in enumerate(choices) if scores[c] == best)))
    return MCTask(name, data.get("description", ""), tuple(examples))


def load_bigbench_task(name: str) -> MCTask:
    path = _tasks_dir() / name / "task.json"
    if not path.is_file() and name in bigbench_task_names():
        _scan({name})
    if not path.is_file():
        close = [n for n in bigbench_task_names() if n.split("/")[0] == name.split("/")[0]]
        raise DataError(f"no BIG-bench JSON task {name!r}" + (f" (subtasks: {', '.join(close)})" if close else ""),
                        fix="pick one of bigbench_task_names()")
    return parse_task(json.loads(path.read_text()), name)


def load_bigbench_tasks(names: Sequence[str]) -> list[MCTask]:
    """Several tasks, extracting the missing ones in one pass over the sdist (a pass takes about a minute)."""
    missing = {n for n in names if not (_tasks_dir() / n / "task.json").is_file() and n in bigbench_task_names()}
    if missing:
        _scan(missing)
    return [load_bigbench_task(n) for n in names]


def continuation_logprob(runner, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> tuple[float, bool]:
    """Summed log p(continuation | context) and whether it is the greedy continuation."""
    if not context_ids or not continuation_ids:
        raise DataError("log-likelihood needs a non-empty context and continuation",
                        fix="give the context at least one token (e.g. BOS)")
    ids = list(context_ids) + list(continuation_ids)
    logits = runner.logits(ids[:-1])[len(context_ids) - 1:].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    target = np.asarray(continuation_ids)
    total = float(logp[np.arange(len(target)), target].sum())
    return total, bool((logits.argmax(-1) == target).all())


def split_encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as the tokenizer splits their concatenation (lm-eval's rule)."""
    if context and context[-1] == " ":  # a trailing space belongs to the next word's token
        context, continuation = context[:-1], " " + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    if not ctx:
        ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        whole = ctx + whole
    return whole[: len(ctx)], whole[len(ctx):]


def evaluate_mc(runner, tokenizer, task: MCTask, *, limit: int | None = None, progress: bool = True
                ) -> dict[str, Any]:
    """Accuracy of ``runner`` on ``task`` (multiple choice by summed log-likelihood).

    ``z_vs_chance`` is how many standard errors the number correct lies above what uniform guessing expects:
    each example is a Bernoulli trial with p = |correct| / |choices| under guessing, so the count has mean
    Σp and variance Σp(1 − p).
    """
    examples = task.examples[:limit] if limit else task.examples
    correct = 0
    for ex in tqdm(examples, desc=task.name, unit="ex", disable=not progress):
        scores = [continuation_logprob(runner, *split_encode(tokenizer, ex.prompt, c))[0] for c in ex.choices]
        correct += int(int(np.argmax(scores)) in ex.correct)
    n = len(examples)
    p = np.array([len(e.correct) / len(e.choices) for e in examples])
    spread = float(np.sqrt((p * (1 - p)).sum()))
    return {"task": task.name, "correct": correct, "total": n, "accuracy": correct / n,
            "chance": float(p.mean()), "z_vs_chance": (correct - float(p.sum())) / spread if spread else 0.0}


class LogitsRunner:
    """Any logits function (``[b, t]`` ids → ``[b, t, vocab]``: an elastic shape, an HF model) as a scorer's
    runner, so multiple-choice tasks run on a shape without exporting it."""

    def __init__(self, logits_fn) -> None:
        self.logits_fn = logits_fn

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.logits_fn(torch.tensor([list(ids)]))[0].float().numpy()


def artifact_tokenizer(artifact_dir: str | Path):
    """The HF tokenizer stored with an artifact (``tokenizer/`` or the folder itself), else its source's."""
    from amoeba_export.artifacts import read_meta
    from amoeba_export.modelio import load_tokenizer

    artifact_dir = Path(artifact_dir)
    for folder in (artifact_dir / "tokenizer", artifact_dir):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return load_tokenizer(folder)
    source = read_meta(artifact_dir, kind="export").get("source", {}).get("hf_dir")
    if source and Path(source).is_dir():
        return load_tokenizer(source)
    raise DataError(f"{artifact_dir} holds no tokenizer and its source folder is gone",
                    fix="re-export the artifact (every backend copies the tokenizer)")


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError as exc:
        raise RuntimeMissingError("lm-eval is not installed", fix="pip install 'amoeba-export[eval]'") from exc
    return LM


def runner_lm(artifact_dir: str | Path, *, threads: int | None = None, max_length: int = 2048):
    """An lm-eval ``LM`` running an exported artifact: ``lm_eval.simple_evaluate(model=runner_lm(DIR), ...)``."""
    from amoeba_export.backends import load_artifact

    artifact, backend = load_artifact(artifact_dir)
    runner = backend.load(artifact, threads=threads)
    return _runner_lm_class()(runner, artifact_tokenizer(artifact.path), max_length=max_length)


def _runner_lm_class():
    LM = _lm_base()

    class RunnerLM(LM):
        """lm-eval's three request types answered through the Runner contract (batch size 1)."""

        def __init__(self, runner, tokenizer, *, max_length: int = 2048) -> None:
            super().__init__()
            self.runner, self.tokenizer, self.max_length = runner, tokenizer, max_length

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            out = []
            for req in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
                context, continuation = req.args
                ctx, cont = split_encode(self.tokenizer, context, continuation)
                ctx = ctx[-(self.max_length - len(cont)):]  # keep the continuation, truncate context on the left
                out.append(continuation_logprob(self.runner, ctx, cont))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else \
                self.tokenizer.eos_token_id
            out = []
            for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
                ids = self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"]
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=prefix, max_seq_len=self.max_length, context_len=1))
                out.append(sum(continuation_logprob(self.runner, c, t)[0] for c, t in windows))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = self.tokenizer(context)["input_ids"]
                new = self.runner.generate(ids, int(kwargs.get("max_gen_toks", 256)),
                                           temperature=float(kwargs.get("temperature", 0.0) or 0.0),
                                           stop_ids=[self.tokenizer.eos_token_id]
                                           if self.tokenizer.eos_token_id is not None else [])
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                cut = min((text.find(s) for s in until if s and s in text), default=len(text))
                out.append(text[:cut])
            return out

    return RunnerLM

