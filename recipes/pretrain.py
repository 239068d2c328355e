"""Pretrain a seqmix model from a recipe in this folder (or a YAML path), on one CPU or many GPUs.

    python recipes/pretrain.py --recipe tiny                                  # CPU, about a minute
    deepspeed --num_gpus 8 recipes/pretrain.py --recipe based-360m            # one node
    deepspeed --hostfile hosts recipes/pretrain.py --recipe based-1b zero.stage=3 train.micro_batch=4
    torchrun --nproc_per_node 2 recipes/pretrain.py --recipe tiny             # any launcher that sets RANK etc.

Overrides are `section.key=value` (validated against seqmix/train/schema.py). Run the same command again after an
interruption and it resumes from the last checkpoint in train.run_dir.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.markup import escape

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="a recipe name in recipes/ (tiny, based-360m, ...) or a path to a YAML file")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides, e.g. train.steps=100")
    ap.add_argument("--list", action="store_true", help="list the recipes in recipes/ and exit")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved recipe and DeepSpeed config (for $WORLD_SIZE ranks, default 1) and exit")
    ap.add_argument("--prepare-data", action="store_true",
                    help="only tokenise the recipe's data into the shard cache (run once before a big job)")
    ap.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                    help="end this run after STEP with a checkpoint, as if interrupted (the schedule is unchanged)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launchers
    args = ap.parse_intermixed_args(argv)
    err = Console(stderr=True, soft_wrap=True)

    from seqmix.train import RecipeError, TrainingDiverged, find_recipe, load_recipe, shutdown, train
    from seqmix.train.ckpt import CheckpointError
    from seqmix.train.data import DataError
    from seqmix.train.ds_ops import StaleBuildLock
    from seqmix.train.runlock import RunDirBusy

    if args.list:
        for path in sorted(RECIPES_DIR.glob("*.yaml")):
            Console(soft_wrap=True).print(f"{path.stem:32s} {load_recipe(path).description}", highlight=False)
        return 0
    if not args.recipe:
        ap.error("--recipe is required (see --list)")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        recipe = load_recipe(find_recipe(args.recipe, [RECIPES_DIR]), args.overrides)
        if args.print_config:
            import json

            from seqmix.train.ds_config import build_ds_config
            from seqmix.train.schema import recipe_to_yaml

            ds = build_ds_config(recipe, int(os.environ.get("WORLD_SIZE", "1")))
            sys.stdout.write(f"{recipe_to_yaml(recipe)}\n# DeepSpeed config\n{json.dumps(ds, indent=2)}\n")
            return 0
        if args.prepare_data:
            from seqmix.train.data import prepare_data

            out = Console(soft_wrap=True)
            out.print(f"shards in {prepare_data(recipe.data, log=out.print)}")
            return 0
        train(recipe, stop_after=args.stop_after)
    except RecipeError as e:
        err.print(f"[red]recipe error:[/red] {escape(str(e))}", highlight=False)
        return 2
    except (FileNotFoundError, ImportError, CheckpointError, DataError, StaleBuildLock, RunDirBusy) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)  # data files, tokenizer packages,
        return 2  # checkpoints, a build lock, the run directory in use
    except TrainingDiverged as e:
        err.print(f"[red]training diverged:[/red] {escape(str(e))}", highlight=False)
        return 3
    except KeyboardInterrupt:
        err.print("interrupted: run the same command again to resume from the last checkpoint")
        return 130
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
