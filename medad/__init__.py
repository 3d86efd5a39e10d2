"""medad: MVFA (CVPR 2024) medical anomaly detection with CLIP and multi-level adapters."""

from medad.model.augment import augment_fewshot
from medad.model.backbone import TINY_MODEL_NAME, BackboneSpec, MissingWeightsError, create_clip
from medad.model.checkpoint import ModelDescription, describe
from medad.model.decision import Thresholds
from medad.model.detector import MVFADetector
from medad.model.factory import build_detector, load_detector
from medad.model.methods import METHODS, AnomalyScores, Method, RawScores, get_method, register_method
from medad.model.losses import AlignmentLoss, MVFALosses, focal_loss
from medad.model.network import AdaptedVisualTower, AdapterTokens, BackboneTokens, ResidualAdapter
from medad.surfaces.predict import Prediction, predict_input
from medad.model.prompts import ORGAN_NAMES, encode_prompt_ensemble, encode_text_features, prompt_name
from medad.engine.site import set_site_threshold
from medad.model.scoring import FusionRange, few_shot_maps, fuse, zero_shot_maps, zero_shot_scores
from medad.model.winclip import WinCLIP  # registers the WinCLIP baseline (method: winclip)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ORGAN_NAMES",
    "TINY_MODEL_NAME",
    "WinCLIP",
    "AdapterTokens",
    "AlignmentLoss",
    "AnomalyScores",
    "BackboneSpec",
    "BackboneTokens",
    "FusionRange",
    "AdaptedVisualTower",
    "MVFADetector",
    "MVFALosses",
    "Method",
    "MissingWeightsError",
    "ModelDescription",
    "Prediction",
    "RawScores",
    "ResidualAdapter",
    "Thresholds",
    "augment_fewshot",
    "build_detector",
    "create_clip",
    "describe",
    "encode_prompt_ensemble",
    "encode_text_features",
    "few_shot_maps",
    "focal_loss",
    "load_detector",
    "fuse",
    "get_method",
    "predict_input",
    "prompt_name",
    "register_method",
    "set_site_threshold",
    "zero_shot_maps",
    "zero_shot_scores",
]
