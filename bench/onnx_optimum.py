"""Interop: an amoeba ONNX export loads and generates in optimum's ORTModelForCausalLM.

optimum-onnx 0.1.0 needs transformers < 4.58, which cannot live beside this project's transformers 5, so
the check runs in a side virtual environment: optimum-onnx, optimum 2.1, transformers 4.57 and the
huggingface_hub/tokenizers they need are installed there (pinned, without dependencies); torch, numpy and
onnxruntime are borrowed from this environment through a .pth file placed *after* the side packages.
Greedy tokens from optimum must equal the ones from our own runner.

    python bench/onnx_optimum.py ARTIFACT_DIR [--new-tokens 16]

Ends with one ``RESULT {json}`` line; exits non-zero when optimum's tokens differ or it cannot load.
"""

from __future__ import annotations

import argparse
import json
import site
import subprocess
import sys
import venv
from pathlib import Path

from amoeba_export.paths import cache_subdir

SIDE_PACKAGES = ("optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "huggingface_hub==0.36.2",
                 "tokenizers==0.22.2")
PROMPT = "The capital of France is"

CHILD = r"""
import json, sys
import transformers
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
path, n, ids = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(path, use_cache=True, use_io_binding=False,
                                            provider="CPUExecutionProvider")
import torch
out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                     max_new_tokens=n, min_new_tokens=n, do_sample=False)
print(json.dumps({"tokens": out[0, len(ids):].tolist(), "transformers": transformers.__version__,
                  "class": type(model).__name__, "use_cache": bool(model.config.use_cache)}))
"""


def side_env(root: Path) -> Path:
    """The side environment's python (created once)."""
    python = root / "bin" / "python"
    if not python.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(root)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *SIDE_PACKAGES], check=True)
        ours = site.getsitepackages()[0]
        side = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        # "zz" sorts last: the side packages shadow ours, everything else falls through to ours.
        (Path(side) / "zz_amoeba_env.pth").write_text(ours + "\n")
    return python


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--env", default=None, help="side environment folder (default: in the cache)")
    args = ap.parse_args(argv)

    from amoeba_export.backends import load_artifact

    artifact, backend = load_artifact(args.artifact)
    with backend.load(artifact) as runner:
        ids = runner.tokenize(PROMPT)
        ours = runner.generate(ids, args.new_tokens)
    python = side_env(Path(args.env) if args.env else cache_subdir("envs") / "optimum-onnx-0.1.0")
    proc = subprocess.run([str(python), "-c", CHILD, str(artifact.path), str(args.new_tokens), json.dumps(ids)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)
        print("RESULT " + json.dumps({"optimum_loads": False, "match": False}))
        return 1
    theirs = json.loads(lines[-1])
    match = theirs["tokens"] == ours
    print(f"amoeba runner: {ours}\noptimum {theirs['class']} (transformers {theirs['transformers']}): "
          f"{theirs['tokens']}\n{'identical' if match else 'DIFFERENT'} greedy tokens")
    print("RESULT " + json.dumps({"optimum_loads": True, "match": match, "quant": artifact.quant,
                                  "new_tokens": args.new_tokens, "optimum_transformers": theirs["transformers"],
                                  "optimum_use_cache": theirs["use_cache"]}))
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main())
