"""``manifold-ext info``: what the compiled kernels were built with, and the devices present."""

from __future__ import annotations

import argparse
import json

import torch

from .. import build_info


def add_parser(sub, common) -> None:
    """Register ``info`` on the subcommand parsers ``sub``."""
    p = sub.add_parser("info", parents=[common],
                       help="print what the compiled kernels were built with, and the devices, as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    info = build_info()
    info["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(json.dumps(info, indent=2))
    return 0
