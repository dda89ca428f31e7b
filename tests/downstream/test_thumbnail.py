"""The tiles thumbnail: 512-1024 px on its longer side, tiles outlined per magnification, a legend below."""
import numpy as np
from PIL import Image

from virchow_fast.data.index import MAG_COLOURS, draw_thumbnail


def _cols(mags, xs, ys):
    return {"mag": np.array(mags, np.float32), "x": np.array(xs), "y": np.array(ys)}


def test_size_outlines_and_legend():
    thumb = np.full((300, 400, 3), 240, np.uint8)  # a 16x-downsampled 6400 x 4800 slide at 0.25 um/px
    mag_mpp = {40.0: 0.25, 20.0: 0.5, 10.0: 1.0, 5.0: 2.0}
    img = draw_thumbnail(thumb, _cols([40.0, 40.0, 20.0], [0, 1568, 3136], [0, 0, 1568]), 16.0, 392, 0.25, mag_mpp)
    assert isinstance(img, Image.Image)
    a = np.asarray(img)
    zoom = 512 / 400  # the small thumbnail is brought up to 512 px
    assert a.shape[1] == 512 and a.shape[0] == round(300 * zoom) + 18 * 4 + 6
    # the 40x tile at (0, 0) spans 392 level-0 px -> 392 / 16 * zoom px, outlined in green
    edge = int(392 / 16 * zoom)
    assert tuple(a[edge // 2, 0]) == MAG_COLOURS[40.0] and tuple(a[0, edge // 2]) == MAG_COLOURS[40.0]
    x20 = int(3136 / 16 * zoom) + 1
    assert tuple(a[int(1568 / 16 * zoom) + 5, x20 - 1]) == MAG_COLOURS[20.0]
    legend = a[round(300 * zoom):]
    for mag in mag_mpp:  # one legend row per magnification, in its colour (5x too, with 0 tiles)
        assert (legend == MAG_COLOURS[mag]).all(axis=-1).any(), mag


def test_large_thumbnails_are_brought_down():
    thumb = np.full((2048, 1536, 3), 240, np.uint8)
    img = draw_thumbnail(thumb, _cols([], [], []), 2.0, 392, 0.25, {20.0: 0.5})
    assert img.height == 1024 + 18 + 6 and img.width == 768
