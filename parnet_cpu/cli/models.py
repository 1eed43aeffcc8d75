"""`parnet-cpu models`: the registered variants with their parameter counts."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered ParNet variants")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.models.parnet import MODEL_CONFIGS, build_model, count_parameters
    from parnet_cpu.reparam.fuse import reparameterize

    rows = []
    for name, cfg in sorted(MODEL_CONFIGS.items()):
        model = build_model(cfg)
        rows.append({"name": name, "planes": cfg.planes, "blocks": cfg.num_blocks, "input_size": cfg.input_size,
                     "classes": cfg.num_classes, "activation": cfg.activation,
                     "params_train": count_parameters(model), "params_deploy": count_parameters(reparameterize(model))})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'name':<16}{'planes':<24}{'input':>6}{'classes':>8}{'params (train)':>16}{'params (deploy)':>17}")
        for r in rows:
            print(f"{r['name']:<16}{','.join(map(str, r['planes'])):<24}{r['input_size']:>6}{r['classes']:>8}"
                  f"{r['params_train']:>16,}{r['params_deploy']:>17,}")
    return 0
