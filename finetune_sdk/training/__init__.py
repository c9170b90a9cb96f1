"""One training run, plan -> run -> save: the request check, the planner, the run engine with its callbacks and checkpoints, stages, saving."""
