#!/usr/bin/env python
"""Where one MAML meta-training step spends its time: torch.profiler over ours and higher, side by side.

Builds the contenders of ``maml_step.py`` for one configuration (same settings and flags), runs each once
to warm up, then once under ``torch.profiler``, and reports per contender the total self CPU time, the
share spent in convolution kernels (forward and backward) and the top operators.

    python benchmarks/profile_step.py --configs resnet10-dense-first --meta-batch 1

Writes ``benchmarks/results/profile_step.json`` (or ``--out``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import maml_step  # noqa: E402

from fewshot.config import cli_main  # noqa: E402

CONVOLUTION_OPS = (
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_slow_conv2d_forward",
    "aten::_slow_conv2d_backward",
    "aten::cudnn_convolution",
)


def profile_contender(step) -> dict[str, Any]:
    """Self CPU time of one step by operator (ms), its total and the convolution kernels' share."""
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    by_op = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
    total = sum(by_op.values())
    conv = sum(ms for op, ms in by_op.items() if op in CONVOLUTION_OPS)
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {
        "self_cpu_ms": round(total, 1),
        "convolution_ms": round(conv, 1),
        "convolution_share": round(conv / total, 4),
        "top_ops_ms": {k: round(v, 1) for k, v in top},
    }


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = maml_step.parse(argv)
    device = common.prepare_device(args.device, args.threads)
    contenders = [c for c in dict.fromkeys(args.contenders) if c in ("ours", "ours_vmap", "higher", "floor")]
    result: dict[str, Any] = {
        "benchmark": "profile_step",
        "command": common.command_line("profile_step", argv),
        "machine": common.machine(device),
        "settings": {"meta_batch": args.meta_batch, "image_size": args.image_size, "inner_steps": args.inner_steps},
        "notes": "self CPU time of one step under torch.profiler (the profiler adds overhead: compare shares, "
        "not times with maml_step.json); convolution_share = oneDNN/THNN convolution kernels.",
        "configs": {},
    }
    episodes = maml_step.make_episodes(args, device)
    for config in maml_step.select_configs(args.configs, args.backbones):
        row = {}
        for name in contenders:
            _, step = maml_step.build_contender(name, config, args, device, episodes)
            row[name] = profile_contender(step)
            print(
                f"{config.name} {name}: {row[name]['self_cpu_ms']:.0f} ms self CPU, convolutions "
                f"{100 * row[name]['convolution_share']:.0f}%",
                flush=True,
            )
        result["configs"][config.name] = row
    common.save_result(args.out, "profile_step", result)
    return result


if __name__ == "__main__":
    main()
