"""The continuous-batching engine: sequences, scheduler, KV cache, runner, sampler."""
