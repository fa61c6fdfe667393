"""Evaluation: metrics, statistics, figures, the HTML report, translate and ONNX export."""
