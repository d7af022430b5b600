"""Base-model loading: source resolution, the bundled demo model, NF4 quantization, memory report."""
