"""Training with DeepSpeed ZeRO: recipes (schema), the DeepSpeed config, token shards and the loop."""
from seqmix.train.loop import RunResult, TrainingDiverged, shutdown, train
from seqmix.train.schema import Recipe, RecipeError, find_recipe, load_recipe

__all__ = ["Recipe", "RecipeError", "RunResult", "TrainingDiverged", "find_recipe", "load_recipe", "shutdown", "train"]
