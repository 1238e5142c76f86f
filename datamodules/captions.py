"""Caption rewriting at load time: tag shuffling (keeping the first N tags) and a template.

Tag-style captions ("sks dog, sitting, grass, sunny") teach the model their order as well as their
tags unless the order varies; a trigger word or subject kept first stays where prompts will put it.
A template ("a photo of {caption}") puts a single-concept set's bare captions into the sentence
form the text encoder was trained on. The shuffle draws from the `rng` the transforms receive per
sample, so a resumed run writes each caption as the uninterrupted run would have.
"""

from __future__ import annotations

import random

PLACEHOLDER = "{caption}"


class CaptionProcessor:
    """caption -> caption: shuffle its tags (all but the first `keep_tags`), then fill `template`.

    Args:
        template: text holding "{caption}", replaced by the (shuffled) caption; None: as is.
        shuffle_tags: shuffle the caption's tags, split at `tag_separator` and rejoined with the
            separator and one space ("a, b,c" -> "b, a, c" or ...); empty tags are dropped.
        keep_tags: how many leading tags stay first, in place (a trigger word, the subject).
        tag_separator: what separates tags ("," for booru-style and most LoRA sets).
    """

    def __init__(
        self,
        template: str | None = None,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
        tag_separator: str = ",",
    ) -> None:
        if template is not None and PLACEHOLDER not in template:
            raise ValueError(f"data.caption_template={template!r} lacks {PLACEHOLDER}")
        if not isinstance(keep_tags, int) or isinstance(keep_tags, bool) or keep_tags < 0:
            raise ValueError(f"data.keep_tags={keep_tags!r} must be a whole number >= 0")
        if not tag_separator:
            raise ValueError("data.tag_separator='' cannot split tags: use e.g. ','")
        self.template = template
        self.shuffle_tags = shuffle_tags
        self.keep_tags = keep_tags
        self.tag_separator = tag_separator

    @property
    def active(self) -> bool:
        """Whether any caption can come out changed (a processor that is not is skipped)."""
        return self.template is not None or self.shuffle_tags

    def __call__(self, caption: str, rng: random.Random | None = None) -> str:
        """The caption rewritten; `rng` (default: the `random` module) draws the shuffle."""
        if self.shuffle_tags:
            caption = self.shuffle(caption, rng or random)
        if self.template is not None:
            caption = self.template.replace(PLACEHOLDER, caption)
        return caption

    def shuffle(self, caption: str, rng) -> str:
        """Tags after the first `keep_tags` in an order drawn from `rng`; the first stay in place."""
        tags = [t.strip() for t in caption.split(self.tag_separator)]
        tags = [t for t in tags if t]
        head, tail = tags[: self.keep_tags], tags[self.keep_tags :]
        rng.shuffle(tail)
        joiner = self.tag_separator if self.tag_separator.isspace() else self.tag_separator + " "
        return joiner.join(head + tail)


def caption_processor(
    template: str | None, shuffle_tags: bool, keep_tags: int, tag_separator: str = ","
) -> CaptionProcessor | None:
    """A processor for these data options, or None when they leave every caption as written."""
    proc = CaptionProcessor(template, shuffle_tags, keep_tags, tag_separator)
    return proc if proc.active else None
