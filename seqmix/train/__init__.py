"""Training with DeepSpeed ZeRO: recipes (schema), the DeepSpeed config, token shards and the loop."""
from seqmix.train.dist import shutdown
from seqmix.train.guards import TrainingDiverged
from seqmix.train.loop import RunResult, train
from seqmix.train.schema import Recipe, RecipeError, find_recipe, load_recipe

__all__ = ["Recipe", "RecipeError", "RunResult", "TrainingDiverged", "find_recipe", "load_recipe", "shutdown", "train"]
