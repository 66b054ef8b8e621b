"""TFDS dataset builders; each yields {"image": uint8 [R, R, 3], "caption": str, "id": str}."""
