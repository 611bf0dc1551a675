"""How a model is served and scored: the compiled forms (exact arrays, ONNX), their parity check, and batch scoring."""
