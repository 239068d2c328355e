"""Built-in mixers (`mlp`, `conv`), registered through the same hook as every plugin."""
from seqmix.builtins.conv import BaseConv
from seqmix.builtins.mlp import SwiGLU
from seqmix.hookspecs import hookimpl


@hookimpl
def seqmix_register_mixers(register):
    register(SwiGLU)
    register(BaseConv)
