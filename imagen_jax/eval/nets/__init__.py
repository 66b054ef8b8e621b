"""The networks the metrics run, ported to Flax with their weight loaders, kept apart from
the metrics themselves (imagen_jax/eval/):

  inception.py       the FID InceptionV3 (2015-12-05 graph), from pytorch-fid's files
  clip.py            CLIP's image and text towers, from Hugging Face or OpenAI files
  clip_tokenizer.py  CLIP's BPE tokenizer, id for id with transformers'
  torch_files.py     reading PyTorch checkpoint files without torch

Where the Inception weights are found (and the `python -m imagen_jax.eval.weights` CLI
that fetches them) stays in imagen_jax/eval/weights.py.
"""
