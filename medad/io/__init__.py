"""Inputs and outputs: data layouts and lists, preprocessing transforms, input discovery and checks,
output writers and drawing, atomic files, and the evaluation report."""
