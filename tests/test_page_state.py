"""The page's state machine without Gradio: paint, recolour, undo, remove, clear, step-up, object points."""

import copy

import pytest

from errors import InvalidInput
from page_state import HISTORY_LIMIT, PageState, click_tolerance

RED, BLUE, GREEN = (255, 0, 0, 153), (0, 0, 255, 153), (0, 160, 0, 153)
WINDOW, HOUSE, LOWER, SUN = 1, 0, 3, 2
UNDER_WINDOW = (WINDOW, HOUSE, LOWER)  # the masks under a window pixel, smallest first


def page(**changes) -> PageState:
    return PageState(image_id="house", owner="local", order=(LOWER, HOUSE, SUN, WINDOW), **changes)


def test_a_new_page_has_nothing_painted_or_selected():
    state = PageState()
    assert (state.image_id, state.owner, state.steps, state.selected, state.history) == (None, None, (), None, ())
    assert state.points == () and state.preview is None and state.gallery_index is None and not state.can_remove


def test_paint_selects_and_paints_on_top():
    state = page().paint(SUN, RED).paint(WINDOW, BLUE)
    assert state.steps == ((SUN, RED), (WINDOW, BLUE)) and state.selected == WINDOW
    again = state.paint(SUN, GREEN)  # painting a painted mask again moves it on top, in its new colour
    assert again.steps == ((WINDOW, BLUE), (SUN, GREEN)) and again.selected == SUN
    assert state.instructions() == [{"mask_id": SUN, "color": list(RED)}, {"mask_id": WINDOW, "color": list(BLUE)}]


def test_changes_return_a_new_state_and_leave_the_old_one_as_it_was():
    before = page()
    after = before.paint(SUN, RED)
    assert before.steps == () and after.steps == ((SUN, RED),)


def test_undo_goes_back_one_step_at_a_time_with_the_selection_of_then():
    state = page().paint(SUN, RED).paint(WINDOW, BLUE)
    once = state.undo()
    assert once.steps == ((SUN, RED),) and once.selected == SUN
    twice = once.undo()
    assert twice.steps == () and twice.selected is None and twice.history == ()
    assert twice.undo() == twice  # nothing left to undo: unchanged


def test_remove_straight_after_undo_removes_what_is_shown_as_selected():
    """The bug: after Undo the selection was dropped, so "Remove selected" refused though a mask looked selected."""
    state = page().paint(SUN, RED).paint(WINDOW, BLUE).undo()
    assert state.selected == SUN and state.can_remove
    removed = state.remove()
    assert removed.steps == () and removed.selected is None


def test_remove_takes_the_paint_off_and_unselects_and_undo_brings_both_back():
    state = page().paint(SUN, RED).paint(WINDOW, BLUE)
    removed = state.remove()
    assert removed.steps == ((SUN, RED),) and removed.selected is None
    assert removed.recolour(GREEN) == removed  # a colour change must not repaint the removed mask
    back = removed.undo()
    assert back.steps == state.steps and back.selected == WINDOW


@pytest.mark.parametrize("state", [page(), page().paint(SUN, RED).remove(), page().paint(SUN, RED).clear()])
def test_remove_with_nothing_selected_says_what_to_do(state):
    with pytest.raises(InvalidInput, match=r"^Select a painted mask first \(click it\), then remove it\.$"):
        state.remove()


def test_the_undo_history_keeps_the_last_fifty_steps():
    state = page()
    for i in range(HISTORY_LIMIT + 10):
        state = state.paint(i, RED)
    assert len(state.history) == HISTORY_LIMIT == 50
    for _ in range(HISTORY_LIMIT):
        state = state.undo()
    assert state.painted == list(range(10)) and state.history == ()  # the oldest ten steps cannot be undone


def test_recolour_changes_the_selected_mask_and_a_drag_is_one_undo_step():
    state = page().paint(SUN, RED).paint(WINDOW, RED)
    dragged = state.recolour(BLUE).recolour(GREEN).recolour((1, 2, 3, 4))
    assert dragged.steps == ((SUN, RED), (WINDOW, (1, 2, 3, 4)))
    assert len(dragged.history) == len(state.history) + 1
    assert dragged.undo().steps == state.steps


@pytest.mark.parametrize("state", [page(), page().paint(SUN, RED)])
def test_recolour_without_a_selection_or_to_the_same_colour_changes_nothing(state):
    same = state.recolour(RED)
    assert same == state


def test_clear_empties_in_one_undo_step_and_clearing_nothing_adds_no_step():
    state = page().paint(SUN, RED).paint(WINDOW, BLUE)
    cleared = state.clear()
    assert cleared.steps == () and cleared.selected is None and cleared.gallery_index is None
    assert cleared.undo().steps == state.steps
    assert page().clear().history == ()


def test_a_click_selects_the_smallest_mask_and_the_same_spot_again_the_next_larger():
    state = page().clicked((192, 300), UNDER_WINDOW, RED, tolerance=6.4)
    assert state.selected == WINDOW and state.painted == [WINDOW]
    state = state.clicked((192, 300), UNDER_WINDOW, RED, tolerance=6.4)
    assert state.selected == HOUSE and state.painted == [HOUSE]  # the window's paint is taken back
    state = state.clicked((195, 302), UNDER_WINDOW, RED, tolerance=6.4)  # a finger lands a few pixels off
    assert state.selected == LOWER
    state = state.clicked((192, 300), UNDER_WINDOW, RED, tolerance=6.4)  # past the largest: back to the smallest
    assert state.selected == WINDOW and state.painted == [WINDOW]


def test_the_same_spot_steps_up_also_when_masks_were_added_under_it_meanwhile():
    state = page().clicked((192, 300), (WINDOW, HOUSE), RED, tolerance=6.4)
    grown = (WINDOW, HOUSE, LOWER)  # the automatic pass stored the lower half since the first click
    state = state.clicked((192, 300), grown, RED, tolerance=6.4)
    assert state.selected == HOUSE and state.candidates == grown
    assert state.clicked((192, 300), grown, RED, tolerance=6.4).selected == LOWER


def test_a_thumbnail_picked_by_its_mask_id_is_selected_and_painted():
    state = page().picked_mask(SUN, RED)
    assert state.selected == SUN and state.painted == [SUN] and state.click is None
    with pytest.raises(InvalidInput, match="Upload a photo first"):
        PageState(owner="local").picked_mask(0, RED)


def test_a_click_elsewhere_starts_from_the_smallest_again_and_keeps_other_paint():
    state = page().clicked((192, 300), UNDER_WINDOW, RED, tolerance=6.4)
    state = state.clicked((288, 408), (HOUSE, LOWER), BLUE, tolerance=6.4)
    assert state.selected == HOUSE and state.steps == ((WINDOW, RED), (HOUSE, BLUE))
    far = state.clicked((100, 100), (HOUSE, LOWER), GREEN, tolerance=6.4)
    assert far.selected == HOUSE and far.steps[-1] == (HOUSE, GREEN)  # too far to be "the same spot"


def test_a_click_on_no_mask_paints_nothing_but_is_remembered():
    state = page().paint(SUN, RED).clicked((40, 40), (), BLUE, tolerance=6.4)
    assert state.steps == ((SUN, RED),) and state.selected == SUN
    assert state.click == (40, 40) and state.candidates == ()


def test_a_thumbnail_selects_and_paints_its_mask_and_is_the_one_highlighted():
    state = page().picked_thumbnail(2, RED)
    assert state.selected == SUN and state.painted == [SUN] and state.gallery_index == 2
    with pytest.raises(InvalidInput, match="Upload a photo first"):
        state.picked_thumbnail(4, RED)
    with pytest.raises(InvalidInput, match="Upload a photo first"):
        PageState(owner="local").picked_thumbnail(0, RED)


def test_after_undo_the_highlighted_thumbnail_is_the_selection_of_then():
    """The bug: the thumbnail of the undone mask stayed highlighted."""
    state = page().picked_thumbnail(2, RED)
    assert state.undo().gallery_index is None
    state = state.picked_thumbnail(3, BLUE)
    assert state.gallery_index == 3 and state.undo().gallery_index == 2


def test_object_points_need_an_include_point_first_then_preview_keep_and_reset():
    with pytest.raises(InvalidInput, match="Start an object with an include point"):
        page().points_with(5, 5, include=False)
    points = page().points_with(5, 5, include=True)
    state = page().previewing(points, {"segmentation": "rle"})
    assert state.points_with(9, 9, include=False) == ((5, 5, 1), (9, 9, 0))
    assert state.without_object().points == () and state.without_object().preview is None
    kept = state.clicked((1, 1), UNDER_WINDOW, RED, 3).kept_object(7, BLUE)
    assert kept.points == () and kept.preview is None and kept.selected == 7 and kept.steps[-1] == (7, BLUE)
    assert kept.click is None and kept.candidates == ()  # the next click starts afresh


def test_opening_another_image_keeps_only_the_owner():
    state = page().paint(SUN, RED).clicked((1, 1), UNDER_WINDOW, RED, 3).opened("garden")
    assert state == PageState(image_id="garden", owner="local")


def test_the_state_is_small_and_copies_as_gradio_copies_it():
    state = page().paint(SUN, RED).previewing(((5, 5, 1),), {"segmentation": {"size": [4, 4], "counts": "x"}})
    assert copy.deepcopy(state) == state


@pytest.mark.parametrize(
    ("width", "display_width", "expected"),
    [(640, 640, 6.4), (50, 50, 1.0), (2048, 1024, 20.48), (4000, 100, 40.0), (1000, 20, 50.0)],
)
def test_click_tolerance_is_one_percent_of_the_width_and_at_least_a_display_pixel(width, display_width, expected):
    assert click_tolerance(width, display_width) == pytest.approx(expected)
