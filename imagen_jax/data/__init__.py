"""Data: TFDS builders (array_record, no TensorFlow) and the grain input pipeline.

  builders/emoji_cascade/      the embedded offline dataset (twemoji + OpenMoji, CLDR captions)
  builders/image_text_folder/  a user's own folder of images + captions (COCO, CC-style)
  pipeline.py                  grain pipelines per cascade stage, checkpointable iterators
"""
