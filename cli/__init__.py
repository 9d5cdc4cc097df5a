"""The `ortllm` command line."""
