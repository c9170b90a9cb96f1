"""Models: finding and loading bases (folders, Hub ids, GGUF), results back by name, generation, merging, the reward and classifier models."""
