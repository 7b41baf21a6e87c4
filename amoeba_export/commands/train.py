"""``amoeba train``: elastic fine-tune of a plan's model (SMoL + in-place distillation) on accelerate.

``--num-processes N`` starts N processes through accelerate's launcher; ``accelerate launch -m
amoeba_export.cli train ...`` works directly too (e.g. with an FSDP/DeepSpeed ``--config_file``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# CLI flag -> TrainConfig field (smol_* go to the SMoL config).
OVERRIDES = {
    "steps": int, "lr": float, "batch_size": int, "seq_len": int, "shapes_per_step": int, "temperature": float,
    "seed": int, "save_every": int, "keep_checkpoints": int, "mixed_precision": str, "width_mode": str,
    "data_format": str, "max_train_tokens": int, "scheduler": str, "warmup_steps": int, "max_grad_norm": float,
    "smol_experts": int, "smol_rank": int, "smol_alpha": float, "smol_top_k": int,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, help="plan folder written by `amoeba plan`")
    parser.add_argument("--out", required=True, help="run folder (an elastic checkpoint when finished)")
    parser.add_argument("--config", help="TrainConfig JSON; flags below override its fields")
    parser.add_argument("--data", nargs="+", metavar="FILE",
                        help=".txt/.jsonl text or Alpaca JSONL (instruction/input/output); default: train split")
    for name, typ in OVERRIDES.items():
        flag = "--" + name.removeprefix("smol_").replace("_", "-") if name.startswith("smol_") else \
            "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=typ, default=None)
    from ..finetune.config import QAT_SCALES, QAT_SCHEMES, QAT_TEACHERS  # torch-free

    parser.add_argument("--qat", metavar="SCHEME",
                        help="quantization-aware training: fake-quantize the decoder linears as this ExecuTorch "
                             f"recipe exports them ({', '.join(QAT_SCHEMES)}; lm_head stays unquantized)")
    parser.add_argument("--qat-scales", metavar="KIND",
                        help=f"int4 scales under --qat ({', '.join(QAT_SCALES)}; default absmax, torchao's QAT; "
                             "hqq: the recipe's own, slower)")
    parser.add_argument("--qat-teacher", metavar="KIND",
                        help=f"what quantized shapes learn from under --qat ({', '.join(QAT_TEACHERS)}; default "
                             "base: the frozen base model's full-precision logits, one more forward per step; "
                             "labels: the text, as without --qat)")
    parser.add_argument("--no-balance", action="store_true", help="turn loss-magnitude balancing off (ablation)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--force", action="store_true", help="replace an existing run folder")
    parser.add_argument("--num-processes", type=int, default=1,
                        help="processes to launch with accelerate (CPU: gloo DDP; GPU: one per device)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def resolve_config(args: argparse.Namespace):
    from ..finetune.config import TrainConfig

    config = TrainConfig.from_json_file(args.config) if args.config else TrainConfig()
    changes = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k, None) is not None}
    if args.data:
        changes["data_files"] = tuple(str(Path(p).absolute()) for p in args.data)
    for name in ("qat", "qat_scales", "qat_teacher"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.no_balance:
        changes["balance"] = False
    if args.gradient_checkpointing:
        changes["gradient_checkpointing"] = True
    return config.with_overrides(**changes).validate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, config) -> int:
    """Re-run this command in N processes through accelerate's launcher, with the resolved config."""
    import torch

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        fh.write(config.to_json())
        cfg_path = fh.name
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.num_processes),
           "--num_machines", "1", "--mixed_precision", config.mixed_precision, "--dynamo_backend", "no",
           "--main_process_port", str(_free_port())]
    # accelerate's --cpu launcher needs mpirun for several processes; its torchrun-based launcher with
    # ACCELERATE_USE_CPU gives gloo DDP on CPU instead.
    cmd += ["--multi_gpu"]
    cmd += ["-m", "amoeba_export.cli", "train", "--plan", args.plan, "--out", args.out, "--config", cfg_path]
    cmd += [flag for flag, on in (("--resume", args.resume), ("--force", args.force), ("--quiet", args.quiet)) if on]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    try:
        return subprocess.run(cmd, env=env).returncode
    finally:
        os.unlink(cfg_path)


def run(args: argparse.Namespace) -> int:
    from ..finetune.trainer import train

    config = resolve_config(args)
    if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        return launch(args, config)
    result = train(args.plan, config, args.out, resume=args.resume, force=args.force, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out": str(result.out), "steps": result.steps, "seconds": round(result.seconds, 1),
                          "last_losses": [round(v, 4) for v in result.last_losses]}))
    return 0
