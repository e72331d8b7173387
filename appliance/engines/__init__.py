"""Engines: how a model version becomes a running worker (llama.cpp, vLLM, a remote upstream)."""
