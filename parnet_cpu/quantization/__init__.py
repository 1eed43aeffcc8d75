"""INT8 post-training quantization (OpenVINO + NNCF)."""
