"""MONAI Label tasks for the medad MVFA bundle: anomaly inference and few-shot adaptation.

Kept outside the ``medad`` package: MONAI Label pins numpy<2 and pydicom<3 and runs in its own
environment (``scripts/monailabel_env.sh``); ``medad`` never imports ``monailabel``.
"""
