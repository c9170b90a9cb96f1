"""Closer to the hardware: precision choice, fused LoRA and projections, chunked loss, packed attention, threads, the heap."""
