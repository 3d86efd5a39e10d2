"""medad: MVFA (CVPR 2024) medical anomaly detection with CLIP and multi-level adapters."""

from medad.augment import augment_fewshot
from medad.backbone import TINY_MODEL_NAME, BackboneSpec, MissingWeightsError, create_clip
from medad.checkpoint import ModelDescription, describe
from medad.decision import Thresholds
from medad.detector import MVFADetector
from medad.factory import build_detector, load_detector
from medad.methods import METHODS, AnomalyScores, Method, RawScores, get_method, register_method
from medad.losses import AlignmentLoss, MVFALosses, focal_loss
from medad.network import AdaptedVisualTower, AdapterTokens, BackboneTokens, ResidualAdapter
from medad.predict import Prediction, predict_input
from medad.prompts import ORGAN_NAMES, encode_prompt_ensemble, encode_text_features, prompt_name
from medad.site import set_site_threshold
from medad.scoring import FusionRange, few_shot_maps, fuse, zero_shot_maps, zero_shot_scores
from medad.winclip import WinCLIP  # registers the WinCLIP baseline (method: winclip)

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
