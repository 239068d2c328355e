"""`python -m seqmix.eval ARGS`: lm-eval's command line, ARGS unchanged, with `--model seqmix` registered."""
import sys

from seqmix.eval import run_lm_eval_cli

if __name__ == "__main__":
    run_lm_eval_cli(sys.argv[1:])
