"""`parnet-cpu models`: the registered variants with their parameter counts."""
from __future__ import annotations

import argparse

from parnet_cpu.cli.common import add_json_arg, check_output_arg, json_to_stdout, write_json_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered ParNet variants")
    add_json_arg(p, "the variants")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.models.parnet import MODEL_CONFIGS, build_model, count_parameters
    from parnet_cpu.reparam.fuse import reparameterize

    check_output_arg(args, "json", "models")
    rows = []
    for name, cfg in sorted(MODEL_CONFIGS.items()):
        model = build_model(cfg)
        rows.append({"name": name, "planes": cfg.planes, "blocks": cfg.num_blocks, "input_size": cfg.input_size,
                     "classes": cfg.num_classes, "activation": cfg.activation,
                     "params_train": count_parameters(model), "params_deploy": count_parameters(reparameterize(model))})
    write_json_arg(args, "models", {"models": rows})
    if not json_to_stdout(args):
        print(f"{'name':<16}{'planes':<24}{'input':>6}{'classes':>8}{'params (train)':>16}{'params (deploy)':>17}")
        for r in rows:
            print(f"{r['name']:<16}{','.join(map(str, r['planes'])):<24}{r['input_size']:>6}{r['classes']:>8}"
                  f"{r['params_train']:>16,}{r['params_deploy']:>17,}")
    return 0
