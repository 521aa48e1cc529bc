"""What is built on the engine: evaluation and metrics, training, reuse (continuous learning), score calibration,
repair, and energy."""
