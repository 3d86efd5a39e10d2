"""The method in plain torch: backbones and towers, the network, prompts, scoring and losses, the
methods and their registry, the detector, its factory and its model file."""
