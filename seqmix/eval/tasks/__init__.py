"""lm-eval task configs shipped with seqmix (the Based paper's recall tasks); TaskManager(include_path=TASKS_DIR)."""
