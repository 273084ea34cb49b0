"""The atrium phantom's generator (data/thorax.py): reproducible, and a small target among look-alikes
of its own intensity, as the large-field demo needs."""
import numpy as np
import pytest

from data.thorax import LOOKALIKES, STRUCTURES, make_subject

SPACING = 1.6   # coarse, so that a subject takes a fraction of a second


@pytest.fixture(scope="module")
def subject():
    return make_subject(20000, spacing=SPACING)


def test_same_seed_same_subject_bit_for_bit(subject):
    again = make_subject(20000, spacing=SPACING)
    other = make_subject(20001, spacing=SPACING)
    for key in ("image", "label", "anatomy"):
        assert np.array_equal(getattr(subject, key), getattr(again, key))
    assert not np.array_equal(subject.label, other.label)     # another seed, another subject


def test_label_is_the_atrium_and_a_small_part_of_the_view(subject):
    assert subject.image.dtype == subject.label.dtype == subject.anatomy.dtype == np.uint8
    assert subject.image.shape == subject.label.shape == subject.anatomy.shape
    assert np.array_equal(subject.label == 1, subject.anatomy == STRUCTURES["left_atrium"])
    share = subject.label.mean()
    assert 0.01 < share < 0.1                    # a small target in a large view
    assert subject.spacing == (SPACING,) * 3


def test_lookalikes_are_present_larger_than_the_target_and_as_bright(subject):
    ids, image = subject.anatomy, subject.image.astype(float)
    atrium = ids == STRUCTURES["left_atrium"]
    lookalike = np.isin(ids, [STRUCTURES[n] for n in LOOKALIKES])
    assert lookalike.sum() > 2 * atrium.sum()    # more look-alike blood than target
    for name in ("left_ventricle", "right_atrium", "aorta_descending", "pulmonary_artery"):
        assert (ids == STRUCTURES[name]).any(), name
    # intensity cannot tell them apart: the medians within 15 %, far above the tissue around them
    a, b = np.median(image[atrium]), np.median(image[lookalike])
    assert abs(a - b) < 0.15 * a
    assert np.median(image[ids == STRUCTURES["myocardium"]]) < 0.5 * a


def test_the_atrium_touches_a_lookalike(subject):
    """The left ventricle joins the atrium through the mitral valve: one blob of blood, so keeping
    the largest component cannot remove a false positive there."""
    from scipy import ndimage
    atrium = subject.anatomy == STRUCTURES["left_atrium"]
    grown = ndimage.binary_dilation(atrium)
    assert (subject.anatomy[grown & ~atrium] == STRUCTURES["left_ventricle"]).any()
