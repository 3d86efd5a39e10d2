"""The MONAI/Ignite glue: engines, inferers, handlers, metrics, the resume policy, tracking, few-shot
fitting, normal-only adaptation, site thresholds and the baselines' build."""
