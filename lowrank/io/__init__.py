"""Files: atomic writes and digests, compressed checkpoints with their recipe, pretrained models, ONNX export."""
