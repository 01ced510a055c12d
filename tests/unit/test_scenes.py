"""The demo scene generator and caption grammar: determinism, round trips, what the
pixels really show, and how captions are scored."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from services.demo import captions, scenes
from services.demo.scenes import (
    BACKGROUND_RGB,
    CAPTION_VOCABULARY,
    COLOUR_RGB,
    CaptionParseError,
    Scene,
    SceneObject,
    caption_for,
    caption_words,
    generate_scene,
    generate_scenes,
    parse_caption,
    score_captions,
)

N_SCENES = 300


@pytest.fixture(scope="module")
def many_scenes() -> list[Scene]:
    return list(generate_scenes(N_SCENES, seed=1234))


def _rgb_distance(first: tuple[int, ...], second: tuple[int, ...]) -> float:
    return float(np.linalg.norm(np.subtract(first, second, dtype=np.float64)))


# --- determinism ------------------------------------------------------------------------


def _render_whole_canvas(layout: list[scenes.ObjectLayout], background: scenes._Background, size: int) -> np.ndarray:
    """The straightforward rendering: the whole scene supersampled, then box-downsampled."""
    side = size * scenes._SUPERSAMPLE
    canvas = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(canvas)
    scenes._draw_background(draw, background, side)
    for placed in layout:
        scenes._draw_object(draw, placed, scenes._SUPERSAMPLE)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))


@pytest.mark.parametrize("size", [224, 112, 100, 33])
def test_rendering_only_around_objects_matches_downsampling_the_whole_canvas(size: int) -> None:
    seeds = random.Random(size)
    for _ in range(150):
        rng = random.Random(seeds.getrandbits(63))
        layout = [scenes._lay_out(obj, rng, size) for obj in scenes._sample_objects(rng)]
        background = scenes._sample_background(rng, size * scenes._SUPERSAMPLE)
        fast = np.asarray(scenes._render(layout, background, size))
        np.testing.assert_array_equal(fast, _render_whole_canvas(layout, background, size))


def test_same_seed_gives_identical_pixels_and_caption() -> None:
    first, second = generate_scene(42), generate_scene(42)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    assert first.caption == second.caption
    assert first.objects == second.objects


def test_different_seeds_differ() -> None:
    batch = [generate_scene(seed) for seed in range(20)]
    pixels = [np.asarray(scene.image).tobytes() for scene in batch]
    assert len(set(pixels)) == len(batch)
    assert len({scene.caption for scene in batch}) > 10


def test_generation_does_not_touch_global_random_state() -> None:
    random.seed(0)
    expected = random.random()
    random.seed(0)
    generate_scene(7)
    assert random.random() == expected


def test_scene_stream_is_reproducible_and_each_scene_regenerates_from_its_seed() -> None:
    stream = list(generate_scenes(5, seed=3, image_size=64))
    again = list(generate_scenes(5, seed=3, image_size=64))
    assert [scene.seed for scene in stream] == [scene.seed for scene in again]
    for scene in stream:
        alone = generate_scene(scene.seed, image_size=64)
        assert np.array_equal(np.asarray(alone.image), np.asarray(scene.image))
    other_stream = {scene.seed for scene in generate_scenes(50, seed=4, image_size=64)}
    assert not {scene.seed for scene in stream} & other_stream


def test_caption_does_not_depend_on_image_size() -> None:
    for seed in range(20):
        assert generate_scene(seed, 224).caption == generate_scene(seed, 112).caption


def test_image_is_rgb_of_the_requested_size() -> None:
    for size in (224, 112, 64):
        image = generate_scene(0, size).image
        assert image.mode == "RGB"
        assert image.size == (size, size)


def test_rejects_too_small_images_and_negative_counts() -> None:
    with pytest.raises(ValueError, match="image_size must be at least"):
        generate_scene(0, image_size=scenes.MIN_IMAGE_SIZE - 1)
    with pytest.raises(ValueError, match="non-negative"):
        list(generate_scenes(-1, seed=0))


# --- captions ---------------------------------------------------------------------------


def test_caption_examples_follow_the_grammar() -> None:
    two = [
        SceneObject("square", "blue", "small", "right"),
        SceneObject("circle", "red", "large", "left"),
    ]
    assert caption_for(two) == "a large red circle on the left and a small blue square on the right"
    three = [
        SceneObject("star", "green", "small", "top"),
        SceneObject("triangle", "yellow", "large", "centre"),
        SceneObject("square", "red", "small", "right"),
    ]
    assert caption_for(three) == (
        "a small green star at the top, a large yellow triangle in the centre"
        " and a small red square on the right"
    )
    assert caption_for(two[:1]) == "a small blue square on the right"


def test_caption_parse_round_trip_on_generated_scenes(many_scenes: list[Scene]) -> None:
    for scene in many_scenes:
        assert parse_caption(scene.caption) == scene.objects
        assert caption_for(scene.objects) == scene.caption


def test_caption_parse_round_trip_on_random_object_sets() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        positions = rng.sample(captions.POSITIONS, rng.randint(1, captions.MAX_OBJECTS))
        objects = [
            SceneObject(
                rng.choice(captions.SHAPES),
                rng.choice(captions.COLOURS),
                rng.choice(captions.SIZES),
                p,
            )
            for p in positions
        ]
        canonical = sorted(objects, key=lambda obj: captions.POSITIONS.index(obj.position))
        assert parse_caption(caption_for(objects)) == canonical


def test_parse_tolerates_whitespace_around_words_and_commas() -> None:
    canonical = (
        "a small green star at the top, a large yellow triangle in the centre"
        " and a small red square on the right"
    )
    spaced = (
        "  a small green star at the top ,a large yellow triangle in the\ncentre"
        "   and a small red square on the right "
    )
    assert parse_caption(spaced) == parse_caption(canonical)
    assert score_captions([spaced], [canonical])["exact_match"] == 1.0


def test_every_caption_word_is_in_the_vocabulary_and_every_word_is_used(
    many_scenes: list[Scene],
) -> None:
    vocabulary = set(CAPTION_VOCABULARY)
    assert len(vocabulary) == len(CAPTION_VOCABULARY)
    used = set()
    for scene in many_scenes:
        words = caption_words(scene.caption)
        assert set(words) <= vocabulary, scene.caption
        assert " ".join(words).replace(" ,", ",") == scene.caption  # the split loses nothing
        used.update(words)
    assert used == vocabulary


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the caption is empty"),
        ("the cat sat on the mat", r"expected 'a' starting an object, got 'the' at word 0"),
        ("a huge red circle on the left", r"expected a size .* got 'huge' at word 1"),
        ("a large pink circle on the left", r"expected a colour .* got 'pink'"),
        ("a large red blob on the left", r"expected a shape .* got 'blob'"),
        ("a large red circle somewhere", r"expected a position phrase .* got 'somewhere'"),
        ("a large red circle on the", "expected a position phrase .* got the end of the text"),
        ("A large red circle on the left", r"got 'A' at word 0"),
        ("a large red circle on the left.", r"got 'left\.' at word 6"),
        ("a large red circle on the left and", "got the end of the text"),
        ("a large red circle on the left a small red circle on the right", "',' or 'and'"),
        (
            "a large red circle on the left, a small red circle on the right",
            r"2 objects must be joined as 'X and X', got 'X, X'",
        ),
        (
            "a large red circle on the left and a small red circle at the top"
            " and a small red circle on the right",
            "the end of the caption after the object that follows 'and'",
        ),
        (
            "a large red circle on the left, a small red circle at the top,"
            " a small red circle in the centre and a small red circle on the right",
            "the end of the caption after 3 objects",
        ),
        (
            "a large red circle on the right and a small blue square on the left",
            r"distinct positions listed in the order .* got \('right', 'left'\)",
        ),
        (
            "a large red circle on the left and a small blue square on the left",
            "distinct positions",
        ),
    ],
)
def test_parse_rejects_text_outside_the_grammar(text: str, message: str) -> None:
    with pytest.raises(CaptionParseError, match=message) as caught:
        parse_caption(text)
    assert isinstance(caught.value, ValueError)
    assert caught.value.text == text


def test_caption_for_rejects_impossible_object_lists() -> None:
    red_left = SceneObject("circle", "red", "large", "left")
    with pytest.raises(ValueError, match="1 to 3 objects"):
        caption_for([])
    with pytest.raises(ValueError, match="its own position"):
        caption_for([red_left, red_left])


def test_scene_object_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match=r"SceneObject.colour must be one of .* got 'pink'"):
        SceneObject("circle", "pink", "large", "left")


# --- scene content ----------------------------------------------------------------------


def test_distribution_covers_every_attribute_and_count(many_scenes: list[Scene]) -> None:
    objects = [obj for scene in many_scenes for obj in scene.objects]
    assert {obj.shape for obj in objects} == set(captions.SHAPES)
    assert {obj.colour for obj in objects} == set(captions.COLOURS)
    assert {obj.size for obj in objects} == set(captions.SIZES)
    assert {obj.position for obj in objects} == set(captions.POSITIONS)
    counts = [len(scene.objects) for scene in many_scenes]
    assert set(counts) == {1, 2, 3}
    # Uniform draws: each count should hold roughly a third of 300 scenes.
    assert all(60 <= counts.count(count) <= 140 for count in (1, 2, 3))


def test_objects_have_distinct_positions_in_canonical_order(many_scenes: list[Scene]) -> None:
    for scene in many_scenes:
        positions = [obj.position for obj in scene.objects]
        assert positions == sorted(set(positions), key=captions.POSITIONS.index)
        assert len(scene.layout) == len(scene.objects)


@pytest.mark.parametrize("image_size", [224, 112])
def test_objects_stay_inside_the_image_and_apart(image_size: int) -> None:
    min_gap_px = 0.01 * image_size  # anti-aliasing blurs at most one pixel each side
    for scene in generate_scenes(N_SCENES, seed=99, image_size=image_size):
        for placed in scene.layout:
            x0, y0, x1, y1 = placed.bbox
            assert min(x0, y0) >= 1 and max(x1, y1) <= image_size - 1
        for first, second in itertools.combinations(scene.layout, 2):
            gap_x = max(first.bbox[0], second.bbox[0]) - min(first.bbox[2], second.bbox[2])
            gap_y = max(first.bbox[1], second.bbox[1]) - min(first.bbox[3], second.bbox[3])
            assert max(gap_x, gap_y) >= min_gap_px, (scene.seed, scene.caption)


def test_large_objects_are_about_twice_small_ones(many_scenes: list[Scene]) -> None:
    extents = {
        size: [
            placed.half_extent
            for scene in many_scenes
            for obj, placed in zip(scene.objects, scene.layout, strict=True)
            if obj.size == size
        ]
        for size in captions.SIZES
    }
    ratio = np.mean(extents["large"]) / np.mean(extents["small"])
    assert 1.7 <= ratio <= 2.2
    assert min(extents["large"]) > 1.5 * max(extents["small"])  # never ambiguous


def _nearest_palette_colour(pixel: np.ndarray) -> str:
    palette = {**COLOUR_RGB, **{f"background{i}": rgb for i, rgb in enumerate(BACKGROUND_RGB)}}
    return min(palette, key=lambda name: _rgb_distance(tuple(pixel), palette[name]))


@pytest.mark.parametrize("image_size", [224, 112])
def test_object_colour_is_in_the_pixels_at_its_centre(image_size: int) -> None:
    for scene in generate_scenes(100, seed=5, image_size=image_size):
        pixels = np.asarray(scene.image)  # [H, W, 3]
        for obj, placed in zip(scene.objects, scene.layout, strict=True):
            column, row = (round(coordinate) for coordinate in placed.centre)
            # The median of a 3x3 patch shrugs off the gaussian pixel noise.
            patch = pixels[row - 1 : row + 2, column - 1 : column + 2].reshape(-1, 3)
            observed = np.median(patch, axis=0)
            assert _nearest_palette_colour(observed) == obj.colour, (scene.seed, obj)
            assert _rgb_distance(tuple(observed), placed.rgb) < 30, (scene.seed, obj)


def test_palettes_are_far_apart() -> None:
    assert set(COLOUR_RGB) == set(captions.COLOURS)
    for first, second in itertools.combinations(COLOUR_RGB.values(), 2):
        assert _rgb_distance(first, second) > 80
    for colour in COLOUR_RGB.values():
        assert max(colour) - min(colour) > 120  # saturated
        for background in BACKGROUND_RGB:
            assert _rgb_distance(colour, background) > 80
    for background in BACKGROUND_RGB:
        assert max(background) - min(background) <= 20  # near-grey


# --- scoring ----------------------------------------------------------------------------

TRUTH = "a large red circle on the left and a small blue square on the right"


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (TRUTH, dict(exact_match=1.0, object_count=1.0, shape=1.0, colour=1.0, size=1.0, position=1.0, objects_compared=2, unparseable=0)),
        (
            "a large red circle on the left and a small green square on the right",
            dict(exact_match=0.0, object_count=1.0, shape=1.0, colour=0.5, size=1.0, position=1.0, objects_compared=2),
        ),
        (
            "a large red circle on the left",  # missing object: its slot is wrong throughout
            dict(exact_match=0.0, object_count=0.0, shape=0.5, colour=0.5, size=0.5, position=0.5, objects_compared=2),
        ),
        (
            "a large red circle on the left, a small green star in the centre"
            " and a small blue square on the right",  # extra object: one more slot, wrong
            dict(exact_match=0.0, object_count=0.0, shape=2 / 3, colour=2 / 3, size=2 / 3, position=2 / 3, objects_compared=3),
        ),
        (
            "a large red circle at the top and a small blue square on the right",
            # wrong position: a missing left object and an extra top one
            dict(exact_match=0.0, object_count=1.0, shape=1 / 3, colour=1 / 3, size=1 / 3, position=1 / 3, objects_compared=3),
        ),
        (
            "a big red thing, maybe",
            dict(exact_match=0.0, object_count=0.0, shape=0.0, colour=0.0, size=0.0, position=0.0, objects_compared=2, unparseable=1),
        ),
    ],
)  # fmt: skip
def test_score_one_prediction(prediction: str, expected: dict[str, float]) -> None:
    scores = score_captions([prediction], [TRUTH])
    assert scores["scenes"] == 1
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key


def test_score_aggregates_over_scenes_and_accepts_scenes_as_truth() -> None:
    scene = generate_scene(11)
    scores = score_captions([TRUTH, "garbage", scene.caption], [TRUTH, TRUTH, scene])
    slots = 2 + 2 + len(scene.objects)
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["object_count"] == pytest.approx(2 / 3)
    assert scores["unparseable"] == 1
    assert scores["objects_compared"] == slots
    for attribute in ("shape", "colour", "size", "position"):
        assert scores[attribute] == pytest.approx((slots - 2) / slots)


def test_score_rejects_mismatched_or_empty_inputs_and_bad_truth() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 true captions"):
        score_captions([TRUTH, TRUTH], [TRUTH])
    with pytest.raises(ValueError, match="no captions to score"):
        score_captions([], [])
    with pytest.raises(CaptionParseError):
        score_captions([TRUTH], ["not a caption"])


# --- command line and public surface ----------------------------------------------------


def test_cli_writes_pngs_and_captions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        scenes.main(
            ["--out", str(tmp_path / "out"), "--n", "3", "--seed", "1", "--image-size", "64"]
        )
        == 0
    )
    lines = (tmp_path / "out" / "captions.txt").read_text().splitlines()
    expected = list(generate_scenes(3, seed=1, image_size=64))
    assert [line.split("\t") for line in lines] == [
        [f"scene_{index:03d}.png", scene.caption] for index, scene in enumerate(expected)
    ]
    assert all((tmp_path / "out" / f"scene_{index:03d}.png").is_file() for index in range(3))
    assert "wrote 3 scenes" in capsys.readouterr().out


def test_public_names_are_locked() -> None:
    assert set(scenes.__all__) == {
        "BACKGROUND_RGB", "CAPTION_VOCABULARY", "COLOUR_RGB", "MIN_IMAGE_SIZE",
        "CaptionParseError", "ObjectLayout", "Scene", "SceneObject", "caption_for",
        "caption_words", "generate_scene", "generate_scenes", "main", "parse_caption",
        "score_captions",
    }  # fmt: skip
    assert all(hasattr(scenes, name) for name in scenes.__all__)
    assert all(hasattr(captions, name) for name in captions.__all__)
