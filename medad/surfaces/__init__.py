"""What users run: ``predict_input`` (Python, MONAI Label) and the helpers the bundle configs call."""
