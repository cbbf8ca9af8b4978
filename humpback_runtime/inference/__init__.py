"""Inference: engines (a vLLM server, in-process transformers or vLLM), the OpenAI-compatible client,
and the factory that gives a stage its engine (`models.engine_for`)."""
