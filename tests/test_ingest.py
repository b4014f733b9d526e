"""Masks added to a stored image (ingest.add_masks): a mask that repeats a stored one is reused, never stored twice;
the limit and a stop are kept. A real SQLite file and blob store; masks built in code."""

import threading

import numpy as np

from helpers import encode, house_masks, make_photo, record
from ingest import same_mask
from storage import MaskRow
from studio import Studio
from test_studio import H, W, make_studio


def stored_image(studio: Studio):
    """An image stored with no masks yet, as the page's upload stores it with a SAM engine."""
    loaded, _ = studio.ingest.store_image(encode(make_photo(H, W)), None, "local", None, "test", lambda f, t: None)
    return loaded.row


def row_of(mask: np.ndarray) -> MaskRow:
    rec = record(mask)
    return MaskRow(
        "img", 0, rec["segmentation"]["counts"], rec["area"], rec["bbox"], None, None, None, None, None, "none"
    )


def test_masks_are_stored_once_and_a_near_copy_is_the_stored_mask(tmp_path):
    studio = make_studio(tmp_path)
    row = stored_image(studio)
    house, window, sun, lower = house_masks(H, W)
    ids, added = studio.ingest.add_masks(row, [record(house), record(window)])
    assert sorted(ids) == sorted(added) and len(added) == 2
    nearly = house.copy()
    nearly[np.argwhere(house)[0][0], np.argwhere(house)[0][1]] = False  # one pixel less: IoU ≥ 0.95
    again, added_again = studio.ingest.add_masks(row, [record(nearly), record(sun)])
    assert added_again == [again[1]] and again[0] == ids[0]  # the house is reused, the sun is new
    assert studio.load(row.id, "local").row.mask_count == 3
    assert sorted(m.area for m in studio.db.masks(row.id)) == sorted([house.sum(), window.sum(), sun.sum()])


def test_the_limit_and_a_stop_store_nothing_more_but_still_name_stored_masks(tmp_path):
    studio = make_studio(tmp_path)
    row = stored_image(studio)
    house, window, sun, lower = house_masks(H, W)
    ids, added = studio.ingest.add_masks(row, [record(house), record(window)], limit=1)
    assert len(added) == 1 and len(studio.db.masks(row.id)) == 1
    stop = threading.Event()
    stop.set()
    ids, added = studio.ingest.add_masks(row, [record(house), record(sun)], stop=stop)
    assert added == [] and len(ids) == 1 and len(studio.db.masks(row.id)) == 1


def test_same_mask_is_iou_at_least_095():
    a = np.zeros((10, 10), bool)
    a[:, :5] = True  # 50 pixels
    b = a.copy()
    b[0, 0] = b[1, 0] = False  # IoU 48/50 = 0.96
    c = a.copy()
    c[:3, 0] = False  # IoU 47/50 = 0.94
    assert same_mask(row_of(a), row_of(b), (10, 10)) and not same_mask(row_of(a), row_of(c), (10, 10))
    assert not same_mask(row_of(a), row_of(~a), (10, 10))
