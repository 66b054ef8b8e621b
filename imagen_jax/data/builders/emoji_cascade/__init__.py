"""emoji_cascade: twemoji + OpenMoji SVGs rendered at 64/256/1024 px with CLDR captions.

Importing this package registers the TFDS builder "emoji_cascade" (configs "64px",
"256px", "1024px"); `make_builder` also makes limited configs such as "64px_limit12".
"""

from imagen_jax.data.builders.emoji_cascade.emoji_cascade import (
    RESOLUTIONS,
    STYLES,
    Drawing,
    EmojiCascade,
    EmojiCascadeConfig,
    Enumeration,
    cldr_name,
    concept_of,
    config_name,
    enumerate_drawings,
    is_test_concept,
    make_builder,
    render_png,
)
