"""The caption grammar of the demo scenes, its parser, and caption scoring.

The demo model is trained on these captions and judged against them, so the grammar is
closed and exact: every scene has exactly one caption, and every caption parses back
into the objects it names. That is what makes the demo's captions checkable. Tokens are
words and the comma::

    caption         := object                                  (1 object)
                     | object "and" object                     (2 objects)
                     | object "," object "and" object          (3 objects)
    object          := "a" size colour shape position_phrase
    position_phrase := "on the left" | "at the top" | "in the centre"
                     | "at the bottom" | "on the right"

Objects are listed in the canonical position order left, top, centre, bottom, right, and
a position occurs at most once; the parser rejects anything else, so
``caption_for(parse_caption(text)) == text`` for every text it accepts (up to
whitespace around words and commas).

Errors: ``CaptionParseError`` (a ``ValueError``) for text outside the grammar, naming the
offending word and its index; plain ``ValueError`` for an impossible ``SceneObject``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "CAPTION_VOCABULARY",
    "COLOURS",
    "MAX_OBJECTS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "CaptionParseError",
    "SceneObject",
    "caption_for",
    "caption_words",
    "parse_caption",
    "score_captions",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
# The canonical order: a caption lists its objects in this order.
POSITIONS: tuple[str, ...] = ("left", "top", "centre", "bottom", "right")
MAX_OBJECTS = 3

_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on", "the", "left"),
    "top": ("at", "the", "top"),
    "centre": ("in", "the", "centre"),
    "bottom": ("at", "the", "bottom"),
    "right": ("on", "the", "right"),
}


def _grammar_words() -> list[str]:
    words = ["a", *SIZES, *COLOURS, *SHAPES]
    for phrase in _POSITION_PHRASES.values():
        words.extend(phrase)
    words.extend(["and", ","])
    return list(dict.fromkeys(words))  # drop repeats ("the", "on", "at"), keep order


# Every token a caption can contain, "," included (see ``caption_words``). The order is
# fixed by the grammar above, so a tokenizer built from it gets the same ids every run.
CAPTION_VOCABULARY: list[str] = _grammar_words()

_WORD_PATTERN = re.compile(r"[^\s,]+|,")


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene, in the caption's words (``shape="star"``, ``position="left"``)."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field_name, allowed in (
            ("shape", SHAPES),
            ("colour", COLOURS),
            ("size", SIZES),
            ("position", POSITIONS),
        ):
            value = getattr(self, field_name)
            if value not in allowed:
                raise ValueError(
                    f"SceneObject.{field_name} must be one of {allowed}, got {value!r}"
                )


class CaptionParseError(ValueError):
    """Text that does not follow the caption grammar; ``word_index`` is ``None`` when the
    problem is the caption as a whole (its object order, say) rather than one word."""

    def __init__(self, text: str, problem: str, word_index: int | None = None) -> None:
        self.text = text
        self.problem = problem
        self.word_index = word_index
        super().__init__(f"{problem} in caption {text!r}")


class _Captioned(Protocol):
    caption: str


def caption_words(text: str) -> list[str]:
    """Split a caption into its tokens: words, with each comma a token of its own.

    The demo tokenizer splits the same way, which is why "," is in ``CAPTION_VOCABULARY``.
    """
    return _WORD_PATTERN.findall(text)


def caption_for(objects: Sequence[SceneObject]) -> str:
    """The one caption of a set of objects: canonical position order, grammar joiners."""
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"a caption names 1 to {MAX_OBJECTS} objects, got {len(objects)}")
    positions = [obj.position for obj in objects]
    if len(set(positions)) != len(positions):
        raise ValueError(f"each object needs its own position, got {positions}")
    ordered = sorted(objects, key=lambda obj: POSITIONS.index(obj.position))
    phrases = [
        f"a {obj.size} {obj.colour} {obj.shape} {' '.join(_POSITION_PHRASES[obj.position])}"
        for obj in ordered
    ]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


class _WordReader:
    """A cursor over a caption's words that raises ``CaptionParseError`` at the word where
    the text leaves the grammar."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = caption_words(text)
        self.index = 0

    def at_end(self) -> bool:
        return self.index == len(self.words)

    def error(self, expected: str) -> CaptionParseError:
        if self.at_end():
            return CaptionParseError(self.text, f"expected {expected}, got the end of the text")
        word = self.words[self.index]
        return CaptionParseError(
            self.text, f"expected {expected}, got {word!r} at word {self.index}", self.index
        )

    def take(self, allowed: Sequence[str], expected: str) -> str:
        if self.at_end() or self.words[self.index] not in allowed:
            raise self.error(expected)
        self.index += 1
        return self.words[self.index - 1]

    def take_position_phrase(self) -> str:
        matched_words = 0
        for position, phrase in _POSITION_PHRASES.items():
            words = tuple(self.words[self.index : self.index + len(phrase)])
            if words == phrase:
                self.index += len(phrase)
                return position
            matched_words = max(matched_words, _common_prefix_length(words, phrase))
        # Point at the first word that fits no phrase ("left." in "on the left."), not at "on".
        self.index += matched_words
        listed = ", ".join(repr(" ".join(phrase)) for phrase in _POSITION_PHRASES.values())
        raise self.error(f"a position phrase ({listed})")

    def take_object(self) -> SceneObject:
        self.take(("a",), "'a' starting an object")
        size = self.take(SIZES, f"a size {SIZES}")
        colour = self.take(COLOURS, f"a colour {COLOURS}")
        shape = self.take(SHAPES, f"a shape {SHAPES}")
        return SceneObject(shape, colour, size, self.take_position_phrase())


def _common_prefix_length(first: Sequence[str], second: Sequence[str]) -> int:
    length = 0
    while length < min(len(first), len(second)) and first[length] == second[length]:
        length += 1
    return length


def _join_pattern(separators: Sequence[str]) -> str:
    """Separators such as ``[',', 'and']`` drawn as ``'X, X and X'`` for error messages."""
    return "X" + "".join(
        ", X" if separator == "," else f" {separator} X" for separator in separators
    )


def parse_caption(text: str) -> list[SceneObject]:
    """The objects a caption names, in caption (canonical) order.

    Strict on purpose: a caption the generator could not have written is an error, not a
    best guess, so scoring never credits a prediction for text outside the grammar.
    """
    reader = _WordReader(text)
    if reader.at_end():
        raise CaptionParseError(text, "the caption is empty")
    objects = [reader.take_object()]
    separators: list[str] = []
    while not reader.at_end():
        if len(objects) == MAX_OBJECTS:
            raise reader.error(f"the end of the caption after {MAX_OBJECTS} objects")
        separators.append(reader.take((",", "and"), "',' or 'and' between objects"))
        objects.append(reader.take_object())
        if separators[-1] == "and" and not reader.at_end():
            raise reader.error("the end of the caption after the object that follows 'and'")
    expected_separators = [","] * (len(objects) - 2) + ["and"] if len(objects) > 1 else []
    if separators != expected_separators:
        raise CaptionParseError(
            text,
            f"{len(objects)} objects must be joined as {_join_pattern(expected_separators)!r}, "
            f"got {_join_pattern(separators)!r}",
        )
    positions = [obj.position for obj in objects]
    canonical = sorted(set(positions), key=POSITIONS.index)
    if positions != canonical:
        raise CaptionParseError(
            text,
            f"objects must be at distinct positions listed in the order {POSITIONS}, "
            f"got {tuple(positions)}",
        )
    return objects


def _try_parse(text: str) -> list[SceneObject] | None:
    try:
        return parse_caption(text)
    except CaptionParseError:
        return None


def score_captions(
    predicted: Sequence[str], truth: Sequence[str | _Captioned]
) -> dict[str, float | int]:
    """Score predicted captions against the true ones (captions, or scenes with ``.caption``).

    How it counts:

    - ``exact_match``: fraction of scenes whose prediction parses to exactly the true
      objects (equivalently: equals the true caption up to whitespace).
    - ``object_count``: fraction of scenes whose prediction parses and names as many
      objects as the truth.
    - ``shape``, ``colour``, ``size``, ``position``: per-object accuracy. Objects are
      matched by position. Each scene contributes one slot per position named by the
      truth or the prediction (their union). A slot in both is correct for ``position``
      and, attribute by attribute, correct where the attributes agree; a slot only in
      the truth (missing object) or only in the prediction (extra object) is wrong for all
      four. An unparseable prediction makes every true object a missing one. Each of the
      four is the number of correct slots over ``objects_compared``, the total number of
      slots.
    - ``scenes``, ``objects_compared``, ``unparseable``: the counts behind the fractions.

    Raises ``ValueError`` when the lists differ in length or are empty, and
    ``CaptionParseError`` when a true caption is itself outside the grammar.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} true captions")
    if not truth:
        raise ValueError("no captions to score")
    attributes = ("shape", "colour", "size", "position")
    correct = dict.fromkeys(attributes, 0)
    exact = count_correct = unparseable = slots = 0
    for predicted_text, true_item in zip(predicted, truth, strict=True):
        true_text = true_item if isinstance(true_item, str) else true_item.caption
        true_objects = {obj.position: obj for obj in parse_caption(true_text)}
        parsed = _try_parse(predicted_text)
        if parsed is None:
            unparseable += 1
            parsed = []
        predicted_objects = {obj.position: obj for obj in parsed}
        exact += predicted_objects == true_objects
        count_correct += bool(parsed) and len(parsed) == len(true_objects)
        slots += len(true_objects.keys() | predicted_objects.keys())
        for position in true_objects.keys() & predicted_objects.keys():
            for attribute in attributes:
                correct[attribute] += getattr(true_objects[position], attribute) == getattr(
                    predicted_objects[position], attribute
                )
    scores: dict[str, float | int] = {
        "exact_match": exact / len(truth),
        "object_count": count_correct / len(truth),
    }
    scores.update({attribute: correct[attribute] / slots for attribute in attributes})
    scores.update({"scenes": len(truth), "objects_compared": slots, "unparseable": unparseable})
    return scores
