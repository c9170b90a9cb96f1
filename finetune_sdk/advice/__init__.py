"""Before a run: a model's shape, the memory estimate, the machine, the advisor, and when prompting beats fine-tuning."""
