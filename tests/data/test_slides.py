"""Reader: mpp, level choice per magnification, backends agree, edges, refusals."""
import numpy as np
import pytest

from virchow_fast.data.slides import Level, Slide, SlideError, sane_region


def test_levels_and_mpp_every_backend(slides):
    import tiffslide

    for name in ("aperio", "generic"):
        for backend in ("cucim", "openslide"):
            s = Slide(slides[name], backend=backend)
            assert s.mpp == pytest.approx(0.25)
            assert [lv.downsample for lv in s.levels] == [1.0, 2.0, 4.0][: len(s.levels)] + [8.0] * (len(s.levels) - 3)
        t = tiffslide.TiffSlide(str(slides[name]))
        assert len(t.level_dimensions) == len(Slide(slides[name]).levels)
        assert float(t.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)


def test_level_choice_per_magnification(slides):
    s = Slide(slides["aperio"])  # levels at 0.25, 0.5, 1.0 um/px (no 2.0 level)
    assert s.backend == "cucim"
    assert [s.choose_level(m) for m in (0.25, 0.5, 1.0, 2.0)] == [(0, 1.0), (1, 1.0), (2, 1.0), (2, 2.0)]
    assert s.choose_level(0.75) == (1, 1.5)  # no level matches: read finer, resize
    assert s.choose_level(0.1) is None  # finer than the scan: never upsampled


def test_non_integral_downsamples_tolerated():
    s = Slide.__new__(Slide)
    s.mpp = 0.2500
    s.levels = [Level(40000, 30000, 1.0), Level(19997, 14998, 2.0003), Level(4999, 3749, 8.0016)]
    assert s.choose_level(0.5) == (1, 1.0)
    assert s.choose_level(2.0) == (2, 1.0)
    level, factor = s.choose_level(1.0)
    assert level == 1 and factor == pytest.approx(1.0 / (0.25 * 2.0003))


def test_cucim_and_openslide_identical_pixels(slides):
    a = Slide(slides["aperio"], backend="cucim")
    b = Slide(slides["aperio"], backend="openslide")
    for level in range(len(a.levels)):
        ds = int(a.levels[level].downsample)
        x, y = 256 * ds, 128 * ds  # level-aligned
        np.testing.assert_array_equal(a.read(x, y, level, 300, 200), b.read(x, y, level, 300, 200))


def test_past_the_edge_is_white_for_both_backends(slides):
    for backend in ("cucim", "openslide"):
        s = Slide(slides["aperio"], backend=backend)
        r = s.read(4000, 3000, 0, 200, 200)
        assert (r[100:, :] == 255).all() and (r[:, 100:] == 255).all()
        assert (r[:72, :96] != 255).any()


def test_refusals_are_one_line_naming_the_file(slides, tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n" * 50)
    cases = [slides["nompp"], empty, text, tmp_path / "missing.svs"]
    for path in cases:
        with pytest.raises(SlideError) as err:
            Slide(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert Slide(slides["nompp"], mpp=0.5).mpp == 0.5  # given by the user
    assert Slide(slides["aperio"], mpp=0.5).mpp == 0.25  # ... only where the metadata has none


def test_empty_spacing_unit_is_no_mpp(slides):
    from cucim import CuImage

    img = CuImage(str(slides["nompp"]))
    assert img.spacing_units()[0] == ""  # cuCIM says 1.0 with no unit ...
    with pytest.raises(SlideError, match="no microns-per-pixel"):
        Slide(slides["nompp"])  # ... which we do not take as 1 um/px


def test_sanity_check():
    good = np.full((64, 64, 3), 200, np.uint8)
    assert sane_region(good, (64, 64)) is None
    bad = good.copy()
    bad[:40] = 0
    assert "black" in sane_region(bad, (64, 64))
    assert sane_region(good[:10], (64, 64)) is not None


def test_cmu_small_region(cmu):
    s = Slide(cmu)
    assert s.mpp == pytest.approx(0.499)
    assert s.dimensions == (2220, 2967)
    assert s.choose_level(0.5) == (0, 1.0)  # 0.499 serves 20x without a resize
    level, factor = s.choose_level(1.0)
    assert level == 0 and factor == pytest.approx(1.0 / 0.499)
    ctx = s.read_context(800, 1200, 1.0, 392)
    assert ctx.shape == (392, 392, 3) and sane_region(ctx, (392, 392)) is None


def test_absurd_header_refused(tmp_path):
    import tifffile

    path = tmp_path / "absurd.tiff"
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), compression="jpeg",
                     photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path, mode="r+") as t:  # claim 200000 x 200000 over a few KB
        t.pages[0].tags["ImageWidth"].overwrite(200000)
        t.pages[0].tags["ImageLength"].overwrite(200000)
    with pytest.raises(SlideError, match="header and data disagree"):
        Slide(path)
