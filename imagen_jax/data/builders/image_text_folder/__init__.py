"""`image_text_folder`: a TFDS builder for a user's own folder of captioned images."""

from imagen_jax.data.builders.image_text_folder.image_text_folder import (
    IMAGE_EXTENSIONS,
    LAYOUT_HELP,
    SKIP_REASONS,
    ImageTextFolder,
    ImageTextFolderBeam,
    ImageTextFolderConfig,
    UnusableImageError,
    as_beam,
    beam_download_config,
    config_name,
    fit_square,
    held_out_fraction,
    load_image,
    make_builder,
    to_rgb,
)
