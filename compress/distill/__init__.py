"""Distillation: logit objectives, feature terms, teacher ensembles, teacher-output cache,
and the distill stage (compress.distill.stage)."""
