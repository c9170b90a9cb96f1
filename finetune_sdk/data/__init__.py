"""Reading and encoding training data: rows from files, the checks that refuse data that can't teach, tokenizing with the prompt masked, packing."""
