"""Recipe stores (``plan.augment``) replay TrivialAugmentWide's and RandAugment's ops through
torchvision's public functional calls (``recipe_ops.apply_op``), with the magnitudes of their
augmentation spaces. The spec (``docs/label-store.md``) states both; these tests fail loudly when
a torchvision release changes what its own (private) op dispatch does or its spaces, since a
torchvision-based reader of the spec would then no longer reproduce the stored crops."""
import pytest
import torch

from refinery_pipeline.loaders.recipe_ops import apply_op
from refinery_pipeline.plan.recipe import NUM_MAGNITUDE_BINS, _auto_class, op_names

LINEAR = lambda low, high: lambda size: torch.linspace(low, high, NUM_MAGNITUDE_BINS)  # noqa: E731
POSTERIZE = lambda steps: lambda size: (8 - (torch.arange(NUM_MAGNITUDE_BINS) / (  # noqa: E731
    (NUM_MAGNITUDE_BINS - 1) / steps))).round().int()
NONE = lambda size: None  # noqa: E731
# Each op, in torchvision's order (the op ids a store's draws index), and its 31 magnitudes on
# crops of ``size`` pixels; as stated in docs/label-store.md ("A recipe's pixels").
SPACES = {
    "trivialaugment": {
        "Identity": NONE, "ShearX": LINEAR(0.0, 0.99), "ShearY": LINEAR(0.0, 0.99),
        "TranslateX": LINEAR(0.0, 32.0), "TranslateY": LINEAR(0.0, 32.0),
        "Rotate": LINEAR(0.0, 135.0), "Brightness": LINEAR(0.0, 0.99),
        "Color": LINEAR(0.0, 0.99), "Contrast": LINEAR(0.0, 0.99), "Sharpness": LINEAR(0.0, 0.99),
        "Posterize": POSTERIZE(6), "Solarize": LINEAR(1.0, 0.0), "AutoContrast": NONE,
        "Equalize": NONE},
    "randaugment": {
        "Identity": NONE, "ShearX": LINEAR(0.0, 0.3), "ShearY": LINEAR(0.0, 0.3),
        "TranslateX": lambda size: torch.linspace(0.0, 150.0 / 331.0 * size, NUM_MAGNITUDE_BINS),
        "TranslateY": lambda size: torch.linspace(0.0, 150.0 / 331.0 * size, NUM_MAGNITUDE_BINS),
        "Rotate": LINEAR(0.0, 30.0), "Brightness": LINEAR(0.0, 0.9), "Color": LINEAR(0.0, 0.9),
        "Contrast": LINEAR(0.0, 0.9), "Sharpness": LINEAR(0.0, 0.9), "Posterize": POSTERIZE(4),
        "Solarize": LINEAR(1.0, 0.0), "AutoContrast": NONE, "Equalize": NONE},
}
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
          "Contrast", "Sharpness"}
CHANGED = ("torchvision {} changed {}: recipe stores would no longer replay for a reader of "
           "docs/label-store.md; pin torchvision, or update recipe_ops.apply_op and the spec")


@pytest.mark.parametrize("auto", SPACES)
@pytest.mark.parametrize("size", [24, 224])
def test_the_augmentation_spaces_are_the_ones_the_spec_states(auto, size):
    import torchvision
    space = _auto_class(auto)._AUGMENTATION_SPACE
    what = CHANGED.format(torchvision.__version__, f"{auto}'s augmentation space")
    assert list(space) == list(SPACES[auto]) == list(op_names()), what
    for op, (magnitudes, signed) in space.items():
        expected, ours = SPACES[auto][op](size), magnitudes(NUM_MAGNITUDE_BINS, size, size)
        assert signed == (op in SIGNED), what
        assert (ours is None) == (expected is None), what
        if expected is not None:
            assert torch.equal(ours, expected), f"{what} ({op})"


@pytest.mark.parametrize("auto", SPACES)
def test_our_public_calls_are_torchvisions_own_ops_byte_for_byte(auto):
    import torchvision
    from torchvision.transforms.v2 import InterpolationMode
    transform = _auto_class(auto)(interpolation=InterpolationMode.BILINEAR)
    private = getattr(transform, "_apply_image_or_video_transform", None)
    if private is None:
        pytest.fail(CHANGED.format(torchvision.__version__, "its op dispatch (no "
                                   "_apply_image_or_video_transform to compare with)"))
    generator = torch.Generator().manual_seed(0)
    for size in (29,):  # odd: the centre of rotations and shears falls between pixels
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
        for op, magnitudes in SPACES[auto].items():
            values = magnitudes(size)
            for b in (0, 7, 30):
                magnitude = 0.0 if values is None else float(values[b])
                for sign in ((1, -1) if op in SIGNED else (1,)):
                    theirs = private(image, op, sign * magnitude,
                                     interpolation=transform.interpolation, fill=transform._fill)
                    assert torch.equal(apply_op(image, op, sign * magnitude), theirs), \
                        CHANGED.format(torchvision.__version__, f"{op} at bin {b}")
